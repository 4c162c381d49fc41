"""``python -m experiments.ppo``: option errors before compiling (exit 2, no traceback), --help, runs, resume.

What a process shows (signals: SIGINT and SIGTERM save and exit ``128 + signal``; several forced host devices) runs
as a user runs it, ``python -m experiments.ppo ...`` in a process of its own; parsing, the outputs of a run and the
exit status ``main`` returns are checked in this process (``experiments.<name>.main(argv)``, what ``python -m``
calls), which spares each command ~5-10 s of JAX start-up; ``test_cli_errors.py`` and the SIGINT test below check
the status a shell sees."""
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

from tests.cli_run import main_here as run_main

ROOT = Path(__file__).resolve().parents[1]
RUN_PROGRAMS = {"_threefry_seed", "init", "stage"}  # what JAX_LOG_COMPILES=1 names when a PPO run starts
TINY = ["--num-envs", "4", "--num-steps", "16", "--total-timesteps", "384", "--hidden", "16",
        "--update-epochs", "1", "--num-minibatches", "2", "--checkpoint-every", "4", "--log-every", "2"]


def cli(*args, timeout=240, env=None, **kw):
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device unless a test asks
    e.update(CI="true", **(env or {}))
    return subprocess.run([sys.executable, "-m", "experiments.ppo", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=e, **kw)


def main_here(monkeypatch, capsys, *args, module: str = "experiments.ppo", fresh: bool = False):
    """``<module>.main(args)`` in this process with JAX's compile log (:func:`tests.cli_run.main_here`): ``(status,
    stdout, stderr, the names of the programs compiled while it ran)``."""
    r = run_main(monkeypatch, capsys, module, *args, programs=True, fresh=fresh)
    return r.status, r.out, r.err, r.programs


@pytest.mark.parametrize("args, field", [
    (["--env", "NoSuchEnv-v0"], "env_name"),
    (["--num-envs", "6", "--num-devices", "4"], "num_envs"),
    (["--num-minibatches", "7"], "num_minibatches"),
    (["--learning-rate", "-0.001"], "learning_rate"),
    (["--num-envs", "4", "--num-devices", "2"], "num_devices"),  # JAX sees one CPU device here
    (["--num-seeds", "0"], "num_seeds"),
])
def test_bad_values_fail_before_compiling(tmp_path, monkeypatch, capsys, args, field):
    import jax
    if field == "num_devices" and jax.device_count() >= 2:
        pytest.skip("this process sees several devices (XLA_FLAGS): --num-devices 2 is valid here")
    run_dir = tmp_path / "run"
    status, _, stderr, compiled = main_here(monkeypatch, capsys, *args, "--run-dir", str(run_dir))
    assert status == 2, stderr
    err = " ".join(stderr.split())  # the message may be wrapped in a box
    assert field in err and "Fix:" in err, stderr
    assert "Traceback" not in stderr
    assert not run_dir.exists()  # nothing was built
    # let alone compiled (JAX's log, not a clock: a loaded machine is slow); a run's start compiles its PRNG key,
    # the trainer's init and its chunk (stage)
    assert not compiled & RUN_PROGRAMS, compiled


def test_help_lists_every_config_field(monkeypatch, capsys):
    from agents.ppo import Config
    status, stdout, _, _ = main_here(monkeypatch, capsys, "--help")
    assert status == 0
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in stdout, f.name
    for flag in ("--num-seeds", "--seed", "--run-dir", "--log-every", "--checkpoint-every", "--resume",
                 "--no-resume", "--progress"):
        assert flag in stdout


def test_tiny_run_then_resume(tmp_path, monkeypatch, capsys):
    d = tmp_path / "run"
    status, out, err, compiled = main_here(monkeypatch, capsys, "--env", "CartPole-v1", "--num-seeds", "2", *TINY,
                                           "--run-dir", str(d), fresh=True)
    assert status == 0, err
    # (what test_bad_values_fail_before_compiling looks for, logged when a run compiles)
    assert RUN_PROGRAMS <= compiled, (compiled, err[-3000:])
    assert f"outputs in {d}" in out and "update 6/6" in out  # plain progress lines on CI
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "learning_curve.png"):
        assert (d / name).is_file(), name
    assert list((d / "tb").glob("events.out.tfevents.*"))
    assert sorted(int(x.name) for x in (d / "checkpoints").iterdir() if x.name.isdigit()) == [4, 6]
    assert json.loads((d / "config.json").read_text())["config"]["env_name"] == "CartPole-v1"
    assert len((d / "metrics.csv").read_text().splitlines()) == 1 + 2 * 6
    # rerunning into the same directory needs a decision
    status, _, err, _ = main_here(monkeypatch, capsys, "--env", "CartPole-v1", "--num-seeds", "2", *TINY,
                                  "--run-dir", str(d))
    assert status == 2 and "--resume" in err and "Traceback" not in err
    # --resume DIR reads the options back; a conflicting explicit option is refused
    status, _, err, _ = main_here(monkeypatch, capsys, "--resume", str(d), "--learning-rate", "0.001")
    assert status == 2 and "learning_rate" in err and "Traceback" not in err
    status, out, err, _ = main_here(monkeypatch, capsys, "--resume", str(d))
    assert status == 0, err
    assert "resumed" in out and "nothing to train" in out


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


def _checkpoints(d: Path) -> list[int]:
    return sorted(int(x.name) for x in (d / "checkpoints").iterdir() if x.name.isdigit()) \
        if (d / "checkpoints").exists() else []


def test_sigint_saves_and_stops_and_the_run_resumes(tmp_path):
    """README "Resuming": SIGINT (Ctrl-C) finishes the current chunk, saves it and exits 130 with the command that
    continues the run; ``--resume`` picks up at that checkpoint."""
    d = tmp_path / "run"
    args = ["--num-envs", "4", "--num-steps", "16", "--total-timesteps", str(64 * 100_000), "--hidden", "16",
            "--update-epochs", "1", "--num-minibatches", "1", "--checkpoint-every", "200", "--run-dir", str(d)]
    e = {**os.environ, "CI": "true"}

    def start(*a):
        return subprocess.Popen([sys.executable, "-m", "experiments.ppo", *a], cwd=ROOT, env=e, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def stop_after(proc, cond, sig):
        """Sends ``sig`` once ``cond()`` holds (the deadline only bounds a hang); returns (out, err)."""
        try:
            deadline = time.time() + 300
            while not cond():
                assert proc.poll() is None, proc.communicate()
                assert time.time() < deadline, "no checkpoint appeared"
                time.sleep(0.2)
            proc.send_signal(sig)
            return proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    proc = start(*args)
    out, err = stop_after(proc, lambda: 200 in _checkpoints(d), signal.SIGINT)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "received SIGINT" in out and "Traceback" not in err
    k = _checkpoints(d)[-1]
    assert k % 200 == 0 and 200 <= k < 100_000
    assert f"stopped by signal {int(signal.SIGINT)} after update {k}/100000 (checkpoint saved)" in err
    assert f"python -m experiments.ppo --resume {d}" in err
    updates = [int(r.split(",")[1]) for r in (d / "metrics.csv").read_text().splitlines()[1:]]
    assert updates == list(range(1, k + 1))  # every update up to the saved one, none after
    # the printed command continues from update k (stopped again by SIGTERM once it saved a chunk past k)
    proc = start("--resume", str(d))
    out, err = stop_after(proc, lambda: _checkpoints(d)[-1] > k, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"resumed {d} at update {k}/100000" in out
    updates = [int(r.split(",")[1]) for r in (d / "metrics.csv").read_text().splitlines()[1:]]
    assert updates == list(range(1, _checkpoints(d)[-1] + 1))


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


# -- one command line for every agent (jaxrl_pref.cli) -------------------------------------------------------------

def test_any_agent_takes_any_env_with_per_env_defaults(capsys):
    """`--env` picks the loop: a JAX env gets PPO's defaults and no pool options; a NetHack/MiniHack env gets the
    pool-sized defaults and the pool/network sections; a pool option given for a JAX env is refused by name."""
    from experiments import heron, oni, ppo, sqirl
    jax_opts = ppo.parse(["--env", "CartPole-v1"])
    assert not jax_opts.host and jax_opts.num_envs == 4 and jax_opts.num_steps == 128
    assert "num_workers" not in dataclasses.asdict(jax_opts.config)
    pool_opts = ppo.parse(["--env", "MiniHack-Room-5x5-v0", "--num-workers", "1"])
    assert pool_opts.host and (pool_opts.num_envs, pool_opts.num_steps, pool_opts.update_epochs) == (16, 32, 2)
    assert dataclasses.asdict(pool_opts.config)["num_workers"] == 1
    assert ppo.parse(["--env", "MiniHack-Room-5x5-v0", "--num-envs", "8"]).num_envs == 8  # flags win
    h = heron.parse(["--env", "MiniHack-Room-5x5-v0"])
    assert h.host and h.heron.factors == ("depth", "damage", "steps") and h.heron.buffer_segments == 256
    assert heron.parse(["--env", "Pendulum-v1"]).env_name == "PendulumFactors-v1"
    assert sqirl.parse(["--env", "MiniHack-Room-5x5-v0", "--horizon", "5"]).host
    for mod, argv, field in ((ppo, ["--env", "CartPole-v1", "--num-workers", "2"], "num_workers"),
                             (ppo, ["--env", "CartPole-v1", "--crop-conv"], "crop_conv"),
                             (ppo, ["--env", "MiniHack-Room-5x5-v0", "--num-seeds", "2"], "num_seeds"),
                             (ppo, ["--env", "MiniHack-Room-5x5-v0", "--normalize-obs"], "normalize_obs"),
                             (oni, ["--env", "CartPole-v1"], "env_name")):
        with pytest.raises(SystemExit) as e:
            mod.parse(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{field}:" in err and "Fix:" in err, (argv, err)


def test_resume_reads_saved_options_and_flags_override(tmp_path):
    """--resume DIR: the saved config and run settings are the defaults (also a section an older version saved
    under run[...]); flags given with it override them."""
    from experiments import heron, ppo
    d = tmp_path / "run"
    d.mkdir()
    saved = dataclasses.asdict(ppo.parse(["--env", "Acrobot-v1", "--learning-rate", "0.003", "--hidden", "8", "8"]).config)
    (d / "config.json").write_text(json.dumps({"agent": "ppo", "config": saved,
                                               "run": {"num_seeds": 3, "seed": 5, "checkpoint_every": 7,
                                                       "log_every": 2, "hp_batched": True,
                                                       "hp": {".learning_rate": [1e-3, 2e-3, 3e-3],
                                                              ".gamma": [0.99] * 3}}}))
    o = ppo.parse(["--resume", str(d)])
    assert (o.env_name, o.learning_rate, o.hidden, o.run.num_seeds, o.run.seed, o.run.checkpoint_every) == \
        ("Acrobot-v1", 0.003, (8, 8), 3, 5, 7)
    assert o.run.run_dir == str(d) and json.loads(o.run.hp_values) == {"learning_rate": [1e-3, 2e-3, 3e-3]}
    assert ppo.parse(["--resume", str(d), "--learning-rate", "0.01"]).learning_rate == 0.01
    pool_dir = tmp_path / "heron"
    pool_dir.mkdir()
    old = {"env_name": "MiniHack-Room-5x5-v0", "num_envs": 8, "num_steps": 16}  # heron_nethack's older layout
    (pool_dir / "config.json").write_text(json.dumps({"config": old, "run": {"seed": 2, "heron": {
        "factors": ["gold", "depth"], "margins": [0, 1]}}}))
    h = heron.parse(["--resume", str(pool_dir)])
    assert h.host and (h.num_envs, h.heron.factors, h.heron.margins, h.run.seed) == (8, ("gold", "depth"), (0, 1), 2)


def test_configs_are_side_effect_free_and_declare_vmappable_fields_once(monkeypatch):
    """Constructing a config builds no env; the traced HParams are derived from the fields declared vmappable."""
    import envs
    from agents import heron, ppo, sqirl
    monkeypatch.setattr(envs, "make", lambda *a, **k: pytest.fail("a Config built an env"))
    from jaxrl_pref.config import ConfigError
    ppo.Config(env_name="SparseMountainCar-v0")
    sqirl.Config(env_name="DeepSea-8")
    heron.Config()
    for cls in (ppo.Config, sqirl.Config):  # an unknown name fails fast from a registry lookup, still building nothing
        with pytest.raises(ConfigError, match="env_name: unknown environment 'NoSuchEnv-v0'"):
            cls(env_name="NoSuchEnv-v0")
    assert ppo.HPARAM_FIELDS == tuple(f.name for f in dataclasses.fields(ppo.HParams)) == \
        ("learning_rate", "gamma", "gae_lambda", "clip_eps", "ent_coef", "vf_coef", "max_grad_norm")
    assert set(sqirl.HPARAM_FIELDS) == {f.name for f in dataclasses.fields(sqirl.HParams)} == \
        {"learning_rate", "gamma", "replay_priority_factor", "planning_depth", "episodes_per_timestep"}


def test_sqirl_total_timesteps_sets_the_episodes_per_timestep(capsys):
    """SQIRL trains all H timesteps; a budget of T env steps gives T // H**2 episodes per timestep."""
    from experiments import sqirl
    assert sqirl.parse(["--env", "DeepSea-8", "--total-timesteps", "50000"]).sqirl.episodes_per_timestep == 781
    assert sqirl.parse(["--env", "DeepSea-8", "--total-timesteps", "10"]).sqirl.episodes_per_timestep == 1
    assert sqirl.parse(["--env", "DeepSea-8"]).sqirl.episodes_per_timestep == 64
    with pytest.raises(SystemExit):
        sqirl.parse(["--env", "DeepSea-8", "--total-timesteps", "0"])
    assert "total_timesteps:" in capsys.readouterr().err


def test_sqirl_cli_runs_on_a_total_timesteps_budget(tmp_path, monkeypatch, capsys):
    """`python -m experiments.sqirl --env DeepSea-8 --total-timesteps 640` runs all 8 timesteps of 640 // 8**2 = 10
    episodes (its main, in-process; the docstring's 50000, 781 episodes a timestep, shows nothing more and trains
    78x longer)."""
    status, out, err, _ = main_here(monkeypatch, capsys, "--env", "DeepSea-8", "--total-timesteps", "640",
                                    "--run-dir", str(tmp_path / "run"), "--progress", "False", "--n-epochs", "1",
                                    module="experiments.sqirl")
    assert status == 0, err
    assert "8 timesteps x 10 episodes" in out and "finished 8 updates" in out, out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["episodes_per_timestep"] == 10
