"""Fail before the run, not during it (issue 33): what a user sees when the run dir is unusable, the disk fills up,
Ctrl-C is pressed twice, the env id is misspelt, ``--no-resume`` starts over or another agent's run is resumed.

Every expected failure is one ``error: ...`` line naming the fix, without a traceback (``--debug`` /
``JAXRL_DEBUG=1`` adds it); docs/running.md has the exit codes. One run-dir probe, the second Ctrl-C and the full
disk while writing metrics run as a user runs them (``python -m experiments.ppo ...``, a process of their own); the
other commands call the same entry point (``experiments.ppo.main``) in this process, which spares each ~5 s of
imports; the disk-full and last-chunk cases inject their event in-process (a full disk cannot be made without
root)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.cli_run import main_here as run_main

ROOT = Path(__file__).resolve().parents[1]
# 6 updates of 64 env steps, a checkpoint after updates 2, 4 and 6
TINY = ["--num-envs", "4", "--num-steps", "16", "--total-timesteps", "384", "--hidden", "16", "--update-epochs", "1",
        "--num-minibatches", "2", "--checkpoint-every", "2", "--log-every", "2"]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXRL_DEBUG")}
    return {**e, "CI": "true", "PYTHONUNBUFFERED": "1", **extra}


def ppo(*args, timeout=300, **extra):
    return subprocess.run([sys.executable, "-m", "experiments.ppo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env(**extra))


class _Built(BaseException):
    """Raised by what builds a run (not an Exception: no ``except Exception`` on the way can swallow it)."""


def ppo_here(monkeypatch, capsys, *args, build: bool = False):
    """``experiments.ppo.main(args)`` in this process, as ``python -m experiments.ppo`` calls it, in the environment
    of :func:`env`; unless ``build``, PPO's trainer is replaced by a :class:`_Built` failure. Returns ``(status,
    stdout, stderr, JAX's tracing/compiling events while it ran)``."""
    from experiments import launch
    if not build:
        def built(*a, **kw):
            raise _Built("PPO's trainer was built before the check failed")
        monkeypatch.setattr(launch, "train_ppo", built)
    r = run_main(monkeypatch, capsys, "experiments.ppo", *args)
    return r.status, r.out, r.err, r.events


def lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


def checkpoints(d: Path) -> list[int]:
    c = d / "checkpoints"
    return sorted(int(x.name) for x in c.iterdir() if x.name.isdigit()) if c.is_dir() else []


# -- the run dir, checked before anything is built -------------------------------------------------------------------

def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file"


def _read_only_parent(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory anyway")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    return parent / "run"


@pytest.mark.parametrize("case, problem", [
    ("proc", "cannot create /proc/foo"),
    ("file", "is an existing file, not a directory"),
    ("read_only_parent", "permission denied"),
])
def test_unusable_run_dir_is_one_line_before_anything_is_built(tmp_path, monkeypatch, capsys, case, problem):
    run_dir = {"proc": lambda: Path("/proc/foo"), "read_only_parent": lambda: _read_only_parent(tmp_path),
               "file": lambda: _a_file(tmp_path)}[case]()
    status, _, err, compiled = ppo_here(monkeypatch, capsys, "--run-dir", str(run_dir), *TINY)
    assert status == 2, err
    e = lines(err)
    assert len(e) == 1 and e[0].startswith("error: run_dir: ") and problem in e[0] and "Fix: " in e[0], err
    assert "Traceback" not in err
    assert compiled == [], compiled  # nothing built: JAX traced or compiled nothing (and no trainer: _Built)
    if case == "file":
        assert run_dir.read_text() == "x"
    elif case == "read_only_parent":
        assert not run_dir.exists()


def test_unusable_run_dir_as_a_user_runs_it():
    """The same probe as ``python -m experiments.ppo`` in a process of its own, with JAX's compile log."""
    run_dir, problem = Path("/proc/foo"), "cannot create /proc/foo"
    p = ppo("--run-dir", str(run_dir), *TINY, JAX_LOG_COMPILES="1")
    assert p.returncode == 2, p.stderr
    # one error line, the last one; JAX's compile log (and, with the suite's persistent compilation cache, its cache
    # lines) may come before it
    err = [x for x in lines(p.stderr) if x.startswith("error:")]
    assert len(err) == 1 and lines(p.stderr)[-1] == err[0], p.stderr
    assert err[0].startswith("error: run_dir: ") and problem in err[0] and "Fix: " in err[0], p.stderr
    assert "Traceback" not in p.stderr
    # nothing built: importing compiles a few constants' conversions, a run's start its PRNG key and init
    assert not {"jit(_threefry_seed)", "jit(init)", "jit(stage)"} & set(p.stderr.split()), p.stderr
    assert not run_dir.exists()


def test_debug_shows_the_traceback_of_an_expected_error(tmp_path, monkeypatch, capsys):
    status, _, err, _ = ppo_here(monkeypatch, capsys, "--run-dir", "/proc/foo", "--debug", *TINY)
    assert status == 2 and "Traceback" in err, err
    assert lines(err)[-1].startswith("error: run_dir: cannot create /proc/foo"), err


def test_jaxrl_debug_env_var_is_debug_too(monkeypatch, capsys):
    from jaxrl_pref import cli
    from jaxrl_pref.config import ConfigError
    monkeypatch.delenv("JAXRL_DEBUG", raising=False)
    assert not cli.debug_requested([]) and cli.debug_requested(["--debug"])
    monkeypatch.setenv("JAXRL_DEBUG", "1")
    try:
        raise ConfigError("run_dir", "x", "y")
    except ConfigError as e:
        cli._print_error(e)
    err = capsys.readouterr().err
    assert "Traceback" in err and lines(err)[-1] == "error: run_dir: x. Fix: y"


def test_run_dir_check_removes_what_it_created_and_checks_free_space(tmp_path, monkeypatch):
    """In-process: a disk with too little free space is refused, and the directories the check made go again."""
    from jaxrl_pref import runner
    from jaxrl_pref.config import ConfigError
    monkeypatch.setattr(runner.shutil, "disk_usage", lambda p: SimpleNamespace(free=10 * 2 ** 20))
    with pytest.raises(ConfigError, match=r"run_dir: only 10 MB free on the disk of .*needs about 50 MB\. Fix: free "):
        runner.check_run_dir(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()


# -- a full disk mid-run -----------------------------------------------------------------------------------------------

FULL_DISK_AFTER = """
import errno, sys
from jaxrl_pref import cli
cli.setup()
import jaxrl_pref.logging as L
real, calls = L._atomic_write, [0]
def full(path, text):  # the metrics after update 2 are written; then the disk is full
    calls[0] += 1
    if calls[0] > 2:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real(path, text)
L._atomic_write = full
from experiments import ppo
raise SystemExit(ppo.main(sys.argv[1:]))
"""


def test_disk_full_while_writing_metrics_is_one_line_exit_3(tmp_path):
    d = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", FULL_DISK_AFTER, *TINY, "--run-dir", str(d)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env())
    assert p.returncode == 3, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = checkpoints(d)[-1]
    assert lines(p.stderr) == [
        f"error: could not write metrics.csv and metrics.jsonl in {d}: the disk is full (ENOSPC: No space left on "
        f"device). The last checkpoint is update {last} in {d / 'checkpoints'} (kept); free some space (df -h {d}), "
        f"then continue with: python -m experiments.ppo --resume {d}"], p.stderr
    assert last in (4, 6) and not list(d.glob("*.tmp"))  # the metrics' temporary files are removed


def test_disk_full_while_saving_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch, capsys):
    """orbax reports a full disk as tensorstore's ValueError carrying the errno: the save of update 4 fails."""
    import orbax.checkpoint as ocp
    from agents import ppo as agent
    from jaxrl_pref.runner import run_experiment, run_for_cli
    save = ocp.CheckpointManager.save

    def full(self, step, *a, **kw):
        if step == 4:
            raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": Failed to write 1893 bytes to file 7: '
                             "No space left on device [os_error_code='28']")
        return save(self, step, *a, **kw)
    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    cfg = agent.Config(env_name="CartPole-v1", num_envs=4, num_steps=16, total_timesteps=6 * 64, hidden=(16,),
                       update_epochs=1, num_minibatches=2)
    d = tmp_path / "run"
    status, _ = run_for_cli(lambda: run_experiment(agent.make_trainer, cfg, run_dir=d, checkpoint_every=2,
                                                   progress=False, agent="ppo"), module="experiments.ppo", run_dir=d)
    err = capsys.readouterr().err
    assert status == 3 and checkpoints(d) == [2], err
    assert lines(err) == [
        f"error: could not save the checkpoint of update 4 in {d / 'checkpoints'}: the disk is full (ENOSPC: No space "
        f"left on device). The last checkpoint is update 2 in {d / 'checkpoints'} (kept); free some space "
        f"(df -h {d}), then continue with: python -m experiments.ppo --resume {d}"], err


# -- Ctrl-C ------------------------------------------------------------------------------------------------------------

# The chunk the second Ctrl-C must cut: PPO's scanned loop (100,000 updates in one compiled chunk, minutes) and a
# host-env loop (SQIRL through JaxHostEnv, H = 100 updates in one chunk: ~50 s left after update 1 on a loaded 2-core
# machine, 2026-12-07). Each prints a progress line from inside its chunk; the abort cuts the rest.
_LONG_CHUNKS = {
    "scanned": (["experiments.ppo", "--num-envs", "4", "--num-steps", "16", "--total-timesteps", str(64 * 100_000),
                 "--hidden", "16", "--update-epochs", "1", "--num-minibatches", "1", "--checkpoint-every", "100000",
                 "--log-every", "10"], "update ", "update 100000/100000"),
    "host": (["experiments.sqirl", "--env", "DeepSea-20", "--host", "--horizon", "100", "--episodes-per-timestep",
              "8", "--eval-episodes", "8", "--hidden", "16", "--n-epochs", "1", "--checkpoint-every", "100",
              "--log-every", "1"], "update 1/100", "update 100/100"),
}


@pytest.mark.parametrize("loop", sorted(_LONG_CHUNKS))
def test_second_sigint_aborts_a_long_chunk_at_once(tmp_path, loop):
    """README "Resuming": the first SIGINT asks for a stop at the chunk's end, the second one, sent once the first is
    acknowledged, lands mid-chunk and ends the process within seconds: exit 130, nothing saved, no traceback."""
    d = tmp_path / "run"
    argv, started, last = _LONG_CHUNKS[loop]
    proc = subprocess.Popen([sys.executable, "-m", *argv, "--run-dir", str(d)], cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = []
    try:
        deadline = time.time() + 300  # bounds a hang only
        for line in proc.stdout:  # training started: this progress line comes from inside the chunk
            out.append(line)
            if line.startswith(started):
                break
            assert time.time() < deadline, "".join(out)
        proc.send_signal(signal.SIGINT)
        for line in proc.stdout:
            out.append(line)
            if "received SIGINT" in line:
                assert "press Ctrl-C again to abort without saving" in line
                break
        t = time.time()
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
        elapsed = time.time() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(out) + rest
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert elapsed < 5, elapsed  # measured ~0.1 s on 2 loaded cores
    assert lines(err) == ["aborted by a second SIGINT: stopped at once, without saving; no checkpoint was saved"], err
    assert last not in out and "stopped at update" not in out and checkpoints(d) == []


def test_sigint_during_the_last_chunk_says_the_run_finished(tmp_path, capsys):
    """In-process (the signal must land in the last chunk): a SIGINT sent at the last update finishes the run, which
    is complete: exit 0 and no "Continue with --resume"."""
    from agents import ppo as agent
    from jaxrl_pref.runner import run_experiment, run_for_cli
    cfg = agent.Config(env_name="CartPole-v1", num_envs=4, num_steps=16, total_timesteps=6 * 64, hidden=(16,),
                       update_epochs=1, num_minibatches=2)

    def make_trainer(c, log_fn=None, log_every=1, **kw):
        def log(step, metrics):
            if int(step) == 6:  # inside the last chunk (updates 5-6), computing in its worker thread
                os.kill(os.getpid(), signal.SIGINT)
            if log_fn is not None:
                log_fn(step, metrics)
        return agent.make_trainer(c, log_fn=log, log_every=1, **kw)
    d = tmp_path / "run"
    status, r = run_for_cli(lambda: run_experiment(make_trainer, cfg, run_dir=d, checkpoint_every=4, log_every=1,
                                                   progress=False, agent="ppo"), module="experiments.ppo", run_dir=d)
    out, err = capsys.readouterr()
    assert status == 0 and r.finished and r.interrupted is None, err
    assert "SIGINT came during the last chunk, which finished: the run is complete" in out
    assert "finished 6 updates" in out and "stopped" not in out + err and "--resume" not in err
    assert checkpoints(d) == [4, 6]


# -- env ids, --no-resume, another agent's run -------------------------------------------------------------------------

def test_unknown_env_names_the_close_ones_in_one_line(tmp_path, monkeypatch, capsys):
    d = tmp_path / "never-made"
    status, _, err, compiled = ppo_here(monkeypatch, capsys, "--env", "CartPol-v1", "--run-dir", str(d))
    assert status == 2 and "Traceback" not in err, err
    assert len(lines(err)) <= 3 and "Did you mean CartPole-v1" in err, err
    assert "envs.registered()" in err and "Pendulum-v1" not in err  # a pointer, not the 110 names
    assert lines(err)[-1].startswith("error: env_name: unknown environment 'CartPol-v1'. Fix: ")
    assert compiled == [] and not d.exists()


def test_no_resume_keeps_the_old_runs_outputs_aside(tmp_path, monkeypatch, capsys):
    """The old run's metrics.csv (and every other output) is moved aside with one suffix, not overwritten.
    In-process (a run of 6 updates, as the tests of the runner do; the signal handlers it installs are put back)."""
    d = tmp_path / "run"
    (d / "checkpoints" / "2").mkdir(parents=True)
    (d / "checkpoints" / "2" / "_CHECKPOINT_METADATA").write_text("{}")  # a finished checkpoint, to the runner
    (d / "tb").mkdir()
    old = {"metrics.csv": "seed,update\n0,1\n", "metrics.jsonl": "{}\n", "config.json": "{}",
           "learning_curve.png": "png", "labels.db": "kept in place"}
    for name, text in old.items():
        (d / name).write_text(text)
    status, out, err, _ = ppo_here(monkeypatch, capsys, *TINY, "--run-dir", str(d), "--no-resume", build=True)
    assert status == 0, err[-3000:]
    moved = next(x for x in lines(out) if x.startswith("moved the previous run's files aside: "))
    paths = [Path(x) for x in moved.split(": ", 1)[1].split(", ")]
    suffix = paths[0].name.split(".old-")[1]
    assert [x.name for x in paths] == [f"{n}.old-{suffix}" for n in ("checkpoints", "tb", "config.json", "metrics.csv",
                                                                    "metrics.jsonl", "learning_curve.png")]
    for name, text in old.items():
        if name != "labels.db":
            assert (d / f"{name}.old-{suffix}").read_text() == text
    assert (d / "labels.db").read_text() == "kept in place"
    assert (d / "metrics.csv").read_text().count("\n") == 7 and checkpoints(d) == [2, 4, 6]  # the new run's


def test_resuming_another_agents_run_names_the_command_that_resumes_it(tmp_path, capsys):
    """In-process (the check reads config.json only): a HERON run resumed with experiments.ppo, as new runs record
    it (``module``) and as older ones do (``agent`` only)."""
    from experiments import heron, ppo as ppo_exp
    d = tmp_path / "R"
    d.mkdir()
    saved = {"agent": "heron", "module": "experiments.heron",
             "config": dataclasses.asdict(heron.parse(["--total-timesteps", "2048"]).config),
             "run": {"num_seeds": 1, "seed": 0, "checkpoint_every": 100, "log_every": 10}}
    for record in (saved, {k: v for k, v in saved.items() if k != "module"}):
        (d / "config.json").write_text(json.dumps(record))
        with pytest.raises(SystemExit) as e:
            ppo_exp.parse(["--resume", str(d)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and lines(err) == [
            f"error: resume: {d} is a heron run (experiments.heron), not a ppo run. Fix: resume it with python -m "
            f"experiments.heron --resume {d}"], err
    assert heron.parse(["--resume", str(d)]).run.run_dir == str(d)  # its own agent resumes it
    from jaxrl_pref.runner import check_same_agent
    check_same_agent({"agent": "ppo_nethack"}, "ppo", d)  # an alias of the same agent: fine
