"""PPO vs ONI (each reward model) on NetHack/MiniHack tasks, several seeds: a table and a plot.

    python -m experiments.oni_compare --envs MiniHack-KeyRoom-Fixed-S5-v0 NetHackStaircase-v0 \\
        --seeds 0 1 2 --total-timesteps 300000 --out runs/oni_compare

Each (env, method, seed) is one ``python -m experiments.ppo`` / ``python -m experiments.oni`` process in
``out/<env>/<method>/seed<seed>/`` (its output also in ``run.log`` there), one after another
(:func:`jaxrl_pref.study.run_grid`): an interrupted comparison resumes (finished runs are kept by their ``done``
marker, unfinished ones continue from their checkpoint), and a run that fails stops it (exit 1) naming the run, its
command and its log. Method ``ppo`` is the extrinsic-only baseline; ``oni-<model>`` uses the embedded annotator unless
``--oni-args`` says otherwise (e.g. ``--oni-args "--annotator openai --llm-base-url ... --llm-model ..."``).
Writes ``out/results.md`` (final return and success rate: mean +- std over seeds of the last 20% of updates),
``out/results.json`` and ``out/curves.png``.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import numpy as np

from jaxrl_pref import study
from jaxrl_pref.stats import final_score
from jaxrl_pref.study import Run

METHODS = ("ppo", "oni-retrieval", "oni-classification", "oni-ranking")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    envs: tuple[str, ...] = ("MiniHack-KeyRoom-Fixed-S5-v0", "NetHackStaircase-v0")
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    total_timesteps: int = 200_000
    num_envs: int = 16
    num_steps: int = 32
    out: str = "runs/oni_compare"
    oni_args: str = ""
    """Extra flags for every ONI run (e.g. --ext-coef 0.1 --annotator openai ...)."""
    common_args: str = ""
    """Extra flags for every run (PPO and ONI)."""

    def __post_init__(self):
        from jaxrl_pref.config import require
        bad = [m for m in self.methods if m not in METHODS]
        require(not bad, "methods", f"unknown {bad}", f"choose from {' '.join(METHODS)}")
        require(len(self.seeds) > 0 and len(self.envs) > 0, "seeds", "need at least one env and seed",
                "pass --envs ... --seeds 0 1 2")
        require(self.total_timesteps >= self.num_envs * self.num_steps, "total_timesteps",
                "less than one update", f"pass at least {self.num_envs * self.num_steps}")


def run_of(cfg: CompareConfig, env: str, method: str, seed: int) -> Run:
    """The run of one (env, method, seed), in ``OUT/<env>/<method>/seed<seed>``."""
    common = ["--env", env, "--seed", str(seed), "--total-timesteps", str(cfg.total_timesteps),
              "--num-envs", str(cfg.num_envs), "--num-steps", str(cfg.num_steps), "--log-every", "5",
              *shlex.split(cfg.common_args)]
    run_dir = Path(cfg.out) / env / method / f"seed{seed}"
    if method == "ppo":
        return Run(f"{env}/{method}/seed{seed}", "experiments.ppo", common, run_dir)
    return Run(f"{env}/{method}/seed{seed}", "experiments.oni",
               [*common, "--reward-model", method.split("-", 1)[1], *shlex.split(cfg.oni_args)], run_dir)


def summarise(cfg: CompareConfig, runs: dict) -> dict:
    from jaxrl_pref.logging import read_metrics
    out = {}
    for (env, method), dirs in runs.items():
        finals, succ, curves = [], [], []
        for d in dirs:
            m = read_metrics(d / "metrics.csv")
            r = np.asarray(m["episode_return"], np.float64).ravel()
            finals.append(final_score(r, frac=0.2))  # the last 20% of updates
            if "episode_success" in m:
                s = np.asarray(m["episode_success"], np.float64).ravel()
                succ.append(final_score(s, frac=0.2))
            curves.append((np.asarray(m["env_steps"]).ravel(), r))
        out[(env, method)] = {"return_mean": float(np.nanmean(finals)), "return_std": float(np.nanstd(finals)),
                              "success_mean": float(np.nanmean(succ)) if succ else None,
                              "seeds": len(dirs), "curves": curves}
    return out


def write_report(cfg: CompareConfig, res: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(cfg.out)
    lines = [f"# PPO vs ONI ({cfg.total_timesteps} env steps, seeds {list(cfg.seeds)})", "",
             "| env | method | final return (mean +- std) | success | seeds |", "|---|---|---|---|---|"]
    for (env, method), v in res.items():
        s = "-" if v["success_mean"] is None else f"{v['success_mean']:.2f}"
        lines.append(f"| {env} | {method} | {v['return_mean']:.3f} +- {v['return_std']:.3f} | {s} | {v['seeds']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({f"{e}/{m}": {k: v for k, v in d.items() if k != "curves"}
                                                  for (e, m), d in res.items()}, indent=2))
    fig, axes = plt.subplots(1, len(cfg.envs), figsize=(6 * len(cfg.envs), 4), squeeze=False)
    for ax, env in zip(axes[0], cfg.envs):
        for method in cfg.methods:
            v = res.get((env, method))
            if not v:
                continue
            n = min(len(r) for _, r in v["curves"])
            x = v["curves"][0][0][:n]
            ys = np.stack([r[:n] for _, r in v["curves"]])
            with np.errstate(all="ignore"):
                mu = np.nanmean(ys, 0)
            ok = ~np.isnan(mu)
            ax.plot(x[ok], mu[ok], label=method)
        ax.set_title(env)
        ax.set_xlabel("env steps")
        ax.set_ylabel("episode return")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    print("\n".join(lines))


def main(argv=None) -> int:
    from jaxrl_pref.config import cli
    cfg = cli(CompareConfig, argv, description=__doc__.split("\n\n")[0])
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    grid = {(env, method): [run_of(cfg, env, method, s) for s in cfg.seeds]
            for env in cfg.envs for method in cfg.methods}
    try:
        study.run_grid([r for rs in grid.values() for r in rs])
    except (study.RunFailed, study.Stopped) as e:
        return study.failure_status(e)
    write_report(cfg, summarise(cfg, {k: [r.run_dir for r in rs] for k, rs in grid.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
