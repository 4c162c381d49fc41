"""HERON vs PPO on the hand-designed weighted-sum reward vs PPO on the top-ranked factor alone, several seeds.

    python -m experiments.heron_compare                              # both tasks, defaults below
    python -m experiments.heron_compare --tasks pendulum --num-seeds 5 --total-timesteps 1000000

For each task every method trains ``num_seeds`` seeds (vmapped, one compiled program per method) with the same
PPO settings; only the reward PPO learns from differs:

* ``heron``        -- the preference reward model trained online from hierarchical comparisons (``agents.heron``);
* ``ppo_weighted`` -- the task's own reward, i.e. the ground-truth weighted sum of the factors;
* ``ppo_top``      -- the top-ranked factor alone (direction-signed).

Baseline rewards are divided by their running std (HERON's model output is normalised too).

All are scored by the task's own episode return (the ground-truth weighted sum). Outputs in ``--out-dir``:
``results.json`` (per-seed curves), ``results.md`` (the table), ``<task>.png`` (mean +- std curves).
The score of a run is the mean episode return over its last ``--final-frac`` of updates.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

from agents import heron, ppo  # noqa: E402
from jaxrl_pref.config import ConfigError, cli, require  # noqa: E402
from jaxrl_pref.rewards import ScaledSum  # noqa: E402

METHODS = ("heron", "ppo_weighted", "ppo_top")

# Per task: env, PPO settings shared by all methods, HERON ranking and margins.
_PPO = dict(clip_value=False)  # value clipping (+-0.2) stalls the critic on unit-scale rewards; off for every method
TASKS = {
    # PPO settings of the README's Pendulum example (which learns with them); HERON compares 4-step segments,
    # angle first with margin 0 (a margin on the angle lets "hang still" win on speed)
    "pendulum": dict(env_name="PendulumFactors-v1", num_envs=4, num_steps=1024, update_epochs=10,
                     num_minibatches=64, learning_rate=3e-4, gamma=0.9, ent_coef=0.0, normalize_obs=True, **_PPO,
                     factors=("angle", "speed", "energy"), margins=(0.0, 1.0, 1.0), segment_len=4, rm_updates=32),
    "mountaincar": dict(env_name="MountainCarContinuousFactors-v0", num_envs=16, num_steps=128, update_epochs=4,
                        num_minibatches=8, learning_rate=3e-4, gamma=0.99, ent_coef=0.0, normalize_obs=True, **_PPO,
                        factors=("goal", "energy"), margins=(0.0, 1.0), segment_len=8, rm_updates=16),
    # the same task, with the user also ranking a shaping factor (the car's mechanical energy) above action cost
    "mountaincar_swing": dict(env_name="MountainCarContinuousFactors-v0", num_envs=16, num_steps=128,
                              update_epochs=4, num_minibatches=8, learning_rate=3e-4, gamma=0.99, ent_coef=0.0,
                              normalize_obs=True, **_PPO, factors=("goal", "swing", "energy"),
                              margins=(0.0, 0.5, 1.0), segment_len=8, rm_updates=16),
}


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings of the comparison."""
    tasks: tuple[str, ...] = ("pendulum", "mountaincar")
    methods: tuple[str, ...] = METHODS
    num_seeds: int = 3
    total_timesteps: int = 500_000
    out_dir: str = "runs/heron_compare"
    final_frac: float = 0.1
    """Fraction of the last updates averaged into a run's score."""

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        require(not bad, "tasks", f"unknown task(s) {bad}", f"use some of {sorted(TASKS)}")
        bad = [m for m in self.methods if m not in METHODS]
        require(not bad, "methods", f"unknown method(s) {bad}", f"use some of {METHODS}")
        require(self.num_seeds >= 1, "num_seeds", f"must be >= 1, got {self.num_seeds}", "pass e.g. --num-seeds 3")
        require(0 < self.final_frac <= 1, "final_frac", f"must lie in (0, 1], got {self.final_frac}",
                "pass e.g. --final-frac 0.1")


def task_config(task: str, total_timesteps: int) -> heron.Config:
    return heron.Config(total_timesteps=total_timesteps, **TASKS[task])


def make_program(cfg: heron.Config, method: str):
    if method == "heron":
        return heron.make_train(cfg)
    kind = {"ppo_weighted": "weighted", "ppo_top": "top"}[method]
    # every method learns from a normalised reward: HERON's model normalises its output; the baselines' rewards
    # are divided by their running std (ScaledSum), as NormalizeReward would do for an env reward
    reward = ScaledSum(heron.baseline_reward(cfg, kind), ext_coef=0.0, int_coef=1.0, normalize=True)
    return ppo.make_train(cfg.ppo_config(), reward=reward)


def run_method(cfg: heron.Config, method: str, num_seeds: int) -> dict:
    train = make_program(cfg, method)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(num_seeds))

    def fn(key):
        m = train(key).metrics
        return {k: v for k, v in m.items() if k.startswith("episode_") or k.startswith("reward/heron_accuracy")}

    t = time.perf_counter()
    compiled = jax.jit(jax.vmap(fn)).lower(keys).compile()
    t_compile = time.perf_counter() - t
    t = time.perf_counter()
    out = jax.device_get(jax.block_until_ready(compiled(keys)))
    t_run = time.perf_counter() - t
    return {"metrics": {k: np.asarray(v) for k, v in out.items()}, "compile_s": t_compile, "run_s": t_run}


def score(returns: np.ndarray, frac: float) -> np.ndarray:
    """Per-seed mean episode return over the last ``frac`` of updates (updates with no finished episode skipped)."""
    n = max(1, int(round(returns.shape[-1] * frac)))
    return np.nanmean(returns[..., -n:], axis=-1)


def _fill_nan(x: np.ndarray) -> np.ndarray:
    """Carries the last finished episode's return forward over updates where none finished (for plotting)."""
    out = x.copy()
    for s in range(out.shape[0]):
        last = np.nan
        for j in range(out.shape[1]):
            if np.isnan(out[s, j]):
                out[s, j] = last
            else:
                last = out[s, j]
    return out


def plot(task: str, cfg: heron.Config, curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = cfg.num_envs * cfg.num_steps
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, ret in curves.items():
        r = _fill_nan(ret)
        x = (np.arange(r.shape[1]) + 1) * steps
        with warnings.catch_warnings():  # updates before any seed finished an episode are all-NaN: not drawn
            warnings.simplefilter("ignore", RuntimeWarning)
            mu, sd = np.nanmean(r, 0), np.nanstd(r, 0)
        ax.plot(x, mu, label=method)
        ax.fill_between(x, mu - sd, mu + sd, alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("episode return (task reward)")
    ax.set_title(f"{cfg.env_name}: HERON ranking {' > '.join(heron.reward_model(cfg).ranked_names)}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict:
    opts = cli(Options, argv, description=__doc__.split("\n\n")[0])
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, table = {}, ["| task | method | final return (mean +- std over seeds) | per seed | run s | compile s |",
                          "|---|---|---|---|---|---|"]
    for task in opts.tasks:
        try:
            cfg = task_config(task, opts.total_timesteps)
        except ConfigError as e:
            raise SystemExit(f"error: task {task}: {e}")
        results[task] = {"config": dataclasses.asdict(cfg), "methods": {}}
        curves = {}
        for method in opts.methods:
            r = run_method(cfg, method, opts.num_seeds)
            ret = r["metrics"]["episode_return"]
            s = score(ret, opts.final_frac)
            curves[method] = ret
            results[task]["methods"][method] = {"score": s.tolist(), "curve": ret.tolist(),
                                                "compile_s": r["compile_s"], "run_s": r["run_s"],
                                                "episode_factors": {k: score(v, opts.final_frac).tolist()
                                                                    for k, v in r["metrics"].items()
                                                                    if k.startswith("episode_factor_")}}
            line = (f"| {task} | {method} | {np.mean(s):.1f} +- {np.std(s):.1f} | "
                    f"{', '.join(f'{v:.1f}' for v in s)} | {r['run_s']:.1f} | {r['compile_s']:.1f} |")
            table.append(line)
            print(line, flush=True)
        plot(task, cfg, curves, out_dir / f"{task}.png")
    header = (f"{opts.num_seeds} seeds x {opts.total_timesteps:,} env steps per run; score = mean episode return "
              f"(task reward) over the last {opts.final_frac:.0%} of updates.\n\n")
    (out_dir / "results.md").write_text(header + "\n".join(table) + "\n")
    (out_dir / "results.json").write_text(json.dumps({"options": dataclasses.asdict(opts), "results": results}))
    print(f"wrote {out_dir}/results.md, results.json, " + ", ".join(f"{t}.png" for t in opts.tasks))
    return results


if __name__ == "__main__":
    main()
