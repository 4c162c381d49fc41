"""SQIRL vs PPO on sparse-reward JAX tasks at matched env steps, several seeds: a table and a plot.

    python -m experiments.sqirl_vs_ppo                                  # default small budget (CPU minutes)
    python -m experiments.sqirl_vs_ppo --tasks DeepSea-8 KeyDoor-5 --num-seeds 8 --episodes 64 128

For each task SQIRL runs ``horizon`` timesteps of ``episodes_per_timestep`` episodes, i.e. ``episodes * H * H`` env
steps computed per seed (episodes that end early use fewer; both numbers are reported). PPO gets exactly that many
env steps (``total_timesteps``, rounded down to whole updates of ``--ppo-num-envs x --ppo-num-steps``). Seeds are
vmapped in one compiled program per (agent, task), seed i from ``PRNGKey(seed + i)`` as in ``python -m
experiments.sqirl --seed S``. Each (task, agent) trains through the runner (:func:`jaxrl_pref.study.train`) in
``OUT/<task>/sqirl/`` and ``OUT/<task>/ppo/`` with a command-line run's outputs (``config.json``, ``metrics.csv``,
``checkpoints/``, ...): an interrupted comparison continues where it stopped when run again (finished runs are
restored, not trained again), and the report reads the runs' ``metrics.csv`` (PPO's greedy evaluation: the restored
final policy).

Reported per task and agent (mean +- std over seeds): final success rate and return of the **greedy** policy
(SQIRL: its time-indexed greedy policy, as evaluated by the agent; PPO: argmax of the final policy's logits on
``--eval-episodes`` fresh episodes, plus the success of its stochastic training episodes in the last update).
Outputs in ``--out`` (default ``runs/sqirl_vs_ppo``): ``results.csv``, ``results.md`` (table), ``curves.png``
(success vs env steps; SQIRL's points are its greedy policy after each timestep, PPO's its training episodes), and
the runs' directories.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Optional

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import envs  # noqa: E402
from agents import ppo, sqirl  # noqa: E402
from jaxrl_pref import study  # noqa: E402
from jaxrl_pref.config import ConfigError, cli, positive, require  # noqa: E402
from jaxrl_pref.logging import read_metrics  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Options:
    """SQIRL vs PPO at matched env steps."""
    tasks: tuple[str, ...] = ("DeepSea-6", "DeepSea-10", "KeyDoor-5")
    """Sparse-reward JAX tasks with discrete actions (see envs/sparse.py)."""
    episodes: tuple[int, ...] = (128,)
    """SQIRL episodes per timestep, one value per task (or one for all); sets the env-step budget."""
    planning_depth: int = 2
    num_seeds: int = 4
    seed: int = 0
    ppo_num_envs: int = 16
    ppo_num_steps: int = 32
    ppo_learning_rate: float = 5e-4
    eval_episodes: int = 32
    out: str = "runs/sqirl_vs_ppo"

    def __post_init__(self):
        positive(self, "planning_depth", "num_seeds", "ppo_num_envs", "ppo_num_steps", "ppo_learning_rate",
                 "eval_episodes")
        require(len(self.tasks) > 0, "tasks", "no task given", "pass e.g. --tasks DeepSea-6 KeyDoor-5")
        require(len(self.episodes) in (1, len(self.tasks)), "episodes",
                f"{len(self.episodes)} values for {len(self.tasks)} tasks", "pass one value, or one per task")
        require(all(e > 0 for e in self.episodes), "episodes", f"must be positive, got {self.episodes}",
                "pass e.g. --episodes 128")
        for t in self.tasks:  # validates names and action spaces with the agents' own messages
            sqirl.Config(env_name=t)


def ppo_greedy_eval(cfg: ppo.Config, params, key, n: int, horizon: int):
    """Success / return of argmax actions of PPO's policy on ``n`` fresh episodes (first episode of each env)."""
    env, p = envs.make(cfg.env_name, num_envs=n)
    spec = envs.spec(env, p)
    agent = ppo.PPO(cfg, spec)
    obs, st = env.reset(key, p)

    def step(carry, k):
        st, obs, alive = carry
        logits, _ = agent.network.apply(params, obs)
        a = jnp.argmax(logits, -1)
        obs, st, r, te, tr, info = env.step(k, st, a, p)
        done = te | tr
        out = (info["episode_done"] & alive, info["episode_return"], info.get("episode_success", jnp.zeros(n)))
        return (st, obs, alive & ~done), out

    _, (done, ret, succ) = jax.lax.scan(step, (st, obs, jnp.ones(n, bool)), jax.random.split(key, horizon))
    cnt = jnp.maximum(done.sum(), 1)
    return (succ * done).sum() / cnt, (ret * done).sum() / cnt


def _train(task: str, agent: str, make_trainer, cfg, o: Options, **options):
    """``agent``'s seeds on ``task`` through the runner in ``OUT/<task>/<agent>``: (its result, its metrics as its
    ``metrics.csv`` holds them, this session's seconds)."""
    result = study.train(f"{task}/{agent}", make_trainer, cfg, Path(o.out) / task / agent, num_seeds=o.num_seeds,
                         seed=o.seed, agent=agent, module="experiments.sqirl_vs_ppo",
                         run_info={"study": "sqirl_vs_ppo"}, **options)
    return result, read_metrics(result.paths["metrics_csv"]), result.compile_s + result.train_s


def run_task(task: str, episodes: int, o: Options) -> dict:
    s_cfg = sqirl.Config(env_name=task, episodes_per_timestep=episodes, planning_depth=o.planning_depth,
                         eval_episodes=o.eval_episodes)
    H = s_cfg.resolved_horizon()
    budget = episodes * H * H
    _, sm, s_time = _train(task, "sqirl", sqirl.make_trainer, s_cfg, o, num_updates=s_cfg.num_updates,
                           steps_per_update=s_cfg.steps_per_update, log_every=1)

    batch = o.ppo_num_envs * o.ppo_num_steps
    p_cfg = ppo.Config(env_name=task, num_envs=o.ppo_num_envs, num_steps=o.ppo_num_steps,
                       total_timesteps=max(budget // batch, 1) * batch, learning_rate=o.ppo_learning_rate)
    p_res, pm, p_time = _train(task, "ppo", ppo.make_trainer, p_cfg, o)
    eval_keys = jax.random.split(jax.random.PRNGKey(o.seed + 1000), o.num_seeds)
    p_succ, p_ret = jax.jit(jax.vmap(lambda prm, k: ppo_greedy_eval(p_cfg, prm, k, o.eval_episodes, 4 * H)))(
        p_res.state.train_state.params, eval_keys)

    def last_valid(x):  # last non-NaN value per seed (updates without a finished episode are NaN)
        out = []
        for row in x:
            ok = row[~np.isnan(row)]
            out.append(ok[-1] if ok.size else np.nan)
        return np.array(out)

    return {
        "task": task, "horizon": H, "episodes_per_timestep": episodes, "env_steps": budget,
        "sqirl_experience_steps": float(sm["experience_steps"][:, -1].mean()),
        "ppo_env_steps": p_cfg.num_updates * batch,
        "sqirl_success": sm["episode_success"][:, -1], "sqirl_return": sm["episode_return"][:, -1],
        "ppo_greedy_success": np.asarray(p_succ), "ppo_greedy_return": np.asarray(p_ret),
        "ppo_train_success": last_valid(pm["episode_success"]) if "episode_success" in pm else np.full(o.num_seeds, np.nan),
        "sqirl_s": s_time, "ppo_s": p_time,
        "curve_sqirl": (np.arange(1, H + 1) * episodes * H, sm["episode_success"]),
        "curve_ppo": (np.arange(1, p_cfg.num_updates + 1) * batch, pm.get("episode_success")),
    }


def _ms(x) -> str:
    x = np.asarray(x, float)
    return f"{np.nanmean(x):.2f} ± {np.nanstd(x):.2f}"


def write(results: list, o: Options) -> Path:
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["sqirl_success", "sqirl_return", "ppo_greedy_success", "ppo_greedy_return", "ppo_train_success"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "horizon", "episodes_per_timestep", "env_steps", "sqirl_experience_steps", "seed"] + cols
                   + ["sqirl_wall_s", "ppo_wall_s"])
        for r in results:
            for s in range(len(r["sqirl_success"])):
                w.writerow([r["task"], r["horizon"], r["episodes_per_timestep"], r["env_steps"],
                            r["sqirl_experience_steps"], o.seed + s] + [float(r[c][s]) for c in cols]
                           + [r["sqirl_s"], r["ppo_s"]])
    lines = [f"SQIRL (k={o.planning_depth}) vs PPO at matched env steps, {o.num_seeds} seeds (mean ± std); "
             "success = greedy policy unless noted; seconds of this session, compilation included (about 0: trained "
             "before, restored).", "",
             "| task | H | env steps / seed | SQIRL success | SQIRL return | PPO greedy success | PPO greedy return "
             "| PPO train success | SQIRL s | PPO s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['task']} | {r['horizon']} | {r['env_steps']:,} (SQIRL used {r['sqirl_experience_steps']:,.0f}) | "
                     f"{_ms(r['sqirl_success'])} | {_ms(r['sqirl_return'])} | {_ms(r['ppo_greedy_success'])} | "
                     f"{_ms(r['ppo_greedy_return'])} | {_ms(r['ppo_train_success'])} | {r['sqirl_s']:.0f} | "
                     f"{r['ppo_s']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.5), squeeze=False)
        for ax, r in zip(axes[0], results):
            for name, (x, y), c in (("SQIRL (greedy)", r["curve_sqirl"], "C0"), ("PPO (training)", r["curve_ppo"], "C1")):
                if y is None:
                    continue
                m = np.nanmean(y, axis=0)
                sd = np.nanstd(y, axis=0)
                ax.plot(x, m, color=c, label=name)
                ax.fill_between(x, m - sd, m + sd, color=c, alpha=0.2)
            ax.set_title(r["task"])
            ax.set_xlabel("env steps")
            ax.set_ylabel("success rate")
            ax.set_ylim(-0.05, 1.05)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    return out


def main(argv: Optional[list] = None) -> int:
    o = cli(Options, argv, description=__doc__.split("\n\n")[0])
    results = []
    for i, task in enumerate(o.tasks):
        eps = o.episodes[i if len(o.episodes) > 1 else 0]
        try:
            r = run_task(task, eps, o)
        except (ConfigError, study.Stopped) as e:  # a run dir of other settings; a signal
            return study.failure_status(e)
        results.append(r)
        print(f"{task}: {r['env_steps']:,} env steps/seed | SQIRL success {_ms(r['sqirl_success'])} "
              f"({r['sqirl_s']:.0f}s) | PPO greedy success {_ms(r['ppo_greedy_success'])}, "
              f"train {_ms(r['ppo_train_success'])} ({r['ppo_s']:.0f}s)", flush=True)
    out = write(results, o)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.csv, results.md, curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
