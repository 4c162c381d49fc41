"""A study's runs, each trained once and continued where it stopped: one home for what studies and sweeps share.

A study (``experiments.sparse_study``, ``experiments.oni_compare``, a Slurm sweep's array task in ``slurm.task``) is
a list of :class:`Run`\\ s, each ``(name, module, argv, run_dir)``, started as a child process through the common
command line (:mod:`jaxrl_pref.cli`)::

    python -m <module> <argv> --resume --progress False --run-dir <run_dir>

* **resume**: ``--resume`` continues an interrupted run from its newest checkpoint (a fresh one simply starts), so
  running a study's command again continues it;
* **done marker**: a run that exits 0 gets ``run_dir/done`` (holding its module and argv); :func:`run_grid` skips
  a run whose marker matches (:func:`is_done`). An empty marker (written before 2026-12) or a Slurm task's
  ``status.json`` saying ``done`` counts as done too; a marker of other options does not: the run is started
  again and its ``--resume`` restores it, or refuses a run dir of other settings by name;
* **signals**: SIGTERM, SIGUSR1 and SIGINT that reach this process while a run is running are passed on to it as
  SIGTERM (:func:`execute`): it finishes its chunk, saves a checkpoint and exits; the study then stops
  (:class:`Stopped`) and its command continues it. A run sharing the terminal gets Ctrl-C itself as well; a
  second Ctrl-C aborts it without saving, as it does a run started by hand;
* **failures**: a run that fails is named with its exit status, its command and its log (:class:`RunFailed`). With
  ``log=True`` the run's output is shown as it runs and appended to ``run_dir/run.log``.

Studies that train in this process (``experiments.heron_compare``, ``sqirl_vs_ppo``, ``effective_horizon``: custom
rewards, a trained state to evaluate, hyperparameters vmapped in one program) go through the runner with
:func:`train`: the same run-dir outputs (``config.json``, ``metrics.csv``, ``checkpoints/``), resumed the same way,
marked done the same way.

This module starts experiments by module name only: it imports none of them.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["Run", "Outcome", "RunFailed", "Stopped", "DONE", "LOG", "STOP_SIGNALS", "is_done", "mark_done",
           "execute", "run_grid", "train"]

DONE = "done"
"""The marker a finished run's directory gets."""
LOG = "run.log"
"""Where :func:`execute` appends a run's output (``log=True``)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""Signals passed on to a running run as SIGTERM (save and stop)."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a study: ``python -m <module> <argv>`` in ``run_dir``, called ``name`` in messages (e.g.
    ``doorkey16/ppo/seed1``)."""
    name: str
    module: str
    argv: tuple[str, ...]
    run_dir: Path

    def __post_init__(self):
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))
        object.__setattr__(self, "run_dir", Path(self.run_dir))

    def command(self, python: Optional[str] = None) -> list[str]:
        """The command that runs it, or continues it from its newest checkpoint."""
        return [python or sys.executable, "-m", self.module, *self.argv, "--resume", "--progress", "False",
                "--run-dir", str(self.run_dir)]

    def marker(self) -> dict:
        """What its done marker holds: a marker of other options is not this run's."""
        return {"module": self.module, "argv": list(self.argv)}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_done(run_dir, run: Optional[Run] = None) -> bool:
    """Whether the run in ``run_dir`` finished: its done marker (written by :func:`mark_done`; with ``run``, one of
    ``run``'s module and argv, or an empty one of before 2026-12), or its ``status.json`` (a Slurm task's) saying
    ``done``."""
    run_dir = Path(run_dir)
    marker = run_dir / DONE
    if marker.is_file():
        if run is None:
            return True
        text = marker.read_text().strip()
        if not text:
            return True
        try:
            return json.loads(text) == run.marker()
        except ValueError:
            return False
    status = _read_json(run_dir / "status.json")
    return isinstance(status, dict) and status.get("state") == "done"


def mark_done(run_dir, run: Optional[Run] = None) -> None:
    """Writes ``run_dir``'s done marker (with ``run``'s module and argv)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{DONE}.tmp"
    tmp.write_text(json.dumps(run.marker()) + "\n" if run is not None else "")
    os.replace(tmp, run_dir / DONE)


@dataclasses.dataclass
class Outcome:
    """How one :func:`execute` of a run ended: the child's exit status (negative: killed by that signal), the stop
    signal this process passed on (None if none came) and where its output was appended (None: not kept)."""
    run: Run
    command: list[str]
    returncode: int
    signal: Optional[int] = None
    log: Optional[Path] = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class RunFailed(RuntimeError):
    """A run of a study failed: names it, its exit status, its command and its log. ``outcomes``: those of every
    run executed, this one included (in :func:`run_grid` with ``keep_going``, the ones after it too)."""

    def __init__(self, outcome: Outcome, outcomes: Sequence[Outcome] = ()):
        self.outcome, self.outcomes = outcome, list(outcomes) or [outcome]
        o = outcome
        how = (f"was killed by {_signal_name(-o.returncode)}" if o.returncode < 0 else
               f"failed with exit status {o.returncode}")
        log = f"; its output is in {o.log}" if o.log is not None else ""
        super().__init__(f"run {o.run.name} {how}{log}; command: {shlex.join(o.command)}. Finished runs are kept: "
                         "run the same command again to continue from this run")


class Stopped(RuntimeError):
    """A signal stopped a study during one of its runs (which saves its checkpoint first): running the study's
    command again continues it."""

    def __init__(self, name: str, signum: int):
        self.name, self.signum = name, int(signum)
        super().__init__(f"stopped by {_signal_name(self.signum)} during run {name}; run the same command again to "
                         "continue from its last checkpoint")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def failure_status(e: BaseException) -> int:
    """Says ``error: <e>`` on stderr and returns a study's exit status for it: 128 + the signal for :class:`Stopped`
    (run the command again to continue), 1 for :class:`RunFailed`, 2 otherwise (a ``ConfigError``: e.g. a run dir
    holding a run of other settings)."""
    print(f"error: {e}", file=sys.stderr)
    return e.exit_status if isinstance(e, Stopped) else 1 if isinstance(e, RunFailed) else 2


class _Tee:
    """Copies a child's output pipes, each to its stream (stdout, stderr) as it comes, and all to one log file,
    which it closes once every pipe is at its end (every writer closed it)."""

    def __init__(self, log_file, pipes: Sequence[tuple[Any, Any]]):
        self.log_file, self.lock, self.open = log_file, threading.Lock(), len(pipes)
        self.threads = [threading.Thread(target=self._copy, args=p, daemon=True) for p in pipes]
        for t in self.threads:
            t.start()

    def _copy(self, src, stream) -> None:
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = src.fileno()
        try:
            while True:
                data = os.read(fd, 1 << 16)
                if not data:
                    break
                with self.lock:
                    self.log_file.write(data)
                    self.log_file.flush()
                text = decode.decode(data)
                if text:
                    stream.write(text)
                    stream.flush()
        finally:
            src.close()
            with self.lock:
                self.open -= 1
                if not self.open:
                    self.log_file.close()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


def execute(run: Run, python: Optional[str] = None, *, cwd=None, log: bool = False, stream=None, err_stream=None,
            forward: Sequence[int] = STOP_SIGNALS) -> Outcome:
    """Runs ``run`` (:meth:`Run.command`) to its end and returns its :class:`Outcome`; marks it done if it exits 0.

    The signals ``forward`` that reach this process meanwhile are passed on to the run as SIGTERM (said on
    ``stream``, default stdout); the handlers are in place before the run starts, so a signal that comes early is
    neither lost nor fatal here (SIGUSR1's default), and the run gets it as soon as it exists. ``log``: the run's
    output goes to ``stream`` and ``err_stream`` (default stderr) and is appended to ``run_dir/run.log`` (otherwise
    it inherits this process's stdout and stderr)."""
    stream, err_stream = stream or sys.stdout, err_stream or sys.stderr
    cmd = run.command(python)
    got: dict[str, Any] = {"signum": None, "child": None}

    def on_signal(signum, frame):
        if got["signum"] is None:
            got["signum"] = signum
            print(f"{run.name}: got {_signal_name(signum)}, asking the run to save and stop", file=stream, flush=True)
        try:
            if got["child"] is not None:
                got["child"].send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in forward:
            old[s] = signal.signal(s, on_signal)
    log_path = log_file = None
    try:
        kw: dict[str, Any] = {"cwd": cwd}
        if log:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            log_path = run.run_dir / LOG
            log_file = open(log_path, "ab")
            log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
            # the run's output through pipes, unbuffered so that it shows as it comes
            kw.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            child = got["child"] = subprocess.Popen(cmd, **kw)
        except BaseException:
            if log_file is not None:
                log_file.close()
            raise
        tee = _Tee(log_file, [(child.stdout, stream), (child.stderr, err_stream)]) if log else None
        if got["signum"] is not None:
            child.send_signal(signal.SIGTERM)
        rc = child.wait()
        if tee is not None:
            # the rest of its output; a process it left behind that holds a pipe (its own child) is not waited for:
            # the copy goes on in the background until that one exits
            tee.join(timeout=10)
        if rc == 0:  # (still under the handlers: a signal now must not lose the marker)
            mark_done(run.run_dir, run)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return Outcome(run, cmd, rc, got["signum"], log_path)


def run_grid(runs: Sequence[Run], python: Optional[str] = None, *, cwd=None, log: bool = True, stream=None,
             keep_going: bool = False) -> list[Outcome]:
    """Runs every run of ``runs`` not done yet (:func:`is_done`), in order, each announced as ``+ <command>``;
    returns the outcomes of those it ran. A failed run raises :class:`RunFailed` (``keep_going``: after the rest
    have run; the first failure is raised, every outcome is on its ``outcomes``); a run stopped by a signal raises
    :class:`Stopped` at once."""
    stream = stream or sys.stdout
    outcomes, failed = [], []
    for run in runs:
        if is_done(run.run_dir, run):
            continue
        print("+", shlex.join(run.command(python)), file=stream, flush=True)
        o = execute(run, python, cwd=cwd, log=log, stream=stream)
        outcomes.append(o)
        if o.signal is not None:  # (a run that finished as it came is done: the study stops after it all the same)
            raise Stopped(run.name, o.signal)
        if o.ok:
            continue
        failed.append(o)
        if not keep_going:
            break
    if failed:
        raise RunFailed(failed[0], outcomes)
    return outcomes


def train(name: str, make_trainer: Callable, cfg, run_dir, **options):
    """Trains one run of a study in this process through the runner (:func:`jaxrl_pref.runner.run_experiment`;
    ``options`` are :class:`~jaxrl_pref.runner.RunSpec` fields, ``progress`` off unless given): resumed from its
    newest checkpoint in ``run_dir`` (a finished run is restored, not trained again: its state and metrics come
    back), its outputs those of a command-line run (``config.json``, ``metrics.csv``, ``checkpoints/``, ...), marked
    done when it finishes. Returns the :class:`~jaxrl_pref.runner.RunResult`; raises :class:`Stopped` when
    SIGTERM/SIGINT stopped it (after its chunk, saved) and ``ConfigError`` naming the run when ``run_dir`` holds
    a run of other settings."""
    from jaxrl_pref.config import ConfigError
    from jaxrl_pref.runner import run_experiment
    try:
        result = run_experiment(make_trainer, cfg, run_dir=run_dir, resume=True, **{"progress": False, **options})
    except ConfigError as e:
        if e.field != "resume":
            raise
        problem = str(e).split(". Fix: ")[0].removeprefix(f"{e.field}: ")
        raise ConfigError(f"run {name}", problem, "run the study with the settings it was started with, or choose "
                          "another output directory, or move that run away to train it again") from None
    if result.interrupted is not None:
        raise Stopped(name, result.interrupted)
    mark_done(run_dir)
    return result
