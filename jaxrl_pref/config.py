"""Typed dataclass configs: validation with messages that name the field and the fix, and a tyro-based CLI."""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Optional, Sequence, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is invalid. The message names the field and how to fix it."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        super().__init__(f"{field}: {problem}. Fix: {fix}")


def require(cond: bool, field: str, problem: str, fix: str) -> None:
    if not cond:
        raise ConfigError(field, problem, fix)


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


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How an experiment runs an agent (seeds, outputs, checkpoints, resume): mixed into each experiment's
    ``Options`` next to the agent's ``Config``; call :meth:`validate_run` from ``validate``."""
    num_seeds: int = 1
    """Independent seeds trained together (vmapped); seed i uses PRNGKey(seed + i)."""
    seed: int = 0
    """First random seed."""
    run_dir: Optional[str] = None
    """Output directory (default: runs/<agent>-<env>-<timestamp>)."""
    log_every: int = 10
    """Log to tensorboard / progress every this many updates."""
    checkpoint_every: int = 100
    """Updates per compiled chunk; a checkpoint is saved after each chunk."""
    resume: Optional[str] = None
    """Continue the run in this directory from its latest checkpoint (its config.json supplies the options;
    options given with --resume override them)."""
    no_resume: bool = False
    """Start over even if --run-dir holds checkpoints (old checkpoints/ and tb/ are moved aside, not deleted)."""
    progress: bool = True
    """Show a progress bar (plain lines when stdout is not a terminal or CI=true)."""

    def validate_run(self) -> None:
        for name in ("num_seeds", "log_every", "checkpoint_every"):
            v = getattr(self, name)
            require(v >= 1, name, f"must be >= 1, got {v}",
                    f"pass a positive value, e.g. --{name.replace('_', '-')} {_default(self, name)}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}", "pass e.g. --seed 0")
        require(not (self.no_resume and self.resume is not None), "no_resume",
                "--resume and --no-resume contradict each other", "pass only one of them")


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
