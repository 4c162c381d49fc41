"""Submit a sweep as one Slurm array job: ``python -m slurm.submit sweep.yaml``.

Expands the sweep file (see :mod:`slurm.sweep` and ``slurm/examples/``) into array tasks, writes
``SWEEP_DIR/{manifest.json, tasks/<i>.json, job.sbatch}`` and runs ``sbatch job.sbatch``. Each task runs
``python -m slurm.task SWEEP_DIR $SLURM_ARRAY_TASK_ID`` -> ``python -m experiments.<name> ... --run-dir
SWEEP_DIR/runs/... --resume`` (resumes from its checkpoint when requeued/preempted). Then::

    squeue --me                              # watch it
    python -m slurm.report SWEEP_DIR         # table, plots, failed/missing tasks with the command to rerun them

Options: ``--dry-run`` prints the job script and the task commands without writing or submitting anything;
``--local`` runs the tasks one after another here (no Slurm); ``--rerun SWEEP_DIR --tasks 3,7`` resubmits some
tasks of an existing sweep (they resume from their checkpoints).

Before anything is written or submitted, every task's command is parsed by the experiment's own parser and checks
(:mod:`slurm.validate`): a bad option, value or env id is one line per problem, ``error: task 3 (learning_rate=abc,
seed 1): learning_rate: ... Fix: ...`` (``tasks 0-7: ...`` when several share it), and exit status 2.

Exit status: 0 submitted (or, with ``--local``, every task finished); 1 ``--local``: some task failed (named on
stderr); 2 a bad sweep file, option or task command (nothing written or submitted).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from jaxrl_pref.config import ConfigError
from slurm import sweep as sw
from slurm import validate
from slurm.task import REPO, command, git_info, run_task


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def job_script(name: str, sweep_dir: Path, opts: sw.SlurmOptions, array: str, python: str) -> str:
    """The sbatch script of a sweep (every option on an ``#SBATCH`` line, so ``sbatch job.sbatch`` reproduces it
    and ``sbatch --array=3,7 job.sbatch`` reruns some tasks)."""
    lines = ["#!/usr/bin/env bash",
             f"# sweep {name}: python -m slurm.report {sweep_dir}",
             f"#SBATCH --job-name=jaxrl-{name}",
             f"#SBATCH --array={array}",
             f"#SBATCH --output={sweep_dir}/logs/%A_%a.out",
             "#SBATCH --open-mode=append",
             f"#SBATCH --time={opts.time}",
             "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={opts.cpus_per_task}"]
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={opts.gpus_per_task}")
    if opts.mem:
        lines.append(f"#SBATCH --mem={opts.mem}")
    if opts.account:
        lines.append(f"#SBATCH --account={opts.account}")
    if opts.qos:
        lines.append(f"#SBATCH --qos={opts.qos}")
    lines += ["#SBATCH --requeue",
              f"#SBATCH --signal=B:USR1@{opts.signal_lead_s}"]
    lines += [f"#SBATCH {e}" for e in opts.extra]
    lines += ["set -uo pipefail",
              f"cd {shlex.quote(str(REPO))}",
              "export PYTHONUNBUFFERED=1",
              f'echo "task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID on $(hostname), '
              f'restart ${{SLURM_RESTART_COUNT:-0}}"']
    lines += list(opts.setup)
    # exec: the task runner itself receives the batch-shell signals (B:USR1) and passes them on to the run
    lines.append(f'exec {shlex.quote(python)} -m slurm.task {shlex.quote(str(sweep_dir))} "$SLURM_ARRAY_TASK_ID"')
    return "\n".join(lines) + "\n"


def sbatch(script: Path, array: Optional[str] = None) -> str:
    cmd = ["sbatch", "--parsable"] + ([f"--array={array}"] if array else []) + [str(script)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("sbatch", "is not installed here (no Slurm client)",
                          "run this on a Slurm login node, or use --local / --dry-run") from None
    if r.returncode != 0:
        said = [ln.strip() for ln in (r.stderr.strip() or r.stdout.strip()).splitlines() if ln.strip()]
        raise ConfigError("sbatch", f"failed: {'; '.join(said)}",  # one line
                          f"check the #SBATCH options in {script} (partition/time/gpus) against `sinfo`")
    return r.stdout.strip().split(";")[0]


def _record_submission(sweep_dir: Path, job_id: str, array: str) -> None:
    path = sweep_dir / sw.MANIFEST
    m = json.loads(path.read_text())
    m.setdefault("submissions", []).append({"job_id": job_id, "array": array, "time": time.time()})
    path.write_text(json.dumps(m, indent=2, default=str))


class TasksFailed(RuntimeError):
    """``--local``: some tasks did not finish (``failed``: their indices)."""

    def __init__(self, sweep_dir: Path, failed: Sequence[int], total: int):
        self.sweep_dir, self.failed = sweep_dir, list(failed)
        super().__init__(f"{len(self.failed)} of {total} task(s) failed: {validate.compress(self.failed)} (their "
                         f"output is above; python -m slurm.report {sweep_dir} lists them with the command that reruns "
                         "them)")


def check_commands(module: str, tasks: Sequence[dict], sweep_dir: Path, python: str, points: dict,
                   stream, cpu_checks: bool = False) -> bool:
    """Every task's command, exactly as :func:`slurm.task.command` will run it, through the experiment's parser and
    checks; raises :class:`slurm.validate.TasksInvalid` (one line per problem) before anything is written."""
    if cpu_checks:
        validate.keep_jax_on_cpu()
    argv = lambda t: command(sweep_dir, {"module": module, **t}, python)[3:]  # noqa: E731 -- after -m module
    return validate.check_tasks(module, tasks, argv, points, stream)


def submit(sweep_file, out: Optional[str] = None, dry_run: bool = False, local: bool = False,
           python: Optional[str] = None, stream=None, cpu_checks: bool = False) -> Optional[Path]:
    """Checks every task's command, then writes the sweep directory and submits it (``local``: runs its tasks
    here, raising :class:`TasksFailed` if any failed). ``cpu_checks``: keep this process's JAX on the CPU while
    checking (the CLI does; :func:`slurm.validate.keep_jax_on_cpu`)."""
    stream = stream or sys.stdout
    s = sw.load(sweep_file)
    pts, tasks = sw.expand(s)
    python = python or s.python or default_python()
    sweep_dir = Path(out or s.output_dir or f"runs/sweeps/{s.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    sweep_dir = (sweep_dir if sweep_dir.is_absolute() else REPO / sweep_dir).resolve()
    checked = check_commands(s.module, [t.to_json() for t in tasks], sweep_dir, python,
                             {p.index: p.name for p in pts}, stream, cpu_checks)
    array = sw.array_spec(range(len(tasks)), s.slurm.throttle)
    script = job_script(s.name, sweep_dir, s.slurm, array, python)
    print(f"sweep {s.name}: {len(pts)} grid point(s) x {len(s.seeds)} seed(s) = {sum(len(t.members) for t in tasks)} "
          f"run(s) in {len(tasks)} array task(s)" + (f"; every task's command passes {s.module}'s checks"
                                                         if checked else ""), file=stream)
    if dry_run:
        print(f"--- job script (would be {sweep_dir}/job.sbatch) ---", file=stream)
        print(script, file=stream)
        print("--- array tasks ---", file=stream)
        for t in tasks:
            print(f"[{t.index}] " + shlex.join(command(sweep_dir, {"module": s.module, **t.to_json()}, python)),
                  file=stream)
        return None
    if (sweep_dir / sw.MANIFEST).exists():
        raise ConfigError("out", f"{sweep_dir} already holds a sweep",
                          f"pick another --out, or rerun its tasks with --rerun {sweep_dir} --tasks ...")
    sw.write_manifest(sweep_dir, s, pts, tasks, {"python": python, "git": git_info(), "sweep_file":
                                                  str(Path(sweep_file).resolve()), "created": time.time()})
    (sweep_dir / "logs").mkdir(exist_ok=True)
    (sweep_dir / "job.sbatch").write_text(script)
    print(f"wrote {sweep_dir}/ (manifest.json, tasks/, job.sbatch)", file=stream)
    if local:
        failed = _run_local(sweep_dir, range(len(tasks)), python, stream)
        if failed:
            raise TasksFailed(sweep_dir, failed, len(tasks))
        return sweep_dir
    job = sbatch(sweep_dir / "job.sbatch")
    _record_submission(sweep_dir, job, array)
    print(f"submitted array job {job} ({array}); report: python -m slurm.report {sweep_dir}", file=stream)
    return sweep_dir


def _run_local(sweep_dir: Path, indices, python: str, stream) -> list[int]:
    """Runs the tasks here one after another; returns the indices of those that failed."""
    failed = []
    for i in indices:
        print(f"--- task {i} (local) ---", file=stream, flush=True)
        if run_task(sweep_dir, i, python) != 0:
            failed.append(i)
    print(f"local run done; {len(failed)} failed task(s) {failed if failed else ''}; report: python -m slurm.report "
          f"{sweep_dir}", file=stream)
    return failed


def parse_indices(text: str) -> list[int]:
    """``"1,3-5"`` -> ``[1, 3, 4, 5]``; anything else raises :class:`ConfigError` (field ``tasks``)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ConfigError("--tasks", f"{part!r} is not a task index or range" +
                              (f" (in --tasks {text!r})" if part != text.strip() else ""),
                              "pass array indices and ranges, comma-separated, e.g. --tasks 3,7-9")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out += list(range(a, b + 1))
    return sorted(set(out))


def rerun(sweep_dir, indices: Sequence[int], local: bool = False, stream=None, cpu_checks: bool = False) -> None:
    """Resubmits (``local``: runs here, raising :class:`TasksFailed` if any failed) tasks of a sweep, after checking
    their commands as :func:`submit` does."""
    stream = stream or sys.stdout
    sweep_dir = Path(sweep_dir).resolve()
    m = sw.read_manifest(sweep_dir)
    n = len(m["tasks"])
    bad = [i for i in indices if not 0 <= i < n]
    if bad or not indices:
        raise ConfigError("tasks", f"indices {bad or 'none'} are not tasks of this sweep (0..{n - 1})",
                          "pass e.g. --tasks 0,3-5")
    python = m.get("python") or default_python()
    # tasks/<i>.json: what slurm.task will run
    check_commands(m["module"], [sw.task_record(sweep_dir, i) for i in indices], sweep_dir, python,
                   {p["index"]: p["name"] for p in m.get("points", [])}, stream, cpu_checks)
    if local:
        failed = _run_local(sweep_dir, indices, python, stream)
        if failed:
            raise TasksFailed(sweep_dir, failed, len(indices))
        return
    array = sw.array_spec(indices, m["slurm"].get("throttle"))
    job = sbatch(sweep_dir / "job.sbatch", array)
    _record_submission(sweep_dir, job, array)
    print(f"resubmitted tasks {array} as job {job}", file=stream)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=sw.__doc__)
    ap.add_argument("sweep_file", nargs="?", help="YAML/JSON sweep file")
    ap.add_argument("--out", help="sweep directory (default: runs/sweeps/<name>-<time>, or output_dir in the file)")
    ap.add_argument("--dry-run", action="store_true", help="print the job script and task commands; change nothing")
    ap.add_argument("--local", action="store_true", help="run the tasks here one after another instead of sbatch")
    ap.add_argument("--python", help="interpreter on the compute nodes (default: .venv/bin/python of this repo)")
    ap.add_argument("--rerun", metavar="SWEEP_DIR", help="resubmit tasks (--tasks) of an existing sweep")
    ap.add_argument("--tasks", help="array indices for --rerun, e.g. 3,7-9")
    a = ap.parse_args(argv)
    try:
        if a.rerun:
            if not a.tasks:
                raise ConfigError("tasks", "--rerun needs --tasks", "pass e.g. --tasks 3,7 (see slurm.report)")
            rerun(a.rerun, parse_indices(a.tasks), a.local, cpu_checks=True)
        elif a.sweep_file:
            submit(a.sweep_file, a.out, a.dry_run, a.local, a.python, cpu_checks=True)
        else:
            ap.error("give a sweep file (or --rerun SWEEP_DIR --tasks ...)")
    except ConfigError as e:
        for line in getattr(e, "lines", None) or [str(e)]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except TasksFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
