"""When should SQIRL work? Effective-horizon estimates for small sparse JAX tasks: a table and a plot.

    python -m experiments.effective_horizon                                   # DeepSea-4/6/8, KeyDoor-5
    python -m experiments.effective_horizon --tasks DeepSea-10 KeyDoor-7 --max-k 3 --episodes 64 --num-seeds 4

Two estimates per task (Laidlaw et al., "Bridging RL theory and practice with the effective horizon" / "The
effective horizon explains deep RL performance in stochastic environments"):

* **exact** (deterministic tasks with a small reachable state space, enumerated by stepping the JAX env): ``k*``,
  the smallest planning depth whose greedy policy on ``T^{k-1} Q^rand`` is optimal; the margin ``gap_k`` that the
  random-rollout estimates must resolve; and the proxy ``H_hat = min_k (k + log_A m_k)`` (:func:`analyse`, below).
  Stochastic tasks are reported as "n/a".
* **empirical**: SQIRL itself, vmapped over ``k = 1..max_k`` and seeds at ``--episodes`` episodes per timestep (one
  compiled program per task; seed ``(k - 1) * num_seeds + s`` of the run is depth k's seed s, from
  ``PRNGKey(seed + (k - 1) * num_seeds + s)``); the smallest k whose greedy policy reaches ``--threshold`` mean
  success (">max_k" if none). This is the minimal k for which *random-rollout* Q-estimates (with function
  approximation and that sample budget) pick optimal actions. Each task's sweep trains through the runner
  (:func:`jaxrl_pref.study.train`) in ``OUT/<task>/sqirl/`` with a command-line run's outputs (``config.json``,
  ``metrics.csv``, ``checkpoints/``, ...): an interrupted study continues where it stopped when run again (finished
  runs are restored, not trained again), and the table reads the runs' ``metrics.csv``.

Outputs in ``--out`` (default ``runs/effective_horizon``): ``table.md``, ``table.csv``, ``effective_horizon.png``
(left: exact gap_k vs k, log scale; right: SQIRL success vs k), and the runs' directories.

The exact analysis
------------------
For a task whose dynamics are deterministic and whose reachable finite-horizon state space is small, this module
enumerates the MDP exactly (breadth-first over ``(timestep, state)``, stepping the JAX env itself in batches),
computes by dynamic programming

* ``Q^rand`` (the uniformly random policy's Q-function) and ``k - 1`` Bellman-optimality backups of it,
  ``Q_k = T^{k-1} Q^rand`` -- exactly what SQIRL's k heads estimate from random rollouts -- and ``Q*``;
* ``k*``: the smallest k for which acting greedily on ``Q_k`` is optimal at every state on the optimal policy's
  trajectories (the paper's "k-QVI-solvable" depth; with exact Q-values SQIRL with ``planning_depth >= k*`` is
  optimal);
* a documented sample-complexity proxy of the effective horizon, ``H_hat = min_k (k + log_A m_k)`` with
  ``m_k = ceil(2 (R / gap_k)^2 ln(2 A))`` -- Hoeffding's count of random rollouts per (state, action) that estimate
  ``Q^rand`` to within ``gap_k / 2`` (then the greedy choice on ``Q_k`` is still right); ``gap_k`` is the smallest
  margin, over the optimal-trajectory states, between the best optimal action's ``Q_k`` and the best non-optimal
  action's, and ``R`` the range of returns (``max Q* - min Q^rand``). This is a proxy, not the paper's exact
  bound (which uses the range of the k-step value and a union bound over states).

States are identified by their observation together with the timestep, so tasks must have observations that
determine the state (true for DeepSea, KeyDoor and the classic gridworlds; not for envs with hidden state).
"""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Optional

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import envs  # noqa: E402
from agents import sqirl  # noqa: E402
from jaxrl_pref import study  # noqa: E402
from jaxrl_pref.config import ConfigError, cli, in_range, positive, require  # noqa: E402
from jaxrl_pref.logging import read_metrics  # noqa: E402


# -- the exact analysis ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TabularMDP:
    """Finite-horizon deterministic MDP by levels: level ``t`` has ``n_t`` states; ``next[t]`` ``[n_t, A]`` indexes
    level ``t+1`` (-1: the episode ends), ``reward[t]`` ``[n_t, A]``; ``start`` indexes level 0."""
    reward: list
    next: list
    start: np.ndarray
    num_actions: int

    @property
    def num_states(self) -> int:
        return sum(len(r) for r in self.reward)


class NotTabular(ValueError):
    """The task is stochastic or too large to enumerate."""


def enumerate_mdp(name: str, horizon: Optional[int] = None, max_states: int = 200_000, num_resets: int = 256,
                  seed: int = 0, **env_kwargs) -> TabularMDP:
    """Enumerates the reachable ``(t, state)`` pairs of JAX task ``name`` up to ``horizon`` (default: its time
    limit). Raises :class:`NotTabular` if a transition depends on the step key or the states exceed ``max_states``."""
    env, params = envs._base(name, env_kwargs)  # the unwrapped task (step_env/reset_env)
    A = int(env.action_space(params).n)
    H = int(horizon or params.max_steps_in_episode)
    keys = jax.random.split(jax.random.PRNGKey(seed), num_resets)
    obs0, st0 = jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))(keys, params)

    def step_all(states, key):  # every state x every action, with one key (and a second key to test determinism)
        n = jax.tree.leaves(states)[0].shape[0]
        s = jax.tree.map(lambda x: jnp.repeat(x, A, axis=0), states)
        a = jnp.tile(jnp.arange(A), n)
        f = jax.vmap(env.step_env, in_axes=(None, 0, 0, None))
        o1, s1, r1, d1, _ = f(key, s, a, params)
        o2, _, r2, d2, _ = f(jax.random.fold_in(key, 1), s, a, params)
        same = jnp.all((o1 == o2).reshape(o1.shape[0], -1), axis=1) & (r1 == r2) & (d1 == d2)
        return o1, s1, r1, d1, same

    step_all = jax.jit(step_all)

    def dedupe(obs, states):
        o = np.asarray(obs).reshape(obs.shape[0], -1)
        _, first, inverse = np.unique(o, axis=0, return_index=True, return_inverse=True)
        return jax.tree.map(lambda x: x[first], states), inverse.reshape(-1)

    level, start = dedupe(obs0, st0)
    rewards, nexts = [], []
    for t in range(H):
        n = jax.tree.leaves(level)[0].shape[0]
        o, s, r, d, same = step_all(level, jax.random.PRNGKey(t))
        if not bool(np.asarray(same).all()):
            raise NotTabular(f"{name}: transitions depend on the random key (stochastic); no exact enumeration")
        done = np.asarray(d, bool) | (t == H - 1)
        keep = np.flatnonzero(~done)
        nxt = np.full(n * A, -1)
        if keep.size:
            sub = jax.tree.map(lambda x: x[keep], s)
            level_next, inv = dedupe(o[keep], sub)
            nxt[keep] = inv
        else:
            level_next = None
        rewards.append(np.asarray(r, np.float64).reshape(n, A))
        nexts.append(nxt.reshape(n, A))
        if sum(len(x) for x in rewards) > max_states:
            raise NotTabular(f"{name}: more than {max_states} reachable (timestep, state) pairs")
        if level_next is None:
            break
        level = level_next
    return TabularMDP(rewards, nexts, np.unique(start), A)


def _backup(mdp: TabularMDP, gamma: float, value_of_next) -> list:
    """Q[t] = r + gamma * V_next[next] (0 where the episode ends), with V_next = value_of_next(Q[t+1])."""
    q = [None] * len(mdp.reward)
    for t in reversed(range(len(mdp.reward))):
        nxt = mdp.next[t]
        v = value_of_next(q[t + 1]) if t + 1 < len(q) else np.zeros(1)
        q[t] = mdp.reward[t] + gamma * np.where(nxt >= 0, v[np.maximum(nxt, 0)], 0.0)
    return q


def q_heads(mdp: TabularMDP, gamma: float, k: int) -> list:
    """``[Q_1, ..., Q_k]``: Q_1 = Q^rand, Q_j = one optimality backup of Q_{j-1} (each a list over levels)."""
    heads = [_backup(mdp, gamma, lambda q: q.mean(axis=1))]
    for _ in range(k - 1):
        prev = heads[-1]
        heads.append([mdp.reward[t] + gamma * np.where(mdp.next[t] >= 0,
                                                       (prev[t + 1].max(axis=1) if t + 1 < len(prev) else
                                                        np.zeros(1))[np.maximum(mdp.next[t], 0)], 0.0)
                      for t in range(len(prev))])
    return heads


def q_star(mdp: TabularMDP, gamma: float) -> list:
    return _backup(mdp, gamma, lambda q: q.max(axis=1))


def optimal_path_states(mdp: TabularMDP, qs: list, tol: float = 1e-9) -> list:
    """Per level, the states reached from the start states by following any optimal action."""
    on = [np.zeros(len(r), bool) for r in mdp.reward]
    on[0][mdp.start] = True
    for t in range(len(mdp.reward) - 1):
        opt = qs[t] >= qs[t].max(axis=1, keepdims=True) - tol
        nxt = mdp.next[t][on[t][:, None] & opt & (mdp.next[t] >= 0)]
        on[t + 1][nxt] = True
    return on


@dataclasses.dataclass
class HorizonReport:
    task: str
    horizon: int
    num_states: int
    num_actions: int
    k_star: Optional[int]           # smallest k whose greedy policy is optimal on the optimal trajectories
    gaps: list                      # gap_k for k = 1..max_k (<= 0: greedy on Q_k errs somewhere)
    h_hat: float                    # min_k (k + log_A m_k)
    optimal_return: float
    random_return: float


def analyse(name: str, gamma: float = 1.0, max_k: Optional[int] = None, **kwargs) -> HorizonReport:
    """Exact ``k*``, per-k gaps and the ``H_hat`` proxy for a deterministic tabular JAX task (see module doc)."""
    mdp = enumerate_mdp(name, **kwargs)
    H = len(mdp.reward)
    max_k = max_k or H
    qs = q_star(mdp, gamma)
    heads = q_heads(mdp, gamma, max_k)
    on = optimal_path_states(mdp, qs)
    R = max(float(q.max()) for q in qs) - min(float(q.min()) for q in heads[0])
    R = R if R > 0 else 1.0
    A = mdp.num_actions
    k_star, gaps, h_hat = None, [], math.inf
    for k, head in enumerate(heads, start=1):
        ok, gap = True, math.inf
        for t in range(H):
            if not on[t].any():
                continue
            q, h = qs[t][on[t]], head[t][on[t]]
            opt = q >= q.max(axis=1, keepdims=True) - 1e-9
            chosen = np.argmax(h, axis=1)
            ok &= bool(opt[np.arange(len(h)), chosen].all())
            best_opt = np.where(opt, h, -np.inf).max(axis=1)
            best_bad = np.where(~opt, h, -np.inf).max(axis=1)
            g = best_opt - best_bad
            g = g[np.isfinite(g)]
            if g.size:
                gap = min(gap, float(g.min()))
        gaps.append(gap)
        if ok and k_star is None:
            k_star = k
        if gap > 0:
            m = math.ceil(2 * (R / gap) ** 2 * math.log(2 * A)) if math.isfinite(gap) else 1
            h_hat = min(h_hat, k + math.log(m, A))
    v_rand = heads[0][0].mean(axis=1)[mdp.start].mean()
    return HorizonReport(name, H, mdp.num_states, A, k_star, gaps, h_hat, float(qs[0].max(axis=1)[mdp.start].mean()),
                         float(v_rand))


# -- the study -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Options:
    """Effective-horizon table and plot."""
    tasks: tuple[str, ...] = ("DeepSea-4", "DeepSea-6", "DeepSea-8", "KeyDoor-5")
    max_k: int = 3
    """Largest planning depth tried (exact gaps are listed up to this k too)."""
    gamma: float = 0.99
    episodes: int = 64
    """SQIRL episodes per timestep for the empirical estimate."""
    num_seeds: int = 2
    threshold: float = 0.9
    """Mean greedy success that counts as solved."""
    empirical: bool = True
    """Run the SQIRL sweep (False: exact analysis only, seconds)."""
    seed: int = 0
    out: str = "runs/effective_horizon"

    def __post_init__(self):
        positive(self, "max_k", "episodes", "num_seeds")
        in_range(self, "gamma", 0.0, 1.0)
        in_range(self, "threshold", 0.0, 1.0)
        require(len(self.tasks) > 0, "tasks", "no task given", "pass e.g. --tasks DeepSea-6 KeyDoor-5")
        for t in self.tasks:
            sqirl.Config(env_name=t)


def exact(task: str, o: Options) -> dict:
    try:
        r = analyse(task, gamma=o.gamma, max_k=None)
    except NotTabular as e:
        return {"exact": False, "why": str(e)}
    return {"exact": True, "horizon": r.horizon, "states": r.num_states, "k_star": r.k_star,
            "gaps": r.gaps[:o.max_k], "all_gaps": r.gaps, "h_hat": r.h_hat, "v_opt": r.optimal_return,
            "v_rand": r.random_return}


def empirical(task: str, o: Options) -> dict:
    """SQIRL at depths 1..max_k x seeds, one vmapped run through the runner in ``OUT/<task>/sqirl``."""
    cfg = sqirl.Config(env_name=task, episodes_per_timestep=o.episodes, planning_depth=o.max_k, gamma=o.gamma,
                       eval_episodes=16)
    ks = np.repeat(np.arange(1, o.max_k + 1), o.num_seeds)
    hp = sqirl.hparams(cfg, planning_depth=jnp.asarray(ks))
    result = study.train(f"{task}/sqirl", sqirl.make_trainer, cfg, Path(o.out) / task / "sqirl", num_seeds=len(ks),
                         seed=o.seed, hp=hp, hp_batched=True, num_updates=cfg.num_updates,
                         steps_per_update=cfg.steps_per_update, log_every=1, agent="sqirl",
                         module="experiments.effective_horizon", run_info={"study": "effective_horizon"})
    m = read_metrics(result.paths["metrics_csv"])
    succ = m["episode_success"][:, -1].reshape(o.max_k, o.num_seeds)
    mean = np.nanmean(succ, axis=1)
    solved = [k for k in range(1, o.max_k + 1) if mean[k - 1] >= o.threshold]
    return {"success_by_k": mean.tolist(), "k_emp": solved[0] if solved else None,
            "steps": int(cfg.steps_per_update * cfg.num_updates), "seconds": result.compile_s + result.train_s}


def main(argv: Optional[list] = None) -> int:
    o = cli(Options, argv, description=__doc__.split("\n\n")[0])
    rows = []
    for task in o.tasks:
        row = {"task": task, **exact(task, o)}
        if o.empirical:
            try:
                row.update(empirical(task, o))
            except (ConfigError, study.Stopped) as e:  # a run dir of other settings; a signal
                return study.failure_status(e)
        rows.append(row)
        print(task, {k: v for k, v in row.items() if k not in ("all_gaps",)}, flush=True)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = lambda x: "n/a" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))  # noqa: E731
    head = ["task", "H", "states (t,s)", "k* (exact)", *(f"gap_{k}" for k in range(1, o.max_k + 1)), "H_hat",
            "V* / V_rand"]
    if o.empirical:
        head += [f"SQIRL success k={k}" for k in range(1, o.max_k + 1)] + [
            f"min k (success >= {o.threshold})", "env steps / run"]
    lines = [f"Effective-horizon estimates (gamma={o.gamma}; SQIRL: {o.episodes} episodes/timestep, "
             f"{o.num_seeds} seeds)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for r in rows:
            if r["exact"]:
                cells = [r["task"], r["horizon"], r["states"], r["k_star"], *r["gaps"],
                         *([None] * (o.max_k - len(r["gaps"]))), r["h_hat"], f"{r['v_opt']:.3f} / {r['v_rand']:.3f}"]
            else:
                cells = [r["task"], sqirl.Config(env_name=r["task"]).resolved_horizon(), "n/a (stochastic)", None,
                         *([None] * o.max_k), None, "n/a"]
            if o.empirical:
                cells += [*r["success_by_k"], r["k_emp"] if r["k_emp"] else f">{o.max_k}", r["steps"]]
            w.writerow(cells)
            lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2 if o.empirical else 1, figsize=(10 if o.empirical else 5, 3.8), squeeze=False)
        ax = axes[0][0]
        for r in rows:
            if r["exact"]:
                g = np.array(r["all_gaps"], float)
                ax.semilogy(np.arange(1, len(g) + 1), np.where(g > 0, g, np.nan), marker="o", label=r["task"])
        ax.set_xlabel("planning depth k")
        ax.set_ylabel("gap_k (exact Q margin)")
        ax.set_title("margin random-rollout estimates must resolve")
        ax.legend(fontsize=8)
        if o.empirical:
            ax = axes[0][1]
            for r in rows:
                ax.plot(np.arange(1, o.max_k + 1), r["success_by_k"], marker="o", label=r["task"])
            ax.axhline(o.threshold, color="gray", ls=":")
            ax.set_xlabel("planning depth k")
            ax.set_ylabel("SQIRL greedy success")
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"SQIRL, {o.episodes} episodes / timestep")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "effective_horizon.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    print((out / "table.md").read_text())
    print(f"wrote {out}/table.md, table.csv, effective_horizon.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
