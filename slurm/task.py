"""Runs one array task of a sweep: ``python -m slurm.task SWEEP_DIR [INDEX]`` (INDEX defaults to
``$SLURM_ARRAY_TASK_ID``).

It starts ``python -m experiments.<name> <task args> --resume --progress False --run-dir <task run dir>`` as a child
process (:func:`jaxrl_pref.study.execute`), so a requeued or preempted task continues from its newest checkpoint (a
fresh task simply starts); a task that finished gets the ``done`` marker in its run directory; a task run again once
done (``--rerun``) resumes its finished run (nothing is trained twice) and records the attempt. Signals:

* SIGTERM (preemption, ``scontrol requeue``, ``scancel``) is passed on to the run, which finishes its current
  chunk, saves a checkpoint and exits; Slurm requeues the job itself when it was preempted/requeued.
* SIGUSR1 (sent ``signal_lead_s`` before the time limit, ``#SBATCH --signal=B:USR1@...``) does the same and then,
  if the run is not finished, requeues this array task (``scontrol requeue``) so it continues in a new allocation.

The task's run directory gets ``task.json`` (the task), ``git.json`` (the commit it ran) and ``status.json``
(state, exit code, attempts, Slurm ids), which ``python -m slurm.report`` reads.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from jaxrl_pref import study
from jaxrl_pref.study import Run
from slurm.sweep import read_manifest, task_record

REPO = Path(__file__).resolve().parents[1]


def git_info(cwd: Path = REPO) -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    commit = run("rev-parse", "HEAD")
    return {"commit": commit or None, "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))
            if commit else None}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def task_run(sweep_dir: Path, task: dict, index: Optional[int] = None) -> Run:
    """The task (array index ``index``, default the record's) as a study's run (:mod:`jaxrl_pref.study`): its
    experiment, arguments and run directory."""
    index = task.get("index") if index is None else index
    return Run(f"slurm.task {index}", task["module"], task["args"], Path(sweep_dir) / task["run_dir"])


def command(sweep_dir: Path, task: dict, python: Optional[str] = None) -> list[str]:
    """``python -m <experiment> <task args> --resume --progress False --run-dir <task run dir>``."""
    return task_run(sweep_dir, task).command(python)


def requeue_self() -> bool:
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    target = f"{job}_{task}" if job and task else os.environ.get("SLURM_JOB_ID")
    if not target:
        return False
    r = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"slurm.task: scontrol requeue {target} failed: {r.stderr.strip()}", file=sys.stderr, flush=True)
    return r.returncode == 0


def run_task(sweep_dir, index: int, python: Optional[str] = None) -> int:
    sweep_dir = Path(sweep_dir).resolve()
    manifest = read_manifest(sweep_dir)
    task = task_record(sweep_dir, index)
    run_dir = sweep_dir / task["run_dir"]
    run_dir.mkdir(parents=True, exist_ok=True)
    status_path = run_dir / "status.json"
    run = task_run(sweep_dir, task, index)  # run again once done (--rerun): it resumes its finished run, trains nothing
    old = json.loads(status_path.read_text()) if status_path.exists() else {}
    _write_json(run_dir / "task.json", task)
    git = git_info()
    _write_json(run_dir / "git.json", {**git, "submitted_commit": manifest.get("git", {}).get("commit")})
    status = {"state": "running", "task": index, "attempt": int(old.get("attempt", 0)) + 1,
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
              "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
              "host": socket.gethostname(), "started": time.time(), "exit_code": None, "signal": None}
    _write_json(status_path, status)

    python = python or manifest.get("python")
    print(f"slurm.task {index}: {shlex.join(run.command(python))}", flush=True)
    # stop signals are passed on to the run as SIGTERM: it finishes its chunk, saves a checkpoint and exits
    outcome = study.execute(run, python, cwd=REPO)
    rc, signum = outcome.returncode, outcome.signal
    finished = outcome.ok
    requeued = False
    if signum == signal.SIGUSR1 and not finished and manifest.get("slurm", {}).get("requeue_on_timeout", True):
        requeued = requeue_self()
    state = "done" if finished else ("requeued" if requeued else
                                     "interrupted" if signum is not None or rc in (128 + 15, -15) else "failed")
    _write_json(status_path, {**status, "state": state, "exit_code": rc, "ended": time.time(),
                              "signal": signal.Signals(signum).name if signum else None})
    print(f"slurm.task {index}: {state} (exit {rc})", flush=True)
    return 0 if finished else (rc if rc > 0 else 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m slurm.task", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("index", nargs="?", type=int, help="array index (default: $SLURM_ARRAY_TASK_ID)")
    ap.add_argument("--python", help="interpreter for the experiment (default: the sweep's, else this one)")
    a = ap.parse_args(argv)
    index = a.index if a.index is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
    if index is None:
        ap.error("no INDEX given and SLURM_ARRAY_TASK_ID is not set")
    try:
        return run_task(a.sweep_dir, int(index), a.python)
    except ValueError as e:  # ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
