"""``python -m experiments.ppo``: option errors before compiling (exit 2, no traceback), --help, runs, resume."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-envs", "4", "--num-steps", "16", "--total-timesteps", "384", "--hidden", "16",
        "--update-epochs", "1", "--num-minibatches", "2", "--checkpoint-every", "4", "--log-every", "2"]


def cli(*args, timeout=240, env=None, **kw):
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device unless a test asks
    e.update(CI="true", **(env or {}))
    return subprocess.run([sys.executable, "-m", "experiments.ppo", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=e, **kw)


@pytest.mark.parametrize("args, field", [
    (["--env", "NoSuchEnv-v0"], "env_name"),
    (["--num-envs", "6", "--num-devices", "4"], "num_envs"),
    (["--num-minibatches", "7"], "num_minibatches"),
    (["--learning-rate", "-0.001"], "learning_rate"),
    (["--num-envs", "4", "--num-devices", "2"], "num_devices"),  # JAX sees one CPU device here
    (["--num-seeds", "0"], "num_seeds"),
])
def test_bad_values_fail_before_compiling(tmp_path, args, field):
    run_dir = tmp_path / "run"
    t = time.perf_counter()
    p = cli(*args, "--run-dir", str(run_dir))
    assert p.returncode == 2, p.stderr
    err = " ".join(p.stderr.split())  # the message may be wrapped in a box
    assert field in err and "Fix:" in err, p.stderr
    assert "Traceback" not in p.stderr
    assert not run_dir.exists()  # nothing was built, let alone compiled
    assert time.perf_counter() - t < 60


def test_help_lists_every_config_field():
    from agents.ppo import Config
    p = cli("--help")
    assert p.returncode == 0
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in p.stdout, f.name
    for flag in ("--num-seeds", "--seed", "--run-dir", "--log-every", "--checkpoint-every", "--resume",
                 "--no-resume", "--progress"):
        assert flag in p.stdout


def test_tiny_run_then_resume(tmp_path):
    d = tmp_path / "run"
    p = cli("--env", "CartPole-v1", "--num-seeds", "2", *TINY, "--run-dir", str(d))
    assert p.returncode == 0, p.stderr
    assert f"outputs in {d}" in p.stdout and "update 6/6" in p.stdout  # plain progress lines on CI
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "learning_curve.png"):
        assert (d / name).is_file(), name
    assert list((d / "tb").glob("events.out.tfevents.*"))
    assert sorted(int(x.name) for x in (d / "checkpoints").iterdir() if x.name.isdigit()) == [4, 6]
    assert json.loads((d / "config.json").read_text())["config"]["env_name"] == "CartPole-v1"
    assert len((d / "metrics.csv").read_text().splitlines()) == 1 + 2 * 6
    # rerunning into the same directory needs a decision
    p = cli("--env", "CartPole-v1", "--num-seeds", "2", *TINY, "--run-dir", str(d))
    assert p.returncode == 2 and "--resume" in p.stderr and "Traceback" not in p.stderr
    # --resume DIR reads the options back; a conflicting explicit option is refused
    p = cli("--resume", str(d), "--learning-rate", "0.001")
    assert p.returncode == 2 and "learning_rate" in p.stderr and "Traceback" not in p.stderr
    p = cli("--resume", str(d))
    assert p.returncode == 0, p.stderr
    assert "resumed" in p.stdout and "nothing to train" in p.stdout


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    d = tmp_path / "run"
    args = ["--num-envs", "4", "--num-steps", "16", "--total-timesteps", str(64 * 100_000), "--hidden", "16",
            "--update-epochs", "1", "--num-minibatches", "1", "--checkpoint-every", "200", "--run-dir", str(d)]
    e = {**os.environ, "CI": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.ppo", *args], cwd=ROOT, env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not (d / "checkpoints" / "200").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert f"--resume {d}" in err and "received SIGTERM" in out
    steps = sorted(int(x.name) for x in (d / "checkpoints").iterdir() if x.name.isdigit())
    assert steps and steps[-1] % 200 == 0 and steps[-1] < 100_000


@pytest.mark.skipif(sys.platform != "linux", reason="forced host devices")
def test_seeds_run_one_after_another_on_several_devices(tmp_path):
    d = tmp_path / "run"
    p = cli("--num-seeds", "2", "--num-devices", "2", *TINY, "--run-dir", str(d),
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert p.returncode == 0, p.stderr
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["run"]["seeds_sequential"] is True
    rows = (d / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 6
    seed0 = [r.split(",")[3:] for r in rows[1:] if r.startswith("0,")]
    seed1 = [r.split(",")[3:] for r in rows[1:] if r.startswith("1,")]
    assert seed0 != seed1  # different seeds, not one seed twice
