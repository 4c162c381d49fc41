"""HERON vs PPO on the hand-designed weighted-sum reward vs PPO on the top-ranked factor alone, several seeds.

    python -m experiments.heron_compare                              # both tasks, defaults below
    python -m experiments.heron_compare --tasks pendulum --num-seeds 5 --total-timesteps 1000000

For each task every method trains ``num_seeds`` seeds (vmapped, one compiled program per method) with the same
PPO settings; only the reward PPO learns from differs:

* ``heron``        -- the preference reward model trained online from hierarchical comparisons (``agents.heron``);
* ``ppo_weighted`` -- the task's own reward, i.e. the ground-truth weighted sum of the factors;
* ``ppo_top``      -- the top-ranked factor alone (direction-signed).

Baseline rewards are divided by their running std (HERON's model output is normalised too).

All are scored by the task's own episode return (the ground-truth weighted sum). Each (task, method) trains
through the runner (:func:`jaxrl_pref.study.train`) in ``OUT_DIR/<task>/<method>/`` with a command-line run's
outputs (``config.json``, ``metrics.csv``, ``learning_curve.png``, ``tb/``, ``checkpoints/``, a chunk of
``--checkpoint-every`` updates per checkpoint): an interrupted comparison continues where it stopped when run again
(finished runs are restored, not trained again), and the report reads the runs' ``metrics.csv``. Outputs in
``--out-dir``: ``results.json`` (per-seed curves), ``results.md`` (the table), ``<task>.png`` (mean +- std curves).
The score of a run is the mean episode return over its last ``--final-frac`` of updates.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

from agents import heron, ppo  # noqa: E402
from agents.heron import TASKS, task_config  # noqa: E402
from jaxrl_pref import study  # noqa: E402
from jaxrl_pref.config import ConfigError, cli, require  # noqa: E402
from jaxrl_pref.logging import read_metrics  # noqa: E402
from jaxrl_pref.rewards import ScaledSum  # noqa: E402
from jaxrl_pref.stats import final_score  # noqa: E402

METHODS = ("heron", "ppo_weighted", "ppo_top")


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
    checkpoint_every: int = 100
    """Updates per compiled chunk; each run saves a checkpoint after each (a resumed run needs the same value)."""

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        require(not bad, "tasks", f"unknown task(s) {bad}", f"use some of {sorted(TASKS)}")
        bad = [m for m in self.methods if m not in METHODS]
        require(not bad, "methods", f"unknown method(s) {bad}", f"use some of {METHODS}")
        require(self.num_seeds >= 1, "num_seeds", f"must be >= 1, got {self.num_seeds}", "pass e.g. --num-seeds 3")
        require(0 < self.final_frac <= 1, "final_frac", f"must lie in (0, 1], got {self.final_frac}",
                "pass e.g. --final-frac 0.1")
        require(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}",
                "pass e.g. --checkpoint-every 100")


def reward(cfg: heron.Config, method: str):
    """The reward PPO learns from under ``method``: every method learns from a normalised reward (HERON's model
    normalises its output; the baselines' rewards are divided by their running std (ScaledSum), as NormalizeReward
    would do for an env reward)."""
    if method == "heron":
        return heron.reward_model(cfg)
    kind = {"ppo_weighted": "weighted", "ppo_top": "top"}[method]
    return ScaledSum(heron.baseline_reward(cfg, kind), ext_coef=0.0, int_coef=1.0, normalize=True)


def run_method(cfg: heron.Config, task: str, method: str, opts: Options) -> dict:
    """Trains (or continues, or restores) ``method``'s seeds on ``task`` in ``OUT_DIR/<task>/<method>``, seed i
    from ``PRNGKey(i)``; returns its metrics as its ``metrics.csv`` holds them (``[seeds, updates]``) and this
    session's compile and training seconds (None: trained before)."""
    r = reward(cfg, method)
    make = lambda c, log_fn=None, log_every=1: ppo.make_trainer(  # noqa: E731
        c.ppo_config(), reward=r, log_fn=log_fn, log_every=log_every)
    result = study.train(f"{task}/{method}", make, cfg, Path(opts.out_dir) / task / method,
                         num_seeds=opts.num_seeds, checkpoint_every=opts.checkpoint_every, agent=method,
                         module="experiments.heron_compare", run_info={"study": "heron_compare", "task": task})
    trained = result.updates_done > (result.resumed_from or 0)
    return {"metrics": read_metrics(result.paths["metrics_csv"]), "compile_s": result.compile_s if trained else None,
            "run_s": result.train_s if trained else None}


def score(returns: np.ndarray, frac: float) -> np.ndarray:
    """Per-seed mean episode return over the last ``frac`` of updates, rounded to the nearest (updates with no
    finished episode skipped; :func:`jaxrl_pref.stats.final_score`)."""
    return final_score(returns, frac=frac, rounding="round")


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
            try:
                r = run_method(cfg, task, method, opts)
            except (ConfigError, study.Stopped) as e:  # its run dir holds a run of other settings; a signal
                raise SystemExit(study.failure_status(e)) from None
            ret = r["metrics"]["episode_return"]
            s = score(ret, opts.final_frac)
            curves[method] = ret
            results[task]["methods"][method] = {"score": s.tolist(), "curve": ret.tolist(),
                                                "compile_s": r["compile_s"], "run_s": r["run_s"],
                                                "episode_factors": {k: score(v, opts.final_frac).tolist()
                                                                    for k, v in r["metrics"].items()
                                                                    if k.startswith("episode_factor_")}}
            secs = " | ".join("-" if r[k] is None else f"{r[k]:.1f}" for k in ("run_s", "compile_s"))
            line = (f"| {task} | {method} | {np.mean(s):.1f} +- {np.std(s):.1f} | "
                    f"{', '.join(f'{v:.1f}' for v in s)} | {secs} |")
            table.append(line)
            print(line, flush=True)
        plot(task, cfg, curves, out_dir / f"{task}.png")
    header = (f"{opts.num_seeds} seeds x {opts.total_timesteps:,} env steps per run; score = mean episode return "
              f"(task reward) over the last {opts.final_frac:.0%} of updates; seconds of this session (-: trained "
              "before).\n\n")
    (out_dir / "results.md").write_text(header + "\n".join(table) + "\n")
    (out_dir / "results.json").write_text(json.dumps({"options": dataclasses.asdict(opts), "results": results}))
    print(f"wrote {out_dir}/results.md, results.json, " + ", ".join(f"{t}.png" for t in opts.tasks))
    return results


if __name__ == "__main__":
    main()
