"""A run directory's ``config.json``, written once when a run starts: the agent, the entry point (``module``), the
config compared on resume and the run settings (``run``: seeds, ``num_updates``, ``steps_per_update``...). The one
reader and the one writer; everything that looks at a run's options (``--resume``, the runner's checks, Motif, the
sweep report, the benchmarks) goes through :func:`read`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

FILE = "config.json"


class UnreadableRunConfig(ValueError):
    """``config.json`` exists but is not a JSON object (damaged, truncated, or not a run's)."""


def path(run_dir) -> Path:
    return Path(run_dir) / FILE


def read(run_dir) -> Optional[dict]:
    """The saved options of the run in ``run_dir``; ``None`` if it has no ``config.json``; raises
    :class:`UnreadableRunConfig` (with the reason) if it has one that cannot be read as a JSON object."""
    p = path(run_dir)
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UnreadableRunConfig(f"{p} is unreadable ({e})") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UnreadableRunConfig(f"{p} is unreadable ({e})") from e
    if not isinstance(data, dict):
        raise UnreadableRunConfig(f"{p} is unreadable (a JSON {type(data).__name__}, not an object)")
    return data


def run_settings(run_dir) -> dict:
    """The ``run`` section of ``run_dir``'s config (``{}`` when there is no readable one): for callers that only
    look, never decide (the sweep report, a benchmark's summary)."""
    try:
        run = (read(run_dir) or {}).get("run")
    except UnreadableRunConfig:
        return {}
    return run if isinstance(run, dict) else {}


def write(run_dir, data: dict) -> None:
    """Writes ``data`` as ``run_dir/config.json`` (through a temporary file: a reader never sees half of it)."""
    p = path(run_dir)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, p)
