"""When should SQIRL work? Effective-horizon estimates for small sparse JAX tasks: a table and a plot.

    python -m experiments.effective_horizon                                   # DeepSea-4/6/8, KeyDoor-5
    python -m experiments.effective_horizon --tasks DeepSea-10 KeyDoor-7 --max-k 3 --episodes 64 --num-seeds 4

Two estimates per task (see :mod:`jaxrl_pref.effective_horizon` for the definitions):

* **exact** (deterministic tasks with a small reachable state space, enumerated by stepping the JAX env): ``k*``,
  the smallest planning depth whose greedy policy on ``T^{k-1} Q^rand`` is optimal; the margin ``gap_k`` that the
  random-rollout estimates must resolve; and the proxy ``H_hat = min_k (k + log_A m_k)``. Stochastic tasks are
  reported as "n/a".
* **empirical**: SQIRL itself, vmapped over ``k = 1..max_k`` and seeds at ``--episodes`` episodes per timestep; the
  smallest k whose greedy policy reaches ``--threshold`` mean success (">max_k" if none). This is the minimal k for
  which *random-rollout* Q-estimates (with function approximation and that sample budget) pick optimal actions.

Outputs in ``--out`` (default ``runs/effective_horizon``): ``table.md``, ``table.csv``, ``effective_horizon.png``
(left: exact gap_k vs k, log scale; right: SQIRL success vs k).
"""
from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path
from typing import Optional

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from agents import sqirl  # noqa: E402
from jaxrl_pref import effective_horizon as eh  # noqa: E402
from jaxrl_pref.config import cli, in_range, positive, require  # noqa: E402


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
        r = eh.analyse(task, gamma=o.gamma, max_k=None)
    except eh.NotTabular as e:
        return {"exact": False, "why": str(e)}
    return {"exact": True, "horizon": r.horizon, "states": r.num_states, "k_star": r.k_star,
            "gaps": r.gaps[:o.max_k], "all_gaps": r.gaps, "h_hat": r.h_hat, "v_opt": r.optimal_return,
            "v_rand": r.random_return}


def empirical(task: str, o: Options) -> dict:
    cfg = sqirl.Config(env_name=task, episodes_per_timestep=o.episodes, planning_depth=o.max_k, gamma=o.gamma,
                       eval_episodes=16)
    ks = np.repeat(np.arange(1, o.max_k + 1), o.num_seeds)
    hp = sqirl.hparams(cfg, planning_depth=jnp.asarray(ks))
    keys = jnp.tile(jax.random.split(jax.random.PRNGKey(o.seed), o.num_seeds), (o.max_k, 1))
    t0 = time.perf_counter()
    out = jax.block_until_ready(jax.jit(jax.vmap(sqirl.make_train(cfg)))(keys, hp))
    succ = np.asarray(out.metrics["episode_success"])[:, -1].reshape(o.max_k, o.num_seeds)
    mean = np.nanmean(succ, axis=1)
    solved = [k for k in range(1, o.max_k + 1) if mean[k - 1] >= o.threshold]
    return {"success_by_k": mean.tolist(), "k_emp": solved[0] if solved else None,
            "steps": int(cfg.steps_per_update * cfg.num_updates), "seconds": time.perf_counter() - t0}


def main(argv: Optional[list] = None) -> int:
    o = cli(Options, argv, description=__doc__.split("\n\n")[0])
    rows = []
    for task in o.tasks:
        row = {"task": task, **exact(task, o)}
        if o.empirical:
            row.update(empirical(task, o))
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
