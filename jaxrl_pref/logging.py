"""Host-side logging: tensorboard scalars, a progress display, metric files and learning-curve plots.

:class:`Logger` is a ``log_fn(step, metrics)`` for the jitted training loops (called through
``jax.debug.callback``). Under ``jax.vmap`` over seeds the callback arrives once per seed, with unbatched values,
in no guaranteed seed order -- and, because a batched ``lax.cond`` runs both branches, possibly on every update
rather than every ``log_every``. The logger therefore filters by ``log_every`` itself, buffers the calls of one
update until it has ``num_seeds`` of them, and writes order-independent statistics across seeds (the mean, NaN-aware).
A call may also carry all seeds at once (``step`` and every metric with a leading seed axis), as a
``custom_vmap``-based log hook would send. Exact per-seed curves come from the chunk outputs instead
(:meth:`Logger.log_chunk`), where the seed index is known.

Files: :func:`write_metrics` saves per-update metrics of all seeds as ``metrics.csv`` and ``metrics.jsonl``
(one row per seed and update; NaN -> ``nan`` in CSV, ``null`` in JSON), :func:`read_metrics` loads them back, and
:func:`plot_learning_curve` draws episode return against env steps (mean and min/max band over seeds).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

__all__ = ["Logger", "write_metrics", "read_metrics", "plot_learning_curve", "interactive", "stack_seeds",
           "debug_mode"]


def debug_mode() -> bool:
    """``JAXRL_DEBUG=1`` (``--debug`` sets it): expected failures (a bad option, a full disk...) show their traceback
    and the background writers' errors (orbax, tensorboard) are printed as they happen, not only summed up in the
    one-line error."""
    return os.environ.get("JAXRL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def interactive(stream=None) -> bool:
    """True if ``stream`` (default stdout) is a terminal and we are not on CI (``CI=true``)."""
    stream = sys.stdout if stream is None else stream
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _scalar(v) -> float:
    return float(np.asarray(v, dtype=np.float64).reshape(-1)[0]) if np.size(v) else math.nan


def _nanmean_sorted(values) -> float:
    """Mean of the finite values, summed in sorted order so the result does not depend on callback order."""
    a = np.sort(np.asarray(values, np.float64))
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


class Logger:
    """``log_fn`` for :func:`agents.ppo.make_train` and the experiment runner.

    Args:
      run_dir: tensorboard events go to ``run_dir/tb`` (``None``: no tensorboard).
      num_seeds: how many per-seed calls make up one update under ``vmap`` (1 when not vmapped).
      steps_per_update: env steps per update *per seed* (``num_envs * num_steps`` for PPO); tensorboard's x axis
        is env steps.
      log_every: only updates with ``step % log_every == 0`` are logged (others return at once).
      total_updates: for the progress display.
      start_update: where this session starts (after a resume); tensorboard points past it from an earlier,
        interrupted session are discarded (``purge_step``).
      progress: show progress. A rich progress bar on a terminal, otherwise (pipe, ``CI=true``) a plain line at
        most every ``print_every_s`` seconds and at the last update.
      per_seed: :meth:`log_chunk` writes ``seed_<i>/<metric>`` scalars.
    """

    def __init__(self, run_dir=None, *, num_seeds: int = 1, steps_per_update: int = 1, log_every: int = 1,
                 total_updates: Optional[int] = None, start_update: int = 0, progress: bool = True,
                 tensorboard: bool = True, per_seed: bool = False, print_every_s: float = 10.0,
                 stream=None, description: str = "training"):
        if num_seeds < 1 or log_every < 1 or steps_per_update < 1:
            raise ValueError("num_seeds, log_every and steps_per_update must be >= 1")
        self.num_seeds, self.steps_per_update, self.log_every = num_seeds, steps_per_update, log_every
        self.total_updates, self.per_seed = total_updates, per_seed
        self.history: list[dict] = []  # one row per logged update: {"update", "env_steps", metric: seed mean}
        self.stream = sys.stdout if stream is None else stream
        self.print_every_s = print_every_s
        self._lock = threading.Lock()
        self._pending: dict[int, list[dict]] = {}
        self._last_t, self._last_step = time.perf_counter(), start_update
        self._last_print, self._last_printed_step = -math.inf, None
        self._latest: dict = {}
        self.writer = None
        self.write_error: Optional[BaseException] = None  # tensorboard's writer failed (disk full...): it is off
        if run_dir is not None and tensorboard:
            from tensorboardX import SummaryWriter
            purge = start_update * steps_per_update if start_update > 0 else None
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge, flush_secs=30)
            _watch_tb_threads()
        self._bar = None
        self._mode = "off"
        if progress:
            if interactive(self.stream):
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn)
                self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=Console(file=self.stream), transient=False)
                self._task = self._bar.add_task(description, total=total_updates, completed=start_update, info="")
                self._bar.start()
                self._mode = "bar"
            else:
                self._mode = "lines"

    # -- the log_fn -------------------------------------------------------------------------------------------
    def __call__(self, step, metrics: Mapping[str, Any]) -> None:
        step_arr = np.asarray(step)
        step = int(step_arr.reshape(-1)[0])
        if step % self.log_every:
            return
        if step_arr.ndim == 0:  # one seed's values (a per-seed callback under vmap, or an unbatched run)
            rows = [{k: _scalar(v) for k, v in metrics.items()}]
        else:  # all seeds in one call: leaves carry the seed axes of ``step`` in front
            lead = step_arr.size
            flat = {k: np.asarray(v, np.float64).reshape(lead, -1)[:, 0] for k, v in metrics.items()}
            rows = [{k: float(a[i]) for k, a in flat.items()} for i in range(lead)]
        with self._lock:
            calls = self._pending.setdefault(step, [])
            calls.extend(rows)
            if len(calls) < self.num_seeds:
                return
            del self._pending[step]
            self._write_update(step, calls)

    def _write_update(self, step: int, calls: list[dict], rate: Optional[tuple] = None) -> None:
        keys = sorted(set().union(*calls))
        mean = {k: _nanmean_sorted([c.get(k, math.nan) for c in calls]) for k in keys}
        if rate is None:
            now = time.perf_counter()
            dt, dstep = now - self._last_t, step - self._last_step
            rate = (dstep / dt,) if dt > 0 and dstep > 0 else None
            self._last_t, self._last_step = now, step
        if rate is not None:
            mean["perf/env_steps_per_sec"] = rate[0] * self.steps_per_update * self.num_seeds
            mean["perf/updates_per_sec"] = rate[0]
        env_steps = step * self.steps_per_update
        writer = self.writer  # (closed by another thread meanwhile: a closed writer drops what it is given)
        if writer is not None and self._tb_ok():
            for k, v in mean.items():
                if not math.isnan(v):
                    writer.add_scalar(k, v, env_steps)
        self.history.append({"update": step, "env_steps": env_steps, **mean})
        self._latest = mean
        self._show(step)

    def _info(self) -> str:
        m = self._latest
        parts = []
        if not math.isnan(m.get("episode_return", math.nan)):
            parts.append(f"return {m['episode_return']:.4g}")
        if "perf/env_steps_per_sec" in m:
            parts.append(f"{m['perf/env_steps_per_sec']:,.0f} steps/s")
        return " | ".join(parts)

    def _show(self, step: int, force: bool = False) -> None:
        if self._mode == "bar":
            self._bar.update(self._task, completed=step, info=self._info())
        elif self._mode == "lines":
            now = time.perf_counter()
            last = self.total_updates is not None and step >= self.total_updates
            if step == self._last_printed_step:
                return
            if force or last or now - self._last_print >= self.print_every_s:
                self._last_print, self._last_printed_step = now, step
                total = f"/{self.total_updates}" if self.total_updates else ""
                info = self._info()
                print(f"update {step}{total} | env steps {step * self.steps_per_update:,}"
                      + (f" | {info}" if info else ""), file=self.stream, flush=True)

    # -- host-side extras -------------------------------------------------------------------------------------
    def reset_timer(self, update: int) -> None:
        """Restart the throughput clock at ``update`` (call when a chunk starts, so checkpoint time is excluded)."""
        with self._lock:
            self._last_t, self._last_step = time.perf_counter(), update

    def log_updates(self, first_update: int, metrics: Mapping[str, Any]) -> None:
        """Logs a chunk's updates from its outputs (``metrics[k]``: ``[num_seeds, n]`` for updates ``first_update + 1
        .. first_update + n``) as the callbacks would have: the seed mean of every ``log_every``-th update, with the
        chunk's throughput. For vmapped seeds, whose in-jit callbacks would run once per seed per update."""
        arrays = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
        n = next(iter(arrays.values())).shape[-1] if arrays else 0
        with self._lock:
            now = time.perf_counter()
            dt = now - self._last_t
            rate = ((first_update + n - self._last_step) / dt,) if dt > 0 else None
            for j in range(n):
                u = first_update + j + 1
                if u % self.log_every == 0:
                    seeds = {k: a.reshape(-1, n)[:, j] for k, a in arrays.items()}
                    rows = [{k: float(v[i]) for k, v in seeds.items()} for i in range(len(next(iter(seeds.values()))))]
                    self._write_update(u, rows, rate)
            self._last_t, self._last_step = now, first_update + n

    def log_chunk(self, first_update: int, metrics: Mapping[str, Any]) -> None:
        """Per-seed scalars from a chunk's exact outputs: ``metrics[k]`` has shape ``[num_seeds, n]`` for
        updates ``first_update + 1 .. first_update + n``. Writes ``seed_<i>/<k>`` every ``log_every`` updates when
        ``per_seed`` is on; also advances the progress display (useful when callbacks are off)."""
        arrays = {k: np.asarray(v) for k, v in metrics.items()}
        n = next(iter(arrays.values())).shape[-1] if arrays else 0
        if self.writer is not None and self.per_seed and self._tb_ok():
            for j in range(n):
                u = first_update + j + 1
                if u % self.log_every:
                    continue
                for k, a in arrays.items():
                    a2 = a.reshape(-1, n)
                    for s in range(a2.shape[0]):
                        v = float(a2[s, j])
                        if not math.isnan(v):
                            self.writer.add_scalar(f"seed_{s}/{k}", v, u * self.steps_per_update)
        with self._lock:
            self._show(first_update + n)

    def message(self, text: str) -> None:
        """Prints ``text`` without breaking the progress bar."""
        if self._mode == "bar":
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def _tb_ok(self) -> bool:
        """False once tensorboard's writer thread died (it raised, e.g. on a full disk): the writer is then given up
        (``write_error`` says why) instead of filling its queue, which would block the next ``add_scalar``."""
        if self.writer is None:
            return False
        dead = [w for w in _tb_workers(self.writer) if not w.is_alive()]
        if dead:
            self.write_error = _TB_ERRORS.get(id(dead[0])) or OSError(f"tensorboard's writer thread stopped")
            self._abandon_writer()
            return False
        return True

    def _abandon_writer(self) -> None:
        """Closes the tensorboard writer after a write failed, without raising and without leaving anything that
        would try again (and print a traceback) at exit."""
        writer, self.writer = self.writer, None
        for fw in (getattr(writer, "all_writers", None) or {}).values():
            ew = getattr(fw, "event_writer", None)
            if ew is None or getattr(ew, "_closed", True):
                continue
            worker, q = getattr(ew, "_worker", None), getattr(ew, "_event_queue", None)
            try:
                if worker is not None and worker.is_alive():
                    q.put_nowait(worker._shutdown_signal)
                    worker.join(5.0)
            except Exception:  # noqa: BLE001 -- giving up a broken writer
                pass
            for close in (lambda: ew._ev_writer.close(), lambda: (q.cancel_join_thread(), q.close())):
                try:
                    close()
                except Exception:  # noqa: BLE001
                    pass
            ew._closed = True  # its atexit hook does nothing now

    def flush(self) -> None:
        if self.writer is not None and self._tb_ok():
            try:
                self.writer.flush()
            except OSError as e:
                self.write_error = e
                self._abandon_writer()

    def close(self) -> None:
        """Closes the tensorboard writer (a failure to write is recorded in ``write_error``, not raised) and the
        progress display."""
        if self.writer is not None and self._tb_ok():
            try:
                self.writer.close()
                self.writer = None
            except OSError as e:
                self.write_error = e
                self._abandon_writer()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._mode = "lines_closed"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- metric files ----------------------------------------------------------------------------------------------
def stack_seeds(metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{k: [updates]}`` or ``{k: [seeds, updates]}`` -> ``{k: float64 [seeds, updates]}``."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = a.reshape(1, -1) if a.ndim <= 1 else a.reshape(a.shape[0], -1)
    return out


def _atomic_write(path: Path, text: str) -> None:
    # per-process temporary name: the processes of a multi-process run write the same files concurrently
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: no half-written temporary left behind
        raise


# tensorboardX writes events in a daemon thread: an error there (a full disk) would print a traceback and leave the
# writer's queue unread. Those threads' errors are recorded here (by thread id) and shown only in debug mode; the
# Logger notices the dead thread and reports the error once (``Logger.write_error``).
_TB_ERRORS: dict = {}
_TB_HOOK = None


def _tb_workers(writer) -> list:
    out = []
    for fw in (getattr(writer, "all_writers", None) or {}).values():
        w = getattr(getattr(fw, "event_writer", None), "_worker", None)
        if isinstance(w, threading.Thread):
            out.append(w)
    return out


def _watch_tb_threads() -> None:
    global _TB_HOOK
    if _TB_HOOK is not None:
        return
    previous = threading.excepthook

    def hook(args):
        if type(args.thread).__module__.startswith("tensorboardX") and issubclass(args.exc_type, OSError):
            _TB_ERRORS[id(args.thread)] = args.exc_value
            if not debug_mode():
                return
        previous(args)
    _TB_HOOK = threading.excepthook = hook


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else repr(v)


def write_metrics(run_dir, metrics: Mapping[str, Any], steps_per_update: int, first_update: int = 1,
                  basename: str = "metrics") -> tuple[Path, Path]:
    """Writes ``run_dir/metrics.csv`` and ``metrics.jsonl``: one row per (seed, update) with columns
    ``seed, update, env_steps`` and every metric. ``metrics[k]`` is ``[updates]`` or ``[seeds, updates]``;
    column ``j`` is update ``first_update + j``. Values are written so float32 round-trips exactly."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    m = stack_seeds(metrics)
    keys = sorted(m)
    num_seeds, n = (m[keys[0]].shape if keys else (0, 0))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["seed", "update", "env_steps", *keys])
    lines = []
    cols = {k: m[k].astype(np.float64).tolist() for k in keys}
    for s in range(num_seeds):
        for j in range(n):
            u = first_update + j
            vals = [cols[k][s][j] for k in keys]
            w.writerow([s, u, u * steps_per_update, *map(_fmt, vals)])
            row = {"seed": s, "update": u, "env_steps": u * steps_per_update}
            row.update({k: (None if math.isnan(v) else v) for k, v in zip(keys, vals)})
            lines.append(json.dumps(row))
    csv_path, jsonl_path = run_dir / f"{basename}.csv", run_dir / f"{basename}.jsonl"
    _atomic_write(csv_path, buf.getvalue())
    _atomic_write(jsonl_path, "\n".join(lines) + ("\n" if lines else ""))
    return csv_path, jsonl_path


def read_metrics(path) -> dict[str, np.ndarray]:
    """Reads ``metrics.csv`` or ``metrics.jsonl`` back to ``{k: float32 [seeds, updates]}`` plus ``update`` and
    ``env_steps`` (``[updates]``)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        return {}
    seeds = sorted({int(r["seed"]) for r in rows})
    updates = sorted({int(r["update"]) for r in rows})
    si = {s: i for i, s in enumerate(seeds)}
    ui = {u: i for i, u in enumerate(updates)}
    keys = [k for k in rows[0] if k not in ("seed", "update", "env_steps")]
    out = {k: np.full((len(seeds), len(updates)), np.nan, np.float32) for k in keys}
    steps = np.zeros(len(updates), np.int64)
    for r in rows:
        i, j = si[int(r["seed"])], ui[int(r["update"])]
        steps[j] = int(r["env_steps"])
        for k in keys:
            v = r[k]
            out[k][i, j] = np.nan if v is None or v == "" else float(v)
    out["update"] = np.asarray(updates)
    out["env_steps"] = steps
    return out


def plot_learning_curve(metrics: Mapping[str, Any], path, steps_per_update: Optional[int] = None,
                        key: str = "episode_return", title: Optional[str] = None) -> Optional[Path]:
    """PNG of ``metrics[key]`` against env steps: the mean over seeds with a min/max band.

    ``metrics[key]`` is ``[updates]`` or ``[seeds, updates]``; the x axis is ``metrics["env_steps"]`` if present,
    else ``(update + 1) * steps_per_update`` (updates if ``steps_per_update`` is None). Updates in which no seed
    finished an episode (NaN) are left out. Returns the path, or None if there is nothing to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg directly: no GUI, no global pyplot state
    from matplotlib.figure import Figure

    if key not in metrics:
        return None
    y = stack_seeds({key: metrics[key]})[key].astype(np.float64)
    n = y.shape[1]
    if "env_steps" in metrics:
        x = np.asarray(metrics["env_steps"], np.float64).reshape(-1)[:n]
        xlabel = "env steps (per seed)"
    elif steps_per_update is not None:
        x = (np.arange(n) + 1.0) * steps_per_update
        xlabel = "env steps (per seed)"
    else:
        x = np.arange(n) + 1.0
        xlabel = "update"
    ok = ~np.all(np.isnan(y), axis=0)
    if not ok.any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, lo, hi = np.nanmean(y[:, ok], 0), np.nanmin(y[:, ok], 0), np.nanmax(y[:, ok], 0)
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    seeds = y.shape[0]
    ax.plot(x[ok], mean, lw=1.6, label=f"mean over {seeds} seed{'s' if seeds > 1 else ''}")
    if seeds > 1:
        ax.fill_between(x[ok], lo, hi, alpha=0.25, lw=0, label="min / max")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(key.replace("_", " "))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_oni_curves(metrics: Mapping[str, Any], path, steps_per_update: int) -> None:
    """ONI's three panels over env steps: extrinsic vs intrinsic reward per step, episode return, label counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def get(k):  # mean over seeds; updates where no episode ended stay NaN
        if k not in metrics:
            return None
        a = np.asarray(metrics[k], np.float64)
        a = a.reshape(-1, a.shape[-1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(a, 0)
    n = np.shape(next(iter(metrics.values())))[-1]
    x = (np.arange(n) + 1) * steps_per_update
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for k, lab in (("reward/extrinsic", "extrinsic"), ("reward/intrinsic", "intrinsic (normalised)")):
        if get(k) is not None:
            ax[0].plot(x, get(k), label=lab)
    ax[0].set_title("reward per step")
    ax[0].legend()
    if get("episode_return") is not None:
        r = get("episode_return")
        ok = ~np.isnan(r)
        ax[1].plot(x[ok], r[ok])
    ax[1].set_title("episode return (extrinsic)")
    for k in ("labels/labeled", "labels/positive", "labels/pairs", "messages/distinct_seen"):
        if get(k) is not None and np.nanmax(get(k)) > 0:
            ax[2].plot(x, get(k), label=k.split("/")[1])
    ax[2].set_title("annotation")
    ax[2].legend()
    for a in ax:
        a.set_xlabel("env steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
