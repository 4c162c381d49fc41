"""Sweep files: a YAML (or JSON) description of an experiment grid, expanded into Slurm array tasks.

A sweep file::

    experiment: ppo                  # each task runs `python -m experiments.ppo ...`
    name: cartpole-lr                # optional (default: the file name)
    fixed:                           # options shared by every task (any flag of the experiment, `_` or `-`)
      env_name: CartPole-v1
      total_timesteps: 100000
    grid:                            # cartesian product of these values
      learning_rate: [1.0e-4, 3.0e-4, 1.0e-3]
      ent_coef: [0.0, 0.01]
    zip:                             # optional: alternatives that vary together (product with the grid)
      - {num_envs: 4, num_minibatches: 4}
      - {num_envs: 16, num_minibatches: 8}
    seeds: 3                         # 3 seeds: 0, 1, 2 (or an explicit list, e.g. [0, 1, 2])
    vmap_seeds: false                # true: one task per grid point trains all its seeds in one program
    vmap_hparams: []                 # grid fields trained side by side in one task (vmapped hyperparameters,
                                     # e.g. [learning_rate, ent_coef]); needs vmap_seeds
    slurm:                           # sbatch options (all optional)
      partition: gpu
      time: "02:00:00"
      cpus_per_task: 4
      gpus_per_task: 1
      mem: 16G
      throttle: 8                    # at most 8 array tasks at once (--array=0-N%8)
      signal_lead_s: 120             # SIGUSR1 this long before the time limit: save, requeue
      setup: ["module load cuda"]    # shell lines run before the task
      extra: ["--qos=normal"]        # any other sbatch options

:func:`expand` turns it into a list of :class:`Task` (one per Slurm array index). The experiment module must take the
experiment-runner flags of ``experiments.ppo``: ``--seed --num-seeds --run-dir --resume --progress`` (and
``--hp-values`` for ``vmap_hparams``). A task is one process running one or more *members*: a (grid point, seed)
pair. Each member is one row (seed index) of the task's ``metrics.csv``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from jaxrl_pref.config import ConfigError

MANIFEST = "manifest.json"
TOP_KEYS = {"experiment", "name", "fixed", "grid", "zip", "seeds", "vmap_seeds", "vmap_hparams", "slurm",
            "python", "output_dir"}
# options the task runner sets itself: a sweep file must not set them
RESERVED = {"seed", "num_seeds", "run_dir", "resume", "no_resume", "hp_values"}


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    partition: Optional[str] = None
    time: str = "01:00:00"
    cpus_per_task: int = 2
    gpus_per_task: int = 0
    mem: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    throttle: Optional[int] = None
    signal_lead_s: int = 120
    requeue_on_timeout: bool = True
    """On the pre-time-limit SIGUSR1 the task saves and requeues itself (continues in a new allocation)."""
    setup: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", str(self.time)):
            raise ConfigError("slurm.time", f"{self.time!r} is not a Slurm time limit",
                              "use e.g. '01:30:00' (HH:MM:SS) or '1-00:00:00' (D-HH:MM:SS)")
        for name in ("cpus_per_task", "gpus_per_task", "signal_lead_s"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (1 if name == "cpus_per_task" else 0):
                raise ConfigError(f"slurm.{name}", f"must be a {'positive' if name == 'cpus_per_task' else 'non-negative'}"
                                  f" integer, got {v!r}", f"set slurm.{name} to e.g. {2 if name == 'cpus_per_task' else 0}")
        if self.throttle is not None and (not isinstance(self.throttle, int) or self.throttle < 1):
            raise ConfigError("slurm.throttle", f"must be a positive integer, got {self.throttle!r}",
                              "set e.g. slurm.throttle: 8 (at most 8 tasks at once), or leave it out")


@dataclasses.dataclass(frozen=True)
class Sweep:
    experiment: str
    name: str
    fixed: dict
    grid: dict
    zip: list
    seeds: list
    vmap_seeds: bool = False
    vmap_hparams: tuple = ()
    slurm: SlurmOptions = SlurmOptions()
    python: Optional[str] = None
    output_dir: Optional[str] = None

    @property
    def module(self) -> str:
        return self.experiment if "." in self.experiment else f"experiments.{self.experiment}"

    def varying(self) -> list[str]:
        """Fields that differ between grid points, in file order."""
        names = list(self.grid)
        for alt in self.zip:
            names += [k for k in alt if k not in names]
        return names


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: ``params`` are the varying fields' values."""
    index: int
    params: dict

    @property
    def name(self) -> str:
        return ",".join(f"{k}={_short(v)}" for k, v in self.params.items()) or "default"


@dataclasses.dataclass(frozen=True)
class Task:
    """One Slurm array index: ``args`` for the experiment module, its own ``run_dir`` (relative to the sweep
    directory), and the members it trains (``{"point", "seed", "row"}``: row = seed index in its metrics)."""
    index: int
    run_dir: str
    args: list
    members: list

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "x".join(map(_short, v))
    return str(v)


def _norm(k: str) -> str:
    return str(k).replace("-", "_")


def load(path) -> Sweep:
    """Reads and validates a sweep file (YAML, or JSON by extension)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("sweep", f"{path} does not exist", "pass the path of a sweep file (see slurm/examples/)")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"sweep file {path}", f"is not UTF-8 text ({e.reason} at byte {e.start})",
                          "save it as UTF-8 YAML or JSON") from None
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"sweep file {path}", f"line {e.lineno}, column {e.colno}: {e.msg}",
                              "correct the JSON there") from None
    else:
        import yaml
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"sweep file {path}", _yaml_problem(e), "correct the YAML there") from None
    if not isinstance(raw, Mapping):
        raise ConfigError("sweep", f"{path} does not hold a mapping", "write `experiment: ppo` etc. at top level")
    return from_dict(dict(raw), default_name=path.stem)


def _yaml_problem(e) -> str:
    """``line L, column C: <problem> (<context> at line L', column C')`` of a PyYAML error (1-based)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return " ".join(str(e).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        text += f" ({context}" + (f" at line {cmark.line + 1}, column {cmark.column + 1}" if cmark else "") + ")"
    return text


def from_dict(raw: Mapping, default_name: str = "sweep") -> Sweep:
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ConfigError(sorted(unknown)[0], "is not a sweep-file key", f"use only {sorted(TOP_KEYS)}")
    if "experiment" not in raw:
        raise ConfigError("experiment", "is missing", "add e.g. `experiment: ppo` (runs python -m experiments.ppo)")
    fixed = {_norm(k): v for k, v in (raw.get("fixed") or {}).items()}
    grid = {_norm(k): v for k, v in (raw.get("grid") or {}).items()}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"grid.{k}", f"must be a non-empty list of values, got {v!r}",
                              f"write e.g. `{k}: [a, b]` (a fixed value belongs under `fixed:`)")
    zipped = raw.get("zip") or []
    if not isinstance(zipped, list) or not all(isinstance(z, Mapping) and z for z in zipped):
        raise ConfigError("zip", "must be a list of non-empty mappings", "write e.g. `zip: [{num_envs: 4}, {num_envs: 8}]`")
    zipped = [{_norm(k): v for k, v in z.items()} for z in zipped]
    seeds = raw.get("seeds", 1)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError("seeds", f"must be >= 1, got {seeds}", "write e.g. `seeds: 3` or `seeds: [0, 1, 2]`")
        seeds = list(range(seeds))
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise ConfigError("seeds", f"must be a count or a list of distinct non-negative integers, got {seeds!r}",
                          "write e.g. `seeds: 3` or `seeds: [0, 1, 2]`")
    vmap_seeds = bool(raw.get("vmap_seeds", False))
    vmap_hparams = tuple(_norm(k) for k in (raw.get("vmap_hparams") or ()))
    zip_keys = {k for z in zipped for k in z}
    for k in vmap_hparams:
        if k not in grid:
            raise ConfigError("vmap_hparams", f"{k!r} is not a grid field",
                              f"list only fields under `grid:` ({sorted(grid)})")
    if vmap_hparams and not vmap_seeds:
        raise ConfigError("vmap_hparams", "needs vmap_seeds: true (vmapped members are seeds of one program)",
                          "add `vmap_seeds: true`")
    if vmap_seeds and seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ConfigError("seeds", f"vmap_seeds needs consecutive seeds (a task trains seed, seed+1, ...), got {seeds}",
                          f"use `seeds: [{seeds[0]}, {seeds[0] + 1}, ...]` or `vmap_seeds: false`")
    everything = set(fixed) | set(grid) | zip_keys
    bad = sorted(everything & RESERVED)
    if bad:
        raise ConfigError(bad[0], "is set by the sweep itself", "remove it (seeds go under `seeds:`)")
    both = sorted((set(fixed) & (set(grid) | zip_keys)) | (set(grid) & zip_keys))
    if both:
        raise ConfigError(both[0], "is given in more than one of fixed/grid/zip", "give each field in one place")
    slurm_raw = {_norm(k): v for k, v in (raw.get("slurm") or {}).items()}
    names = {f.name for f in dataclasses.fields(SlurmOptions)}
    if set(slurm_raw) - names:
        raise ConfigError(f"slurm.{sorted(set(slurm_raw) - names)[0]}", "is not a Slurm option here",
                          f"use one of {sorted(names)}, or pass it under slurm.extra as a raw sbatch flag")
    for k in ("setup", "extra"):
        if k in slurm_raw:
            v = slurm_raw[k]
            slurm_raw[k] = tuple([v] if isinstance(v, str) else v)
    if "time" in slurm_raw:
        slurm_raw["time"] = str(slurm_raw["time"])
    name = str(raw.get("name") or default_name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError("name", f"{name!r} has characters unsafe in paths/job names", "use letters, digits, _ . -")
    experiment = str(raw["experiment"])
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", experiment):
        raise ConfigError("experiment", f"{experiment!r} is not a module name", "write e.g. `experiment: ppo`")
    return Sweep(experiment, name, fixed, grid, zipped, seeds, vmap_seeds, vmap_hparams,
                 SlurmOptions(**slurm_raw), raw.get("python"), raw.get("output_dir"))


def points(sweep: Sweep) -> list[Point]:
    """Grid points: the product of the grid values (file order, last field fastest) with the zip alternatives."""
    keys = list(sweep.grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(sweep.grid[k] for k in keys))] or [{}]
    alts = sweep.zip or [{}]
    out = []
    for c in combos:
        for a in alts:
            out.append(Point(len(out), {**c, **a}))
    return out


def flag_args(params: Mapping[str, Any]) -> list[str]:
    """CLI tokens for ``{field: value}`` in the tyro style of the experiment entry points."""
    args = []
    for k, v in params.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args += [flag, str(v)]
        elif isinstance(v, (list, tuple)):
            args += [flag, *map(str, v)]
        elif isinstance(v, float):
            args.append(f"{flag}={v!r}")
        else:
            args.append(f"{flag}={v}")
    return args


def expand(sweep: Sweep) -> tuple[list[Point], list[Task]]:
    """The grid points and the array tasks, in array-index order."""
    pts = points(sweep)
    seeds = sweep.seeds
    tasks: list[Task] = []
    if not sweep.vmap_seeds:
        for p in pts:
            for s in seeds:
                args = flag_args({**sweep.fixed, **p.params}) + ["--seed", str(s), "--num-seeds", "1"]
                tasks.append(Task(len(tasks), f"runs/p{p.index:03d}/s{s}", args,
                                  [{"point": p.index, "seed": s, "row": 0}]))
        return pts, tasks
    # group points that differ only in vmapped hyperparameters
    groups: dict[str, list[Point]] = {}
    for p in pts:
        rest = {k: v for k, v in p.params.items() if k not in sweep.vmap_hparams}
        groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(p)
    for members_pts in groups.values():
        rest = {k: v for k, v in members_pts[0].params.items() if k not in sweep.vmap_hparams}
        members, hp = [], {k: [] for k in sweep.vmap_hparams}
        for p in members_pts:
            for j in range(len(seeds)):
                row = len(members)
                members.append({"point": p.index, "seed": seeds[0] + row, "row": row})
                for k in sweep.vmap_hparams:
                    hp[k].append(float(p.params[k]))
        args = flag_args({**sweep.fixed, **rest}) + ["--seed", str(seeds[0]), "--num-seeds", str(len(members))]
        if hp:
            args += ["--hp-values", json.dumps(hp)]
        first = members_pts[0].index
        tasks.append(Task(len(tasks), f"runs/g{len(tasks):03d}_p{first:03d}", args, members))
    return pts, tasks


def array_spec(indices: Sequence[int], throttle: Optional[int]) -> str:
    """``0-7%4`` style array spec, compressing consecutive runs: ``[1, 2, 3, 7] -> 1-3,7``."""
    idx = sorted(set(indices))
    parts, start = [], None
    for i, x in enumerate(idx):
        if start is None:
            start = x
        if i + 1 == len(idx) or idx[i + 1] != x + 1:
            parts.append(f"{start}-{x}" if x != start else f"{start}")
            start = None
    return ",".join(parts) + (f"%{throttle}" if throttle else "")


def write_manifest(sweep_dir, sweep: Sweep, pts: list[Point], tasks: list[Task], extra: Mapping) -> Path:
    """``sweep_dir/manifest.json`` (everything report/task need) and ``sweep_dir/tasks/<i>.json``."""
    sweep_dir = Path(sweep_dir)
    (sweep_dir / "tasks").mkdir(parents=True, exist_ok=True)
    for t in tasks:
        (sweep_dir / "tasks" / f"{t.index}.json").write_text(
            json.dumps({"module": sweep.module, **t.to_json()}, indent=2))
    manifest = {
        "name": sweep.name, "experiment": sweep.experiment, "module": sweep.module,
        "fixed": sweep.fixed, "varying": sweep.varying(), "seeds": sweep.seeds,
        "vmap_seeds": sweep.vmap_seeds, "vmap_hparams": list(sweep.vmap_hparams),
        "slurm": dataclasses.asdict(sweep.slurm),
        "points": [{"index": p.index, "name": p.name, "params": p.params} for p in pts],
        "tasks": [t.to_json() for t in tasks], **dict(extra),
    }
    path = sweep_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path


def read_manifest(sweep_dir) -> dict:
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        raise ConfigError("sweep_dir", f"{sweep_dir} has no {MANIFEST}",
                          "pass the directory `python -m slurm.submit` printed (it holds manifest.json)")
    try:
        m = json.loads(path.read_text())
        if not (isinstance(m, dict) and isinstance(m.get("tasks"), list) and m.get("module")):
            raise ValueError("no tasks/module")
    except (ValueError, OSError) as e:
        raise ConfigError("sweep_dir", f"{path} is unreadable ({e})",
                          "pass the directory of a sweep written by python -m slurm.submit") from None
    return m


def task_record(sweep_dir, index: int) -> dict:
    path = Path(sweep_dir) / "tasks" / f"{index}.json"
    if not path.is_file():
        n = len(list((Path(sweep_dir) / "tasks").glob("*.json")))
        raise ConfigError("task", f"no task {index} in {sweep_dir} ({n} tasks)", f"pass an index in 0..{n - 1}")
    return json.loads(path.read_text())
