"""Typed dataclass configs: validation with messages that name the field and the fix, and a tyro-based CLI."""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Optional, Sequence, TypeVar

from envs.errors import ConfigError, require  # noqa: F401 (this module is where the rest of the project imports them)

T = TypeVar("T")


def positive(cfg, *names: str, strict: bool = True) -> None:
    for n in names:
        v = getattr(cfg, n)
        ok = v > 0 if strict else v >= 0
        require(ok, n, f"must be {'> 0' if strict else '>= 0'}, got {v}",
                f"pass a {'positive' if strict else 'non-negative'} value, e.g. --{n.replace('_', '-')} "
                f"{_default(cfg, n)}")


def in_range(cfg, name: str, lo: float, hi: float) -> None:
    v = getattr(cfg, name)
    require(lo <= v <= hi, name, f"must lie in [{lo}, {hi}], got {v}",
            f"pass a value in that range, e.g. --{name.replace('_', '-')} {_default(cfg, name)}")


def _default(cfg, name):
    for f in dataclasses.fields(cfg):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    return "..."


def vmappable(default: float):
    """A config field that is also a traced, vmappable hyperparameter (see :func:`hparams_class`)."""
    return dataclasses.field(default=default, metadata={"vmappable": True})


def vmappable_fields(cls) -> tuple[str, ...]:
    """The fields of config class ``cls`` declared with :func:`vmappable`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("vmappable"))


def hparams_class(cls, name: str = "HParams"):
    """A flax struct dataclass with one traced leaf per vmappable field of ``cls`` (declared once, on the config)."""
    import jax
    from flax import struct
    ns = {"__annotations__": {n: jax.Array for n in vmappable_fields(cls)}, "__module__": cls.__module__,
          "__qualname__": name}
    return struct.dataclass(type(name, (), ns))


def build_hparams(hp_cls, cfg, overrides: dict, dtypes: Optional[dict] = None):
    """``hp_cls`` from ``cfg``'s values; ``overrides`` (maybe arrays with a leading sweep axis) replace some. All
    leaves are broadcast to one common shape so ``jax.vmap`` maps over them together."""
    import jax.numpy as jnp
    names = tuple(f.name for f in dataclasses.fields(hp_cls))
    unknown = set(overrides) - set(names)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "is not a vmappable hyperparameter", f"use one of {names}")
    vals = {k: jnp.asarray(overrides.get(k, getattr(cfg, k)), (dtypes or {}).get(k, jnp.float32)) for k in names}
    shape = jnp.broadcast_shapes(*(v.shape for v in vals.values()))
    return hp_cls(**{k: jnp.broadcast_to(v, shape) for k, v in vals.items()})


MATMUL_PRECISIONS = ("default", "high", "highest")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How an experiment runs an agent: seeds, outputs, checkpoints, resume, devices across processes."""
    num_seeds: int = 1
    """Independent seeds trained together (vmapped); seed i uses PRNGKey(seed + i). Host-loop (NetHack/MiniHack)
    runs train one seed per process."""
    seed: int = 0
    """First random seed."""
    run_dir: Optional[str] = None
    """Output directory (default: runs/<agent>-<env>-<timestamp>)."""
    log_every: int = 10
    """Log to tensorboard / progress every this many updates."""
    checkpoint_every: int = 100
    """Updates per compiled chunk; a checkpoint is saved after each chunk."""
    resume: Optional[str] = None
    """Continue a run from its latest checkpoint: '--resume RUN_DIR' (options are read from RUN_DIR/config.json;
    options given as well override them, and the run refuses settings that change its results), or a bare
    '--resume' for the run in --run-dir (starts fresh when it has no checkpoint yet)."""
    no_resume: bool = False
    """Start over even if --run-dir holds checkpoints (the old run's checkpoints/, tb/, config.json, metrics.csv,
    metrics.jsonl and plots are moved aside as <name>.old-<timestamp>, not deleted)."""
    progress: bool = True
    """Show a progress bar (plain lines when stdout is not a terminal or CI=true)."""
    per_seed: bool = False
    """Also write per-seed curves (seed_<i>/...) to tensorboard."""
    hp_values: Optional[str] = None
    """Vmapped hyperparameter sweep inside one run: JSON {field: [one value per seed]} for the agent's vmappable
    fields, e.g. '{"learning_rate": [1e-4, 3e-4]}' with --num-seeds 2 (seed i uses value i)."""
    distributed: bool = False
    """Multi-process data parallelism: call jax.distributed.initialize (coordinator/process count/id from
    --coordinator/--num-processes/--process-id, else the Slurm step, else JAX's detection on TPU pods/GKE/MPI) and
    use --num-devices devices across all processes. Process 0 writes logs and metrics; every process writes its
    checkpoint shards (use a shared --run-dir)."""
    coordinator: Optional[str] = None
    """host:port of process 0 for --distributed (default: from Slurm / JAX's detection)."""
    num_processes: Optional[int] = None
    """Number of processes for --distributed (default: from Slurm / JAX's detection)."""
    process_id: Optional[int] = None
    """This process's index for --distributed (default: from Slurm / JAX's detection)."""
    matmul_precision: str = "default"
    """Precision of float32 matmuls and convolutions: default (JAX's: TF32 on recent NVIDIA GPUs, bfloat16 passes on
    TPU, full float32 on CPU), high or highest (full float32 on every device; slower on accelerators). Recorded in
    config.json."""
    deterministic: bool = False
    """GPU: deterministic XLA kernels (--xla_gpu_deterministic_ops: no atomics in scatter-adds such as embedding
    gradients, no autotuning races), so a resumed run is bitwise equal there too; costs speed where scatters are
    large. CPU is deterministic already. Must be known before JAX starts: give it on the command line (or in the
    resumed run's config). Recorded in config.json."""
    debug: bool = False
    """Print the traceback of expected errors too (a bad option, an unusable run dir, a full disk...) and the
    checkpoint/tensorboard writers' own error logs; same as the environment variable JAXRL_DEBUG=1."""

    def __post_init__(self):
        self.validate_run()

    def validate_run(self) -> None:
        for name in ("num_seeds", "log_every", "checkpoint_every"):
            v = getattr(self, name)
            require(v >= 1, name, f"must be >= 1, got {v}",
                    f"pass a positive value, e.g. --{name.replace('_', '-')} {_default(self, name)}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}", "pass e.g. --seed 0")
        require(self.matmul_precision in MATMUL_PRECISIONS, "matmul_precision",
                f"unknown precision {self.matmul_precision!r}", f"use one of {', '.join(MATMUL_PRECISIONS)}")
        require(not (self.no_resume and self.resume is not None), "no_resume",
                "--resume and --no-resume contradict each other", "pass only one of them")
        if self.run_dir and self.resume:
            from pathlib import Path
            require(Path(self.resume).resolve() == Path(self.run_dir).resolve(), "run_dir",
                    f"--resume {self.resume} and --run-dir {self.run_dir} differ",
                    "pass only --resume RUN_DIR, or --run-dir RUN_DIR with a bare --resume")

    def hp_overrides(self, fields: Sequence[str]) -> dict:
        """``--hp-values`` parsed and checked against the agent's vmappable ``fields``: {field: [num_seeds floats]}."""
        if self.hp_values is None:
            return {}
        example = """pass e.g. '{"learning_rate": [1e-4, 3e-4]}'"""
        try:
            vals = json.loads(self.hp_values)
        except ValueError as e:
            raise ConfigError("hp_values", f"is not JSON ({e})", example) from None
        require(isinstance(vals, dict) and bool(vals), "hp_values", f"must be a JSON object, got {self.hp_values!r}",
                example)
        for k, v in vals.items():
            require(k in fields, "hp_values", f"{k!r} cannot be vmapped",
                    f"use fields among {list(fields)}; other fields need separate runs")
            require(isinstance(v, list) and len(v) == self.num_seeds
                    and all(isinstance(x, (int, float)) for x in v), "hp_values",
                    f"{k} needs one number per seed ({self.num_seeds}), got {v!r}",
                    f"give {self.num_seeds} values or set --num-seeds {len(v) if isinstance(v, list) else 1}")
        return {k: [float(x) for x in v] for k, v in vals.items()}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], d: dict) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"not a field of {cls.__name__}", f"use one of {sorted(names)}")
    return cls(**d)


def save_json(cfg, path) -> None:
    with open(path, "w") as f:
        json.dump(to_dict(cfg), f, indent=2, sort_keys=True)


def cli(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None,
        aliases: dict[str, str] | None = None) -> T:
    """Parses ``argv`` into ``cls`` with tyro (``--field-name value``; ``--help`` lists every field).

    ``aliases`` maps short flags to fields, e.g. ``{"--env": "env_name"}``. Validation errors
    (:class:`ConfigError`) are printed without a traceback and exit with status 2.
    """
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    for short, field in (aliases or {}).items():
        argv = [f"--{field.replace('_', '-')}" if a == short else
                (f"--{field.replace('_', '-')}={a.split('=', 1)[1]}" if a.startswith(short + "=") else a)
                for a in argv]
    try:
        return tyro.cli(cls, args=argv, description=description, config=(tyro.conf.FlagConversionOff,))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def replace(cfg: T, **changes: Any) -> T:
    return dataclasses.replace(cfg, **changes)
