"""The sparse-reward study: which method solves what, at a budget 2 CPU cores can run.

    python -m experiments.sparse_study                                  # every task x method below, 3 seeds
    python -m experiments.sparse_study --tasks doorkey16 --methods ppo e3b --num-seeds 5 --out runs/study
    python -m experiments.sparse_study --scale 0.1                      # a smoke run: a tenth of each budget

Each (task, method) is one ``python -m experiments.<agent>`` run through the common CLI (seeds vmapped in one
process on JAX tasks; one process per seed on the NetHack/MiniHack pool), in ``OUT/<task>/<method>/`` (its output
also in ``run.log`` there), one after another (:func:`jaxrl_pref.study.run_grid`). An interrupted study resumes: a
finished run is kept (its ``done`` marker), an unfinished one continues from its checkpoint; Ctrl-C or SIGTERM lets
the running run save first. A run that fails stops the study (exit 1) naming it, its command and its log. Methods
share every PPO setting of their task; only the reward differs:

* ``ppo``  -- the env reward;
* ``rnd``  -- + Random Network Distillation (``--bonus rnd``), learned by PPO's one critic with the env reward;
* ``rnd-head`` -- the same bonus with its own value head and non-episodic return (``--bonus rnd --bonus-value-head``,
  Burda et al.'s form);
* ``e3b``  -- + the elliptical episodic bonus (``--bonus e3b``);
* ``oni-retrieval`` / ``oni-classification`` / ``oni-ranking`` -- ONI with that reward model (``experiments.oni``,
  the embedded annotator unless ``--extra-args`` says otherwise; in the jitted loop on captioned JAX tasks);
* ``motif`` -- Motif (``experiments.oni --method motif``; its dataset, pairs and model in ``OUT/<task>/motif-data``,
  shared by the seeds);
* ``ellm`` -- ELLM-BoW (``experiments.oni --method ellm``).

Every method runs by default (about 2 hours on 2 CPU cores; docs/sparse_study.md has the measured table); pass
``--methods`` / ``--tasks`` for a part. A method that cannot run on a task (LLM feedback on a task without messages)
is skipped and said so.

Scores per seed: the success rate of the episodes that ended in the last tenth of the updates, their return likewise,
and the env steps to 50% success (the first update where the success rate of the episodes that ended in the last 5
updates reaches 0.5; runs that never do count at the budget and are reported as "k/n reached"). The table gives mean and 95%
confidence interval over seeds (Student t). Writes ``OUT/results.md``, ``OUT/results.json`` and
``OUT/<task>.png`` (success rate vs env steps, mean and 95% CI band per method).
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from jaxrl_pref import stats, study
from jaxrl_pref.stats import final_score, forward_fill as _ffill, windowed_mean as windowed
from jaxrl_pref.study import Run

METHODS = ("ppo", "rnd", "rnd-head", "e3b", "oni-retrieval", "oni-classification", "oni-ranking", "motif",
           "ellm")
_BONUS_METHODS = ("ppo", "rnd", "rnd-head", "e3b")  # experiments.ppo runs them (on every task)

# Per task: the env, the agent's budget and PPO settings (shared by every method), one bonus coefficient per bonus.
_GRID = ["--num-envs", "32", "--num-steps", "128", "--update-epochs", "4", "--num-minibatches", "4",
         "--learning-rate", "3e-4"]
TASKS = {
    "keydoor9": dict(env="KeyDoor-9", steps=300_000, args=["--num-envs", "32", "--num-steps", "64"],
                     coef={"rnd": 0.1, "e3b": 0.01}),
    "doorkey16": dict(env="MiniGrid-DoorKey-16x16", steps=1_000_000, args=_GRID, coef={"rnd": 0.1, "e3b": 0.01}),
    "deepsea10": dict(env="DeepSea-10", steps=300_000, args=["--num-envs", "32", "--num-steps", "64"],
                      coef={"rnd": 0.1, "e3b": 0.01}),
    "minihack_keyroom": dict(env="MiniHack-KeyRoom-Fixed-S5-v0", steps=200_000, args=[],
                             coef={"rnd": 0.1, "e3b": 0.01}),
}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """What to run: tasks x methods x seeds, and where."""
    tasks: tuple[str, ...] = tuple(TASKS)
    methods: tuple[str, ...] = METHODS
    num_seeds: int = 3
    out: str = "runs/sparse_study"
    scale: float = 1.0
    """Multiplies every task's env-step budget (0.1: a smoke run)."""
    extra_args: str = ""
    """Flags added to every run, one quoted string (e.g. --extra-args '--bonus-learning-rate 3e-4'); checked by the
    runs' own parser before the study starts."""

    def __post_init__(self):
        from jaxrl_pref.config import require
        bad = [t for t in self.tasks if t not in TASKS]
        require(not bad, "tasks", f"unknown {bad}", f"choose from {' '.join(TASKS)}")
        bad = [m for m in self.methods if m not in METHODS]
        require(not bad, "methods", f"unknown {bad}", f"choose from {' '.join(METHODS)}")
        require(self.num_seeds >= 2, "num_seeds", f"a confidence interval needs 2 or more seeds, got {self.num_seeds}",
                "pass --num-seeds 3")
        require(self.scale > 0, "scale", f"must be > 0, got {self.scale}", "pass e.g. --scale 1")


def not_applicable(task: str, method: str) -> Optional[str]:
    """Why ``method`` cannot run on ``task`` (None if it can): LLM feedback needs messages (a NetHack/MiniHack task
    or a captioned JAX task)."""
    import envs
    env = TASKS[task]["env"]
    if method in _BONUS_METHODS:
        return None
    entry = envs.entry(env)
    if not (entry.host or entry.captions is not None):
        return f"{env} has no messages (not captioned)"
    return None


def runs(cfg: StudyConfig, task: str, method: str) -> list[Run]:
    """The runs of one (task, method): one for a JAX task (seeds vmapped), one per seed on the pool."""
    t = TASKS[task]
    steps = max(int(t["steps"] * cfg.scale), 1)
    module = "experiments." + ("ppo" if method in _BONUS_METHODS else "oni")
    base = ["--env", t["env"], "--total-timesteps", str(steps), *t["args"], "--log-every", "1",
            *shlex.split(cfg.extra_args)]
    root = Path(cfg.out) / task / method
    if method in ("rnd", "e3b"):
        base += ["--bonus", method, "--bonus-coef", str(t["coef"][method])]
    elif method == "rnd-head":
        base += ["--bonus", "rnd", "--bonus-value-head", "--bonus-coef", str(t["coef"]["rnd"])]
    elif method.startswith("oni-"):
        base += ["--reward-model", method.split("-", 1)[1]]
    elif method == "motif":
        base += ["--method", "motif", "--motif-dir", str(Path(cfg.out) / task / "motif-data")]
    elif method == "ellm":
        base += ["--method", "ellm"]
    import envs
    if envs.entry(t["env"]).host:
        return [Run(f"{task}/{method}/seed{s}", module, [*base, "--seed", str(s)], root / f"seed{s}")
                for s in range(cfg.num_seeds)]
    return [Run(f"{task}/{method}", module, [*base, "--num-seeds", str(cfg.num_seeds)], root)]


def attach_extra_args(argv: list[str]) -> list[str]:
    """``--extra-args '--x 3'`` -> ``--extra-args=--x 3``: its value starts with ``--``, which the parser would
    otherwise read as the next flag ("Missing value")."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--extra-args", "--extra_args") and i + 1 < len(argv):
            out.append(f"--extra-args={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def check_commands(cfg: StudyConfig) -> list[str]:
    """Every run's command (``--extra-args`` included) through its experiment's own parser and checks, here, before
    anything runs (:mod:`slurm.validate`): one line per distinct problem, naming the runs; [] when all pass."""
    from slurm import validate
    problems: dict[tuple[str, str], list[str]] = {}
    specs = {}
    for task in cfg.tasks:
        for method in cfg.methods:
            if not_applicable(task, method):
                continue
            for run in runs(cfg, task, method):
                if run.module not in specs:
                    specs[run.module] = validate.load_spec(run.module)
                msg = validate.check_argv(specs[run.module], run.command()[3:])
                if msg is not None and not validate.machine_dependent(msg):
                    problems.setdefault((run.module, msg), []).append(run.name)
    extra = f" with --extra-args {shlex.quote(cfg.extra_args)}" if cfg.extra_args else ""
    return [f"run{'s' if len(w) > 1 else ''} {', '.join(w) if len(w) <= 4 else f'{w[0]} and {len(w) - 1} more'}"
            f" (python -m {module}{extra}): {msg}" for (module, msg), w in problems.items()]


def curves(run_dirs: list[Path]) -> dict:
    """Per seed: env steps, success rate, return and finished episodes per logged update (``[seeds, updates]``)."""
    from jaxrl_pref.logging import read_metrics
    out = {"env_steps": [], "success": [], "return": [], "episodes": []}
    for d in run_dirs:
        m = read_metrics(d / "metrics.csv")  # [seeds, updates]; env_steps [updates]
        n = m["episode_return"].shape[0]
        out["env_steps"] += [np.asarray(m["env_steps"], np.float64)] * n
        out["success"] += list(np.asarray(m["episode_success"], np.float64))
        out["return"] += list(np.asarray(m["episode_return"], np.float64))
        eps = m.get("episodes", (~np.isnan(m["episode_return"])).astype(np.float64))
        out["episodes"] += list(np.nan_to_num(np.asarray(eps, np.float64)))
    k = min(len(s) for s in out["env_steps"])
    return {key: np.stack([x[:k] for x in v]) for key, v in out.items()}


def steps_to(success: np.ndarray, env_steps: np.ndarray, episodes: Optional[np.ndarray] = None, level: float = 0.5,
             window: int = 5, min_episodes: int = 10) -> float:
    """Env steps at the first update where the success rate of the episodes that ended in the last ``window``
    updates (at least ``min_episodes`` of them: one lucky early episode is not a rate) reaches ``level``
    (:func:`windowed`); NaN if it never does."""
    e = (~np.isnan(success)).astype(np.float64) if episodes is None else np.nan_to_num(episodes)
    enough = np.convolve(e, np.ones(window))[:len(e)] >= min_episodes
    with np.errstate(invalid="ignore"):
        hit = np.nonzero((windowed(success, e, window) >= level) & enough)[0]
    return float(env_steps[hit[0]]) if len(hit) else float("nan")


def mean_ci(x) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (:func:`jaxrl_pref.stats.mean_ci`)."""
    return stats.mean_ci(x)[:2]


def summarise(c: dict) -> dict:
    # over the episodes that ended in the last tenth of the updates (long episodes: most updates end none; then the
    # last window that ended one)
    final_s = final_score(c["success"], frac=0.1, episodes=c.get("episodes"), carry=True)
    final_r = final_score(c["return"], frac=0.1, episodes=c.get("episodes"), carry=True)
    eps = c.get("episodes")
    eps = [None] * len(c["success"]) if eps is None else list(eps)
    budget = float(c["env_steps"][0, -1])
    t50 = np.array([steps_to(s, st, e) for s, st, e in zip(c["success"], c["env_steps"], eps)])
    return {"seeds": len(final_s), "budget": budget, "success": mean_ci(final_s), "return": mean_ci(final_r),
            "steps_to_50": mean_ci(np.where(np.isnan(t50), budget, t50)), "reached_50": int((~np.isnan(t50)).sum()),
            "per_seed": {"success": final_s.tolist(), "return": final_r.tolist(), "steps_to_50": t50.tolist()}}


def _fmt(mc, digits=2) -> str:
    m, h = mc
    return f"{m:.{digits}f} ± {h:.{digits}f}" if np.isfinite(h) else f"{m:.{digits}f}"


def report(cfg: StudyConfig, results: dict, all_curves: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(cfg.out)
    lines = [f"# Sparse-reward study ({cfg.num_seeds} seeds; mean ± 95% CI)", "",
             "| task | env | method | budget | success | return | env steps to 50% success | reached |",
             "|---|---|---|---|---|---|---|---|"]
    for (task, method), r in results.items():
        t50 = (f"{r['steps_to_50'][0] / 1e3:.0f}k ± {r['steps_to_50'][1] / 1e3:.0f}k"
               if np.isfinite(r["steps_to_50"][1]) else f"{r['steps_to_50'][0] / 1e3:.0f}k")
        lines.append(f"| {task} | {TASKS[task]['env']} | {method} | {r['budget'] / 1e3:.0f}k | {_fmt(r['success'])} | "
                     f"{_fmt(r['return'], 3)} | {t50 if r['reached_50'] else 'never'} | "
                     f"{r['reached_50']}/{r['seeds']} |")
    text = "\n".join(lines) + "\n\nRuns that never reach 50% count at the budget in the steps column.\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({f"{t}/{m}": r for (t, m), r in results.items()}, indent=1))
    for task in cfg.tasks:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in cfg.methods:
            c = all_curves.get((task, method))
            if c is None:
                continue
            s = np.stack([_ffill(windowed(x, e)) for x, e in zip(c["success"], c["episodes"])])
            mu = s.mean(0)
            half = np.array([mean_ci(col)[1] for col in s.T]) if len(s) > 1 else np.zeros_like(mu)
            x = c["env_steps"][0]
            ax.plot(x, mu, label=method)
            ax.fill_between(x, np.clip(mu - half, 0, 1), np.clip(mu + half, 0, 1), alpha=0.2)
        ax.set(title=f"{task} ({TASKS[task]['env']})", xlabel="env steps", ylabel="success rate", ylim=(-0.02, 1.02))
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{task}.png", dpi=100)
        plt.close(fig)
    return text


def main(argv: Optional[list[str]] = None) -> int:
    from jaxrl_pref.config import ConfigError, cli
    from slurm.validate import keep_jax_on_cpu
    argv = attach_extra_args(list(sys.argv[1:] if argv is None else argv))
    cfg = cli(StudyConfig, argv, description=__doc__.split("\n\n")[0])
    keep_jax_on_cpu()  # this process only checks the runs' options: the runs (child processes) get the accelerator
    try:
        problems = check_commands(cfg)
    except ConfigError as e:
        problems = [str(e)]
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    grid = {}
    for task in cfg.tasks:
        for method in cfg.methods:
            why = not_applicable(task, method)
            if why:
                print(f"skipping {method} on {task}: {why}", flush=True)
                continue
            grid[(task, method)] = runs(cfg, task, method)
    try:
        study.run_grid([r for rs in grid.values() for r in rs])
    except (study.RunFailed, study.Stopped) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status if isinstance(e, study.Stopped) else 1
    results, all_curves = {}, {}
    for key, rs in grid.items():
        all_curves[key] = c = curves([r.run_dir for r in rs])
        results[key] = summarise(c)
    print(report(cfg, results, all_curves))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
