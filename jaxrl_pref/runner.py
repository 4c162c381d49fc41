"""The experiment driver every agent reuses: seeds, chunked jitted training, checkpoints, exact resume, logging.

An agent provides ``make_trainer(cfg, log_fn=..., log_every=...)`` returning an object with

* ``init(key, hp) -> state`` and
* ``run(state, hp, num_updates) -> (state, metrics)`` (``metrics[k]`` has a leading ``[num_updates]`` axis),

both pure and jittable, as a :class:`jaxrl_pref.loop.ScanLoop` (e.g. :class:`agents.ppo.Trainer`) is.
:func:`run` (``run(make_trainer, cfg, RunSpec(...))``, or :func:`run_experiment` with the spec's fields as
keywords) then

1. builds one PRNG key per seed (seed ``i`` of a run uses ``PRNGKey(seed + i)``) and ``vmap``\\ s ``init``/``run``
   over seeds (``hp`` optionally batched over seeds too);
2. cuts the ``num_updates`` into chunks of ``checkpoint_every`` updates counted from update 0 (plus a shorter last
   chunk), compiles ``run`` once per chunk length, and loops over the chunks on the host;
3. after every chunk saves the state and all per-update metrics so far (atomic orbax checkpoint), rewrites
   ``metrics.csv``/``metrics.jsonl``, and checks the loss metrics for NaN (stops with a clear message, keeping the
   last good checkpoint);
4. on ``resume=True`` restores the newest intact checkpoint and continues. Because the chunking is fixed and the
   state (incl. PRNG keys and counters) is restored bit for bit, the final parameters and metrics are bitwise equal
   to those of an uninterrupted run;
5. on SIGTERM/SIGINT finishes the current chunk, saves, and returns with ``interrupted`` set (``None`` if that chunk
   was the last: the run is complete). A second SIGINT aborts at once, without saving (:class:`RunAborted`): the
   compiled chunks run in a worker thread while the main thread waits in short sleeps, so Python's signal handlers
   run even while a long chunk computes;
6. writes ``run_dir/{config.json, metrics.csv, metrics.jsonl, learning_curve.png, tb/, checkpoints/}``.

Before anything is built the run directory is checked (:func:`check_run_dir`: creatable, writable, not a file), and
once the initial state exists, the free disk space against what the checkpoints and metrics will need
(:func:`check_free_space`); both raise :class:`~jaxrl_pref.config.ConfigError` naming the fix. A write that fails
mid-run (disk full, permissions, an I/O error) raises :class:`RunDirWriteError`, without the writers' background
tracebacks (orbax's absl log, tensorboard's thread; shown with ``JAXRL_DEBUG=1``): the checkpoints saved before are
intact.

A jitted trainer may have a ``chunk_hook``: host work between compiled chunks (ONI on captioned JAX envs sends the
messages seen to its annotator and loads the labels that arrived into the reward state). It is a callable
``hook(state, update, seed_axis=...) -> state`` with an ``every`` attribute: the runner cuts its chunks further at
every multiple of ``every`` updates (0: at the checkpoints only; fixed from update 0 like the chunks, so resume stays
exact) and calls the hook on the state after each piece, before that state is checkpointed. ``seed_axis``: the state
has the vmapped seeds' leading axis (sequential seeds: called per seed). The hook must keep the state's structure,
shapes and shardings (the compiled chunk is reused); its time counts as training time.

Host-side trainers (:class:`jaxrl_pref.loop.HostLoop`, ``jittable = False``: envs stepped outside jit) go
through the same chunks, checkpoints, logging and resume; their ``run`` is called as plain Python (it jits its own
``act``/``learn``), one seed per process. Their checkpoints hold the learner (parameters, optimiser, keys,
counters), not the host envs' games: a resumed run continues with fresh episodes, so it is not bitwise equal to an
uninterrupted one.

Seeds and devices: ``vmap`` over seeds around a ``shard_map`` over several (forced CPU) devices deadlocks, so with
``num_devices > 1`` and ``num_seeds > 1`` the seeds are run one after another within each chunk (same results per
seed, ``num_seeds`` times the wall time). Throughput-wise, prefer one device per job and many seeds, or many
devices and one seed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging as _pylogging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_pref.checkpoint import (Checkpointer, CheckpointError, CheckpointWriteError, finished_steps,
                                   has_checkpoints, move_aside_all)
from jaxrl_pref import run_config
from jaxrl_pref.config import ConfigError
from jaxrl_pref.logging import Logger, debug_mode, plot_learning_curve, write_metrics

__all__ = ["run_experiment", "run", "RunSpec", "RunResult", "DivergenceError", "RunDirWriteError", "RunAborted",
           "chunk_bounds", "segment_bounds", "seed_keys", "use_sync_cpu_dispatch", "check_run_dir",
           "check_free_space", "check_same_agent", "RUN_OUTPUTS", "MIN_FREE_BYTES", "EXIT_WRITE_FAILED"]


def use_sync_cpu_dispatch() -> bool:
    """Works around jax#25861: with asynchronous CPU dispatch, programs that call back into Python (the trainers'
    ``log_fn`` through ``jax.debug.callback``) occasionally hang for good -- seen here with vmapped seeds on a
    2-core machine. Synchronous dispatch costs nothing for one long program per chunk.

    Only takes effect before the CPU backend exists, i.e. before the first array, ``jax.devices()`` or
    ``import gymnax``/``envs``/``agents`` (gymnax creates arrays at import): entry points call it first thing.
    Returns whether it took effect."""
    from jax._src import xla_bridge  # private, only to report whether the flag can still matter
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return "cpu" not in getattr(xla_bridge, "_backends", {})

# run settings that change the numbers: a resumed run must use the same ones
IDENTITY_KEYS = ("num_seeds", "seed", "checkpoint_every", "num_updates", "hp")


class DivergenceError(RuntimeError):
    """A watched metric (the losses) became NaN; the run stopped and kept its last good checkpoint."""


EXIT_WRITE_FAILED = 3  # run_for_cli's exit status for a RunDirWriteError


class RunDirWriteError(RuntimeError):
    """Writing the run's outputs failed mid-run (``what``: e.g. "save the checkpoint of update 500"; ``path``: where;
    ``cause``: what the file system or orbax raised). ``reason`` says it in words ("the disk is full (ENOSPC: ...)"),
    ``errno`` is the error number when one is known. The checkpoints saved before it are intact."""

    def __init__(self, what: str, path, cause: BaseException):
        self.what, self.path, self.cause = what, Path(path), cause
        self.reason, self.errno = describe_io_error(cause)
        super().__init__(f"could not {what} in {self.path}: {self.reason}")


class RunAborted(KeyboardInterrupt):
    """A second SIGINT: the run stopped at once, without saving (the last checkpoint is kept)."""


_ERRNO_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.EIO: "an I/O error"}
_ERRNO_WORDS = ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
                (errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied"),
                (errno.EIO, "Input/output error"))


def _errno_text(code: int) -> str:
    name, words = errno.errorcode.get(code, f"errno {code}"), os.strerror(code)
    head = _ERRNO_REASONS.get(code)
    return f"{head} ({name}: {words})" if head else f"{words} ({name})"


def describe_io_error(exc: BaseException) -> tuple[str, Optional[int]]:
    """``(reason in words, errno or None)`` for a failed write: the errno of the first ``OSError`` in ``exc``'s chain,
    else one found in the message (orbax/tensorstore: ``RESOURCE_EXHAUSTED: ... [os_error_code='28']``)."""
    e, seen = exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return _errno_text(e.errno), e.errno
        text = str(e)
        m = re.search(r"os_error_code='?(\d+)", text)
        if m and int(m.group(1)):
            return _errno_text(int(m.group(1))), int(m.group(1))
        for code, words in _ERRNO_WORDS:
            if words in text:
                return _errno_text(code), code
        e = e.__cause__ or e.__context__
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200] + '...' if len(text) > 200 else text}", None


def _io_fix(code: Optional[int], run_dir) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"free some space (df -h {run_dir})"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"make {run_dir} writable"
    return f"check the disk of {run_dir}"


@contextlib.contextmanager
def _writing(what: str, path):
    """Turns a failed write inside the block into a :class:`RunDirWriteError` (``what`` failed in ``path``)."""
    try:
        yield
    except CheckpointWriteError as e:
        if e.step is not None:
            what = (f"write the checksum manifest of the checkpoint of update {e.step}" if e.manifest else
                    f"save the checkpoint of update {e.step}")
        raise RunDirWriteError(what, path, e.cause) from e
    except OSError as e:
        raise RunDirWriteError(what, path, e) from e


# -- the run directory, before the run --------------------------------------------------------------------------------

MIN_FREE_BYTES = 50 * 2 ** 20
"""Free disk space a run needs besides its checkpoints: metrics files, tensorboard events, plots and orbax's
temporary files. :func:`check_run_dir` asks for this much before anything is built; :func:`check_free_space` adds
the checkpoints' and metrics' share once the state's size is known."""
METRICS_BYTES_PER_UPDATE = 1024
"""Disk per seed and update for the metrics: a row of ~25 values in metrics.csv and metrics.jsonl, and the history
kept in each checkpoint (PPO writes ~0.5 KB)."""

RUN_OUTPUTS = ("checkpoints", "tb", run_config.FILE, "metrics.csv", "metrics.jsonl", "learning_curve.png",
               "oni_curves.png")
"""What a run writes into its run dir (``--no-resume`` moves these aside, with one ``.old-<timestamp>`` suffix)."""


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:,.0f} MB" if n >= 2 ** 20 else f"{n / 2 ** 10:,.0f} KB"


def _remove_empty(created: Sequence[Path]) -> None:
    """Removes the directories a check created (deepest first) where they are still empty."""
    for d in sorted(created, key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass


def check_run_dir(run_dir, min_free: int = MIN_FREE_BYTES) -> list[Path]:
    """Checks, before anything is built, that ``run_dir`` can hold a run: not an existing file, creatable (it is
    created, with its missing parents), writable (a temporary file is written and removed) and on a disk with at
    least ``min_free`` bytes free. Returns the directories it created. Raises
    :class:`~jaxrl_pref.config.ConfigError` (field ``run_dir``) with the problem and the fix, leaving no directory
    of its own behind."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError("run_dir", f"{path} is an existing file, not a directory",
                          "pass a directory for --run-dir (a new or an existing one), or move that file away")
    missing, p = [], path.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise ConfigError("run_dir", f"cannot create {path}: {p} is a file, not a directory",
                          "pass a --run-dir whose parent is a directory")
    created, where = [], "create"
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # made meanwhile (the other processes of a multi-process run check too)
                continue
            created.append(d)
        where = "write into"
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=path)
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        _remove_empty(created)
        reason, code = describe_io_error(e)
        if code == errno.ENOENT:  # e.g. under /proc: the parent exists but takes no new directory
            reason = f"{p} does not allow creating directories in it (ENOENT)"
        fix = (f"free some space (df -h {p}), or pass a --run-dir on another disk" if code in (errno.ENOSPC,
               errno.EDQUOT) else "pass a --run-dir where you can write (e.g. under runs/ or your home directory)")
        raise ConfigError("run_dir", f"cannot {where} {path}: {reason}", fix) from None
    try:
        check_free_space(path, min_free)
    except ConfigError:
        _remove_empty(created)
        raise
    return created


def check_free_space(run_dir, need: int, what: str = "") -> None:
    """Raises :class:`~jaxrl_pref.config.ConfigError` unless the disk of ``run_dir`` has ``need`` bytes free."""
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError("run_dir", f"only {_mb(free)} free on the disk of {run_dir}; this run needs about "
                          f"{_mb(need)}{what}", f"free some space (df -h {run_dir}), or pass a --run-dir on another "
                          "disk")


def _state_bytes(state) -> int:
    return int(sum(getattr(x, "nbytes", 0) or np.asarray(x).nbytes for x in jax.tree.leaves(state)
                   if hasattr(x, "shape")))


def _check_disk_for_run(plan: "_Plan", state) -> None:
    """The disk must hold ``max_to_keep + 1`` checkpoints (orbax writes the next before dropping the oldest), the
    metrics (:data:`METRICS_BYTES_PER_UPDATE` per seed and update) and :data:`MIN_FREE_BYTES` more."""
    spec = plan.spec
    ckpt = (spec.max_to_keep + 1) * _state_bytes(state)
    metrics = plan.num_updates * spec.num_seeds * METRICS_BYTES_PER_UPDATE
    check_free_space(plan.run_dir, ckpt + metrics + MIN_FREE_BYTES,
                     f" ({spec.max_to_keep + 1} checkpoints of {_mb(ckpt / (spec.max_to_keep + 1))}, "
                     f"{_mb(metrics)} of metrics, {_mb(MIN_FREE_BYTES)} for the rest)")


def _orbax_error(record) -> bool:
    return record.levelno >= _pylogging.ERROR and ("orbax" in (record.pathname or "")
                                                   or record.name.startswith("orbax"))


def _drop_orbax_errors(record) -> bool:
    return not _orbax_error(record)


def _closed_loop_noise(args) -> bool:
    """orbax's writer threads, failing (a full disk), leave tensorstore callbacks that find their event loop closed:
    each prints a bare ``RuntimeError: Event loop is closed`` traceback through ``sys.unraisablehook``."""
    return isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed"


@contextlib.contextmanager
def _quiet_background_errors():
    """While a run writes: orbax's error logs (absl, with the traceback of each of its writer threads, hundreds of
    lines for one full disk) and the closed-event-loop tracebacks its failed writers leave are dropped; the error
    they carry reaches the runner as an exception and is reported in one line. After a failure the filters stay
    (orbax's threads may go on failing while the process exits). ``JAXRL_DEBUG=1`` keeps everything."""
    if debug_mode():
        yield
        return
    import sys
    loggers = [_pylogging.getLogger("absl"), _pylogging.getLogger("orbax")]
    for lg in loggers:
        lg.addFilter(_drop_orbax_errors)
    previous = sys.unraisablehook

    def unraisable(args):
        if not _closed_loop_noise(args):
            previous(args)
    sys.unraisablehook = unraisable
    yield  # not restored when the block raises: see above
    for lg in loggers:
        lg.removeFilter(_drop_orbax_errors)
    if sys.unraisablehook is unraisable:
        sys.unraisablehook = previous


AGENT_ALIASES = {"ppo_nethack": "ppo", "heron_nethack": "heron"}
"""Entry points that are other names of one agent (their runs resume with either)."""


def _agent_module(agent: str) -> Optional[str]:
    import importlib.util
    name = f"experiments.{agent}"
    try:
        return name if importlib.util.find_spec(name) is not None else None
    except (ImportError, ValueError):
        return None


def check_same_agent(saved: Mapping, agent: Optional[str], run_dir) -> None:
    """Refuses to resume another agent's run (config.json's ``agent``), naming the command that resumes it: its
    ``module`` (recorded since 2026-12) or ``experiments.<agent>``. Silent when either agent is unknown (then the
    settings comparison says what differs)."""
    theirs = saved.get("agent") if isinstance(saved, Mapping) else None
    if not theirs or not agent or AGENT_ALIASES.get(theirs, theirs) == AGENT_ALIASES.get(agent, agent):
        return
    module = saved.get("module") or _agent_module(theirs)
    if module is None:
        return
    run = saved.get("run")
    if isinstance(run, Mapping) and run.get("study"):  # trained in a study's own process (jaxrl_pref.study.train)
        raise ConfigError("resume", f"{run_dir} is a {theirs} run of the study {module}, not a {agent} run",
                          f"rerun python -m {module} with the output directory it wrote: it resumes its unfinished "
                          "runs")
    raise ConfigError("resume", f"{run_dir} is a {theirs} run ({module}), not a {agent} run",
                      f"resume it with python -m {module} --resume {run_dir}")


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    state: Any                          # final state: batched over seeds (vmap), a list per seed (sequential),
                                        # or unbatched (one seed)
    metrics: dict                       # {k: np.ndarray [num_seeds, updates_done]} (update j+1 in column j)
    updates_done: int
    num_updates: int
    steps_per_update: int
    resumed_from: Optional[int] = None  # update restored from, if resumed
    interrupted: Optional[int] = None   # signal number that stopped the run early
    compile_s: float = 0.0
    train_s: float = 0.0
    paths: dict = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.updates_done >= self.num_updates

    @property
    def env_steps_per_sec(self) -> float:
        """Env steps (all seeds) per second of training in this session, compile time excluded."""
        done = self.updates_done - (self.resumed_from or 0)
        n = next(iter(self.metrics.values())).shape[0] if self.metrics else 1
        return done * self.steps_per_update * n / self.train_s if self.train_s > 0 else math.nan


def chunk_bounds(num_updates: int, checkpoint_every: int) -> list[tuple[int, int]]:
    """``[(0, c), (c, 2c), ..., (k*c, num_updates)]``: the fixed chunking that makes resume exact."""
    return [(a, min(a + checkpoint_every, num_updates)) for a in range(0, num_updates, checkpoint_every)]


def segment_bounds(num_updates: int, checkpoint_every: int, hook_every: int = 0) -> list[tuple[int, int]]:
    """The chunks of :func:`chunk_bounds` cut further at every multiple of ``hook_every`` (0: not cut): the programs
    a run with a chunk hook runs, the hook called after each. Fixed from update 0, like the chunks, so a resumed run
    cuts where an uninterrupted one does."""
    cuts = {b for _, b in chunk_bounds(num_updates, checkpoint_every)}
    if hook_every:
        cuts |= set(range(hook_every, num_updates, hook_every))
    cuts = sorted(cuts)
    return list(zip([0] + cuts[:-1], cuts))


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
    """``[num_seeds, 2]`` raw keys, ``PRNGKey(seed + i)`` for seed ``i`` (so seed i of a vmapped run starts like a
    single-seed run with ``seed + i``)."""
    return jnp.stack([jax.random.PRNGKey(seed + i) for i in range(num_seeds)])


class _LogProxy:
    """Stable callable handed to the trainer; forwards to the logger once it exists (after restore)."""

    def __init__(self):
        self.target = None

    def __call__(self, step, metrics):
        if self.target is not None:
            self.target(step, metrics)


class _GracefulStop:
    """Turns SIGTERM/SIGINT into a flag checked between chunks. A second SIGINT raises :class:`RunAborted` (a
    KeyboardInterrupt) in the main thread, which :meth:`_Session.wait_for` keeps running Python while a chunk
    computes."""

    def __init__(self, enabled: bool, on_signal: Callable[[int], None]):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: Optional[int] = None
        self._on_signal = on_signal
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise RunAborted
        if self.signum is None:
            self.signum = signum
            self._on_signal(signum)

    def __enter__(self):
        if self.enabled:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def _json_safe(obj):
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (np.ndarray, jax.Array)):
            return np.asarray(o).tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")
    return json.loads(json.dumps(obj, default=default))


def _config_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return _json_safe(dataclasses.asdict(cfg))
    if isinstance(cfg, Mapping):
        return _json_safe(dict(cfg))
    raise TypeError("cfg must be a dataclass or a mapping")


def _hp_json(hp) -> Optional[dict]:
    if hp is None:
        return None
    leaves, _ = jax.tree_util.tree_flatten_with_path(hp)
    return {jax.tree_util.keystr(p): np.asarray(x).tolist() for p, x in leaves}


def _diff(saved: Mapping, now: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<unset>"), now.get(k, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            out.append(f"{prefix}{k}: {a!r} in the checkpoint, {b!r} now")
    return out


def _check_same_run(saved: Mapping, identity: Mapping, where) -> None:
    # a field the saved config lacks was added to the code after the run started: the resuming CLI gives it the
    # value that keeps the old behaviour (cli._saved_options), so it is not compared
    saved_cfg = saved.get("config", {})
    now_cfg = {k: v for k, v in identity["config"].items() if k in saved_cfg}
    diffs = _diff({"config": saved_cfg, **{k: saved.get("run", {}).get(k) for k in IDENTITY_KEYS}},
                  {"config": now_cfg, **{k: identity["run"].get(k) for k in IDENTITY_KEYS}})
    if diffs:
        raise ConfigError("resume", f"{where} was started with different settings ("
                          + "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "") + ")",
                          f"pass the options it was started with (see {Path(where) / 'config.json'}), or "
                          "--no-resume to start it over, or another --run-dir")


def _to_host(metrics: Mapping, batched: bool) -> dict:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(jax.device_get(v))
        out[k] = a if batched else a[None]
    return out


def _any_process_signal(signum: Optional[int]) -> Optional[int]:
    """The stop signal received by this or any other process of a multi-process (jax.distributed) run, so that
    every process stops at the same chunk boundary (one that went on alone would block in the next chunk's
    collectives)."""
    if jax.process_count() == 1:
        return signum
    from jax.experimental import multihost_utils
    got = int(np.asarray(multihost_utils.process_allgather(np.int32(signum or 0))).max())
    return got or None


def _first_nan(chunk: Mapping[str, np.ndarray], prefixes: Sequence[str]) -> Optional[tuple[str, int, int]]:
    for k in sorted(chunk):
        if not any(k.startswith(p) for p in prefixes):
            continue
        bad = np.isnan(chunk[k])
        if bad.any():
            s, j = np.argwhere(bad)[np.argmin(np.argwhere(bad)[:, 1])]
            return k, int(s), int(j)
    return None


def _last_checkpoint(run_dir) -> str:
    steps = finished_steps(Path(run_dir) / "checkpoints")
    return (f"the last checkpoint is update {steps[-1]} in {Path(run_dir) / 'checkpoints'}" if steps else
            "no checkpoint was saved")


def run_for_cli(run: Callable[[], "RunResult"], *, module: str, run_dir, unit: str = "update",
                errors: tuple = ()) -> tuple[int, Optional["RunResult"]]:
    """Calls ``run()`` (a :func:`run_experiment` call) for a command-line entry point and maps the outcome to an
    exit status, printing one ``error: ...`` line where it fails: 2 for a bad option or an unusable checkpoint
    (``ConfigError``, ``CheckpointError`` and the extra ``errors``), 1 for divergence, 3
    (:data:`EXIT_WRITE_FAILED`) when the run dir could not be written (disk full, permissions), 130 when SIGINT
    aborted it without saving, ``128 + signal`` when a signal stopped the run after saving (with the ``python -m
    <module> --resume <run_dir>`` line to continue it), else 0. With ``JAXRL_DEBUG=1`` the traceback of the error
    is printed before its line. Returns ``(status, result)``; ``result`` is None when the run raised."""
    import sys
    import traceback

    def fail(status: int, line: str):
        if debug_mode():
            traceback.print_exc()
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
        return status, None

    resume = f"python -m {module} --resume {run_dir}"
    try:
        result = run()
    except DivergenceError as e:
        return fail(1, f"error: {e}")
    except RunDirWriteError as e:
        kept = _last_checkpoint(run_dir)
        kept = kept[0].upper() + kept[1:] + (" (kept)" if kept.startswith("the last") else "")
        then = (f"continue with: {resume}" if (Path(run_dir) / "config.json").is_file() else
                "run the same command again")
        return fail(EXIT_WRITE_FAILED, f"error: {e}. {kept}; {_io_fix(e.errno, run_dir)}, then {then}")
    except (ConfigError, CheckpointError, *errors) as e:
        return fail(2, f"error: {e}")
    except KeyboardInterrupt as e:
        how = "a second SIGINT" if isinstance(e, RunAborted) else "SIGINT"
        kept = _last_checkpoint(run_dir)
        then = f". Continue with: {resume}" if kept.startswith("the last") else ""
        return fail(128 + signal.SIGINT, f"aborted by {how}: stopped at once, without saving; {kept}{then}")
    if result.interrupted is not None:
        print(f"stopped by signal {result.interrupted} after {unit} {result.updates_done}/{result.num_updates} "
              f"(checkpoint saved). Continue with: python -m {module} --resume {run_dir}", file=sys.stderr)
        return 128 + int(result.interrupted), result
    return 0, result


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """How to run an experiment (everything but the trainer and the agent's config); see :func:`run`.

    ``resume``: ``True`` continues from the newest intact checkpoint in ``run_dir`` (or starts fresh if there is
    none); ``False`` starts over, moving the old run's outputs (:data:`RUN_OUTPUTS`: ``checkpoints/``, ``tb/``,
    ``config.json``, ``metrics.*``, the plots) aside as ``<name>.old-<timestamp>``; ``None`` starts fresh but
    refuses (ConfigError) if ``run_dir`` already holds checkpoints. ``agent`` / ``module``: recorded in config.json
    (a run is resumed by the same agent, and a refusal names ``python -m <module>``). ``hp``: hyperparameters passed
    to ``init``/``run`` (``None``: the trainer's defaults); with ``hp_batched`` every leaf has a leading
    ``[num_seeds]`` axis (a sweep: seed ``i`` uses ``hp[i]``). ``num_updates`` / ``steps_per_update`` default to
    ``cfg.num_updates`` / ``cfg.steps_per_update``. ``stop_after``: stop (saved, resumable) once at least
    this many updates are done -- to fit a time slot. ``nan_check``: metric-name prefixes whose NaN stops the run
    (:class:`DivergenceError`). ``stream``: where progress and the summary are printed (default stdout).
    ``trainer_kwargs``: passed on to ``make_trainer``.
    """
    run_dir: Path
    num_seeds: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    resume: Optional[bool] = None
    progress: bool = True
    per_seed: bool = False
    hp: Any = None
    hp_batched: bool = False
    num_updates: Optional[int] = None
    steps_per_update: Optional[int] = None
    agent: Optional[str] = None
    module: Optional[str] = None
    run_info: Optional[Mapping] = None
    stop_after: Optional[int] = None
    max_to_keep: int = 3
    tensorboard: bool = True
    plot: bool = True
    handle_signals: bool = True
    nan_check: Sequence[str] = ("loss",)
    stream: Any = None
    trainer_kwargs: Optional[Mapping] = None


def run_experiment(make_trainer: Callable, cfg, *, run_dir, **options) -> RunResult:
    """Trains ``num_seeds`` seeds of ``make_trainer(cfg, ...)`` in checkpointed chunks: :func:`run` with
    ``RunSpec(run_dir=run_dir, **options)`` (the keywords are :class:`RunSpec`'s fields)."""
    return run(make_trainer, cfg, RunSpec(run_dir=Path(run_dir), **options))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a run derives from the agent's config and its :class:`RunSpec` before anything is built."""
    spec: RunSpec
    num_updates: int
    steps_per_update: int
    sequential: bool   # several devices and seeds: seeds one after another
    vmapped: bool      # several seeds vmapped
    identity: dict     # {"config": ..., "run": ...}, saved and compared on resume

    @property
    def run_dir(self) -> Path:
        return Path(self.spec.run_dir)

    @property
    def hp_axis(self):
        return 0 if self.spec.hp_batched else None

    def hp_of(self, i: int):
        hp = self.spec.hp
        return jax.tree.map(lambda x: x[i], hp) if (self.spec.hp_batched and hp is not None) else hp


def _plan(cfg, spec: RunSpec) -> _Plan:
    if jax.process_count() > 1 and jax.process_index() != 0:  # multi-process (jax.distributed): process 0 logs
        spec = dataclasses.replace(spec, tensorboard=False, plot=False, progress=False)
    for name, example in (("num_seeds", 1), ("log_every", 10), ("checkpoint_every", 100)):
        v = getattr(spec, name)
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(name, f"must be a positive integer, got {v!r}",
                              f"pass e.g. --{name.replace('_', '-')} {example}")
    num_updates = int(cfg.num_updates if spec.num_updates is None else spec.num_updates)
    steps_per_update = spec.steps_per_update
    if steps_per_update is None:  # the config's own (PPO's num_steps * num_envs, SQIRL's episodes x horizon)
        if not hasattr(cfg, "steps_per_update"):
            raise TypeError(f"run_experiment: {type(cfg).__name__} has no steps_per_update (env steps per update, "
                            "per seed); pass steps_per_update=...")
        steps_per_update = int(cfg.steps_per_update)
    sequential = int(getattr(cfg, "num_devices", 1)) > 1 and spec.num_seeds > 1
    if spec.hp_batched and spec.hp is not None:
        bad = [x.shape for x in jax.tree.leaves(spec.hp) if np.ndim(x) == 0 or np.shape(x)[0] != spec.num_seeds]
        if bad:
            raise ConfigError("hp", f"hp_batched needs a leading [num_seeds={spec.num_seeds}] axis on every leaf, "
                              f"got shapes {bad}", "broadcast the hyperparameters to one value per seed")
    run_dict = {"num_seeds": spec.num_seeds, "seed": spec.seed, "checkpoint_every": spec.checkpoint_every,
                "num_updates": num_updates, "hp": _hp_json(spec.hp), "hp_batched": spec.hp_batched,
                "steps_per_update": steps_per_update, "log_every": spec.log_every,
                "seeds_sequential": sequential, **_json_safe(dict(spec.run_info or {}))}
    return _Plan(spec, num_updates, steps_per_update, sequential, spec.num_seeds > 1 and not sequential,
                 {"config": _config_dict(cfg), "run": run_dict})


def _resume_policy(plan: _Plan) -> tuple[bool, list]:
    """Applies ``resume`` before anything expensive; returns (a checkpoint exists, paths moved aside)."""
    run_dir, resume = plan.run_dir, plan.spec.resume
    existing = has_checkpoints(run_dir / "checkpoints")
    if existing and resume is None:
        raise ConfigError("resume", f"{run_dir} already holds checkpoints of a run",
                          "pass --resume to continue it, --no-resume to start it over, or choose another --run-dir")
    if existing and resume:
        try:
            saved_cfg = run_config.read(run_dir)
        except run_config.UnreadableRunConfig:
            saved_cfg = None  # rewritten below from this run's options
        if saved_cfg is not None:
            check_same_agent(saved_cfg, plan.spec.agent, run_dir)
            _check_same_run(saved_cfg, plan.identity, run_dir)
    moved = []
    if resume is False and jax.process_index() == 0:  # start over: the old run's outputs kept aside, one suffix
        with _writing("move the previous run's files aside", run_dir):
            moved = move_aside_all([run_dir / name for name in RUN_OUTPUTS])
    return existing, moved


def _init_state(trainer, plan: _Plan):
    """Every seed's initial state: batched (vmapped seeds), a list (sequential seeds) or one state."""
    spec = plan.spec
    keys = seed_keys(spec.seed, spec.num_seeds)
    if plan.sequential:
        init_one = jax.jit(trainer.init)
        return [init_one(keys[i], plan.hp_of(i)) for i in range(spec.num_seeds)]
    if plan.vmapped:
        return jax.jit(jax.vmap(trainer.init, in_axes=(0, plan.hp_axis)))(keys, spec.hp)
    return jax.jit(trainer.init)(keys[0], plan.hp_of(0))


def run(make_trainer: Callable, cfg, spec: RunSpec) -> RunResult:
    """Trains ``spec.num_seeds`` seeds of ``make_trainer(cfg, log_fn=..., log_every=..., **spec.trainer_kwargs)``
    in checkpointed chunks (see the module docstring). ``cfg`` (the agent's config dataclass) is saved to
    ``config.json`` and compared on resume; ``num_updates``, ``steps_per_update`` and ``num_devices`` are read from
    it unless the spec gives them.

    Returns a :class:`RunResult`. Raises :class:`~jaxrl_pref.config.ConfigError` for bad settings or an unusable
    run dir (before compiling), :class:`~jaxrl_pref.checkpoint.CheckpointError` for unusable checkpoints,
    :class:`DivergenceError` on NaN losses, :class:`RunDirWriteError` when writing the run's outputs fails (disk
    full) and :class:`RunAborted` (a KeyboardInterrupt) on a second SIGINT.
    """
    plan = _plan(cfg, spec)
    spec = plan.spec
    created = check_run_dir(plan.run_dir)  # before anything is built: creatable, writable, not a file
    try:
        existing, moved = _resume_policy(plan)
        proxy = _LogProxy()
        # vmapped seeds log from each chunk's outputs (one transfer per chunk): a callback inside a vmapped scan
        # runs once per seed on every update, whatever log_every says (a device->host round trip each on an
        # accelerator)
        trainer = make_trainer(cfg, log_fn=None if plan.vmapped else proxy, log_every=spec.log_every,
                               **dict(spec.trainer_kwargs or {}))
        if not getattr(trainer, "jittable", True) and spec.num_seeds != 1:
            raise ConfigError("num_seeds", f"a host-env (Sebulba) trainer trains one seed per process, got "
                              f"{spec.num_seeds}", "pass --num-seeds 1 and start one process per seed (--seed 0, ...)")
        t0 = time.perf_counter()
        state = _init_state(trainer, plan)
        _check_disk_for_run(plan, state)  # before the chunk is compiled: the checkpoints' size is known now
    except BaseException:
        _remove_empty(created)
        raise
    session = _Session(trainer, plan, proxy, state, compile_s=time.perf_counter() - t0)
    with _quiet_background_errors():
        ok = False
        try:
            with _writing("create the checkpoint directory", plan.run_dir / "checkpoints"):
                session.ckpt = Checkpointer(plan.run_dir / "checkpoints", max_to_keep=spec.max_to_keep)
            if existing and spec.resume:
                session.restore()
            config_json = {"agent": spec.agent, **({"module": spec.module} if spec.module else {}), **plan.identity}
            with _writing("write config.json", plan.run_dir):
                run_config.write(plan.run_dir, config_json)
            with _writing("create the tensorboard event file", plan.run_dir / "tb"):
                session.logger = Logger(plan.run_dir, num_seeds=spec.num_seeds, steps_per_update=plan.steps_per_update,
                                        log_every=spec.log_every, total_updates=plan.num_updates,
                                        start_update=session.done, progress=spec.progress,
                                        tensorboard=spec.tensorboard, per_seed=spec.per_seed, stream=spec.stream,
                                        description=spec.agent or "training")
            result = session.train(moved)
            ok = True
            return result
        finally:
            session.close(quiet=not ok)  # after a failure: the failure is the error, not what closing then raises


_CHUNK_THREAD = "jaxrl-chunk"


def exit_now_if_aborted(status: int) -> None:
    """After a second SIGINT the aborted chunk still computes in its (daemon) thread, which the interpreter's
    shutdown would tear down under XLA (``terminate called without an active exception``, SIGABRT): an entry point
    exits at once instead, once its outputs are flushed (the run's files are closed by then)."""
    if _Session.chunk_running():
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


class _Session:
    """One process's run over the chunks still to train: compiled programs, checkpoints, metrics, timing."""

    def __init__(self, trainer, plan: _Plan, proxy: _LogProxy, state, compile_s: float):
        self.trainer, self.plan, self.proxy, self.state = trainer, plan, proxy, state
        self.done, self.resumed_from, self.history = 0, None, {}
        self.compile_s, self.train_s = compile_s, 0.0
        self.ckpt: Optional[Checkpointer] = None
        self.logger: Optional[Logger] = None
        self._compiled = {}

    def close(self, quiet: bool) -> None:
        """Closes the logger and the checkpointer (waiting for the last save). ``quiet`` (the run is failing
        already): their errors are dropped, the first failure is the one reported; otherwise a failed write raises
        :class:`RunDirWriteError`."""
        self.proxy.target = None  # an aborted chunk may still be computing (and calling back) in its thread
        for what, close, path in (("write the tensorboard events", self._close_logger, self.plan.run_dir / "tb"),
                                  ("save the last checkpoint", self.ckpt and self.ckpt.close,
                                   self.plan.run_dir / "checkpoints")):
            if not close:
                continue
            if quiet:
                try:
                    close()
                except Exception:  # noqa: BLE001 -- reported already: the run failed before this
                    pass
            else:
                with _writing(what, path):
                    close()

    def _close_logger(self) -> None:
        if self.logger is not None:
            self.logger.close()
            if self.logger.write_error is not None:
                raise self.logger.write_error

    def check_logger(self) -> None:
        """Raises :class:`RunDirWriteError` if tensorboard's writer failed (it writes in a thread of its own)."""
        if self.logger is not None and self.logger.write_error is not None:
            raise RunDirWriteError("write the tensorboard events", self.plan.run_dir / "tb", self.logger.write_error)

    def wait_for(self, stop: "_GracefulStop", fn: Callable):
        """``fn()`` (a compiled chunk) in a worker thread while the main thread waits in short sleeps: a blocking
        call into XLA would hold off Python's signal handlers until the chunk ends, so a second SIGINT could not
        abort it. Without signal handling (or for a host-loop trainer, whose Python loop runs the handlers between
        its steps) ``fn`` runs here."""
        if not stop.enabled or not getattr(self.trainer, "jittable", True):
            return fn()
        box = {}

        def target():
            try:
                box["out"] = fn()
            except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread
                box["err"] = e
            finally:
                _Session._running -= 1
        worker = threading.Thread(target=target, name=_CHUNK_THREAD, daemon=True)
        _Session._running += 1
        worker.start()
        while worker.is_alive():
            worker.join(0.05)
        if "err" in box:
            raise box.pop("err")
        return box["out"]

    _running = 0  # chunks computing in worker threads (see wait_for)

    @staticmethod
    def chunk_running() -> bool:
        """Whether an aborted chunk is still computing in its worker thread (see :meth:`wait_for`)."""
        return _Session._running > 0

    def restore(self) -> None:
        # arrays a reward transform grows during a run (ONI's message table) come back at their saved shape
        resizable = getattr(getattr(self.trainer, "reward", None), "resizable", None)
        restored = self.ckpt.restore(target=self.state, resizable=resizable)
        check_same_agent(restored.extra, self.plan.spec.agent, self.plan.run_dir)
        _check_same_run(restored.extra, self.plan.identity, self.plan.run_dir)
        self.state, self.done, self.resumed_from = restored.state, restored.step, restored.step
        self.history = dict(restored.history or {})
        bounds = {b for _, b in chunk_bounds(self.plan.num_updates, self.plan.spec.checkpoint_every)}
        if self.done not in bounds and self.done != 0:
            raise CheckpointError(self.ckpt.step_dir(self.done), f"update {self.done} is not a chunk boundary of "
                                  "this run", "resume with the same --checkpoint-every, or --no-resume")

    def program(self, n: int):
        """``run(state, hp, n)``: compiled ahead of time on first use per chunk length (timed apart)."""
        if n not in self._compiled:
            t0 = time.perf_counter()
            plan, trainer, state = self.plan, self.trainer, self.state
            body = lambda rs, h: trainer.run(rs, h, n)  # noqa: E731
            if not getattr(trainer, "jittable", True):  # host loop: jits its own pieces
                self._compiled[n] = body
            # the state is donated: each chunk writes its new state into the old one's buffers (the old state is
            # checkpointed already), so a run holds one copy of it on the device, not two
            elif plan.vmapped:
                self._compiled[n] = jax.jit(jax.vmap(body, in_axes=(0, plan.hp_axis)), donate_argnums=0).lower(
                    state, plan.spec.hp).compile()
            else:
                self._compiled[n] = jax.jit(body, donate_argnums=0).lower(state[0] if plan.sequential else state,
                                                                          plan.hp_of(0)).compile()
            self.compile_s += time.perf_counter() - t0
        return self._compiled[n]

    def run_chunk(self, n: int):
        """Trains every seed ``n`` updates from ``self.state``; returns (new state, {k: [num_seeds, n]})."""
        fn, plan = self.program(n), self.plan
        t = time.perf_counter()
        if plan.sequential:
            outs = [fn(self.state[i], plan.hp_of(i)) for i in range(plan.spec.num_seeds)]
            new_state = [o[0] for o in outs]
            chunk = {k: np.stack([np.asarray(jax.device_get(o[1][k])) for o in outs]) for k in outs[0][1]}
        else:
            new_state, m = fn(self.state, plan.spec.hp)
            chunk = _to_host(m, plan.vmapped)
        jax.block_until_ready(new_state)
        jax.effects_barrier()
        self.train_s += time.perf_counter() - t
        return new_state, chunk

    def run_hook(self, hook, update: int) -> None:
        """The trainer's chunk hook on the state after ``update`` (timed with training: it is part of the run's
        cost): on the seed-batched state (``seed_axis=True``), one seed's, or each seed's in turn (sequential)."""
        t = time.perf_counter()
        if self.plan.sequential:
            self.state = [hook(s, update, seed_axis=False) for s in self.state]
        else:
            self.state = hook(self.state, update, seed_axis=self.plan.vmapped)
        self.train_s += time.perf_counter() - t

    def check_nan(self, chunk: Mapping, first_update: int) -> None:
        """Raises :class:`DivergenceError` (metrics written, no checkpoint) if a watched metric is NaN."""
        nan = _first_nan(chunk, self.plan.spec.nan_check)
        if nan is None:
            return
        with _writing("write metrics.csv and metrics.jsonl", self.plan.run_dir):
            write_metrics(self.plan.run_dir, self.history, self.plan.steps_per_update)
        k, s, j = nan
        last = self.ckpt.latest_step()
        kept = (f"the last good checkpoint is update {last} in {self.ckpt.directory}" if last is not None
                else "no checkpoint was saved before it")
        raise DivergenceError(
            f"{k} became NaN at update {first_update + j + 1} (seed {s}): training diverged and was stopped; "
            f"{kept}; metrics up to there are in {self.plan.run_dir / 'metrics.csv'}. Fix: lower --learning-rate "
            "or --max-grad-norm, or normalise observations/rewards")

    def train(self, moved: Sequence[Path]) -> RunResult:
        plan, spec, logger = self.plan, self.plan.spec, self.logger
        if moved:
            logger.message("moved the previous run's files aside: " + ", ".join(str(p) for p in moved))
        if self.resumed_from is not None:
            logger.message(f"resumed {plan.run_dir} at update {self.resumed_from}/{plan.num_updates}")

        def on_signal(signum):
            logger.message(f"received {signal.Signals(signum).name}: finishing the current chunk, then saving and "
                           "stopping (press Ctrl-C again to abort without saving)")

        self.proxy.target = logger
        hook = getattr(self.trainer, "chunk_hook", None)
        checkpoints = {b for _, b in chunk_bounds(plan.num_updates, spec.checkpoint_every)}
        with _GracefulStop(spec.handle_signals, on_signal) as stop:
            for a, b in segment_bounds(plan.num_updates, spec.checkpoint_every,
                                       getattr(hook, "every", 0) if hook is not None else 0):
                if b <= self.done:
                    continue
                if a == self.done or a in checkpoints:  # stop only where the state is checkpointed
                    signum = _any_process_signal(stop.signum)
                    if signum is not None or (spec.stop_after is not None and self.done >= spec.stop_after):
                        stop.signum = stop.signum if stop.signum is not None else signum  # another process's signal
                        break
                logger.reset_timer(a)
                new_state, chunk = self.wait_for(stop, lambda n=b - a: self.run_chunk(n))
                self.history = concat_metrics(self.history, chunk)
                self.check_nan(chunk, a)  # a diverged state is not checkpointed
                self.state, self.done = new_state, b
                if hook is not None:
                    self.run_hook(hook, b)
                    host = hook_metrics(hook, chunk)
                    if host:  # the hook's own numbers (ONI: the annotator's), at the chunk's last update
                        chunk = {**chunk, **host}
                        self.history = concat_metrics(self.history, host, overwrite_last=b - a)
                if b in checkpoints:
                    with _writing(f"save the checkpoint of update {b}", self.ckpt.directory):
                        self.ckpt.save(b, self.state, extra_json={**plan.identity, "agent": spec.agent,
                                                                  "updates_done": b}, history=self.history)
                    with _writing("write metrics.csv and metrics.jsonl", plan.run_dir):
                        write_metrics(plan.run_dir, self.history, plan.steps_per_update)
                if plan.vmapped:
                    logger.log_updates(a, chunk)
                logger.log_chunk(a, chunk)
                self.check_logger()
            interrupted = stop.signum
            if interrupted is not None and self.done >= plan.num_updates:  # it came during the last chunk
                logger.message(f"{signal.Signals(interrupted).name} came during the last chunk, which finished: the "
                               "run is complete (nothing to resume)")
                interrupted = None
            # still under the handler: a SIGTERM now (say a requeue as the run ends) must not kill the last save
            logger.flush()
            with _writing("save the last checkpoint", self.ckpt.directory):
                self.ckpt.wait()
            self.check_logger()
        return self.finish(interrupted)

    def finish(self, interrupted: Optional[int]) -> RunResult:
        plan, history, run_dir = self.plan, self.history, self.plan.run_dir
        paths = {"run_dir": run_dir, "config": run_dir / "config.json", "checkpoints": self.ckpt.directory}
        if history:
            with _writing("write metrics.csv and metrics.jsonl", run_dir):
                paths["metrics_csv"], paths["metrics_jsonl"] = write_metrics(run_dir, history, plan.steps_per_update)
        if plan.spec.plot and history and "episode_return" in history:
            with _writing("write learning_curve.png", run_dir):
                png = plot_learning_curve(history, run_dir / "learning_curve.png", plan.steps_per_update,
                                          title=f"{plan.spec.agent or 'agent'}: "
                                                f"{plan.identity['config'].get('env_name', '')}")
            if png is not None:
                paths["learning_curve"] = png
        if (run_dir / "tb").exists():
            paths["tensorboard"] = run_dir / "tb"
        result = RunResult(run_dir, self.state, history, self.done, plan.num_updates, plan.steps_per_update,
                           self.resumed_from, interrupted, self.compile_s, self.train_s, paths)
        self.logger.message(_summary(result, self.ckpt.latest_step()))
        return result


def concat_metrics(history: Mapping, chunk: Mapping, overwrite_last: int = 0) -> dict:
    """``history`` and a chunk's metrics (``[seeds, n]`` each) side by side, a metric missing on either side NaN there
    (a key first reported mid-run, or not in every chunk). ``overwrite_last=n``: ``chunk`` replaces the history's last
    ``n`` updates of its keys instead of extending them."""
    if not history:
        return dict(chunk)
    first = next(iter(history.values()))
    seeds, width = first.shape[0], first.shape[1] - overwrite_last
    n = next(iter(chunk.values())).shape[1]
    out = {}
    for k in history.keys() | chunk.keys():
        old = history[k][:, :width] if k in history else np.full((seeds, width), np.nan, np.float32)
        new = chunk[k] if k in chunk else (history[k][:, width:] if overwrite_last else
                                           np.full((seeds, n), np.nan, np.float32))
        out[k] = np.concatenate([old, new], axis=1)
    return out


def hook_metrics(hook, chunk: Mapping) -> dict:
    """The chunk hook's ``metrics()`` (host numbers, e.g. ONI's annotator counters) as a chunk's metrics: each value
    at the chunk's last update, for every seed (NaN at the chunk's other updates). ``{}`` if the hook has none."""
    get = getattr(hook, "metrics", None)
    if get is None or not chunk:
        return {}
    seeds, n = next(iter(chunk.values())).shape[:2]
    out = {}
    for k, v in get().items():
        col = np.full((seeds, n), np.nan, np.float32)
        col[:, -1] = v
        out[k] = col
    return out


def _summary(r: RunResult, latest: Optional[int]) -> str:
    seeds = next(iter(r.metrics.values())).shape[0] if r.metrics else 0
    head = (f"finished {r.updates_done} updates" if r.finished else
            f"stopped at update {r.updates_done}/{r.num_updates}"
            + (f" ({signal.Signals(r.interrupted).name})" if r.interrupted else ""))
    if r.updates_done > (r.resumed_from or 0):
        session = (f"this session {r.train_s:.1f} s training ({r.env_steps_per_sec:,.0f} env steps/s) "
                   f"+ {r.compile_s:.1f} s compile")
    else:
        session = "nothing to train in this session"
    lines = [f"{head}: {r.updates_done * r.steps_per_update:,} env steps per seed x {seeds} seed(s); {session}",
             f"outputs in {r.run_dir}/:"]
    p = r.paths
    lines.append("  config.json")
    if "metrics_csv" in p:
        lines.append("  metrics.csv, metrics.jsonl   (one row per seed and update)")
    if "learning_curve" in p:
        lines.append("  learning_curve.png")
    if "tensorboard" in p:
        lines.append(f"  tb/                          tensorboard --logdir {p['tensorboard']}")
    lines.append(f"  checkpoints/                 latest: update {latest}" if latest is not None else
                 "  checkpoints/                 (none saved)")
    return "\n".join(lines)
