"""Multi-process data-parallel PPO with jax.distributed on CPU (gloo collectives), two processes on localhost.

Each process forces 2 CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``), joins the cluster and
trains PPO with ``num_devices=4`` over the global mesh: every process steps the envs of its own 2 devices and
gradients are averaged across all 4 devices. Checked: after training the parameters are bitwise identical on both
processes, and equal -- up to float32 summation order, see ``test_two_processes_match_one_process_four_devices``
-- to a single-process run on 4 forced devices with the same seed.

This file is also the worker: ``python tests/test_multihost.py --worker OUT ...``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxrl_pref import distributed
from jaxrl_pref.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
CFG = dict(env_name="CartPole-v1", num_envs=8, num_steps=16, total_timesteps=8 * 16 * 4, num_devices=4,
           num_minibatches=2, update_epochs=2, hidden=(16, 16))


# -- cluster detection (no processes) --------------------------------------------------------------------------------
def test_first_host_of_slurm_nodelists():
    assert distributed.first_host("gpu[003-010,12],cpu1") == "gpu003"
    assert distributed.first_host("node7,node8") == "node7"
    assert distributed.first_host("tpu-vm-0") == "tpu-vm-0"


def test_slurm_environment_gives_the_cluster():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "a100-[01-02]", "SLURM_JOB_ID": "4242"}
    spec = distributed.slurm_cluster(env)
    assert spec == distributed.ClusterSpec("a100-01:12563", 4, 3, "slurm")  # port 12321 + 4242 % 1000
    assert distributed.slurm_cluster({**env, "JAXRL_COORDINATOR_PORT": "5000"}).coordinator == "a100-01:5000"
    assert distributed.slurm_cluster({"SLURM_JOB_ID": "1"}) is None  # a batch script, not an srun step
    # explicit values win field by field
    spec = distributed.resolve_cluster(process_id=0, environ=env)
    assert (spec.coordinator, spec.num_processes, spec.process_id, spec.source) == ("a100-01:12563", 4, 0, "args")


def test_no_settings_and_no_slurm_leaves_detection_to_jax():
    assert distributed.resolve_cluster(environ={}) is None


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_processes=2, process_id=0), "coordinator"),
    (dict(coordinator="h:1"), "num_processes"),
    (dict(coordinator="h:1", num_processes=2), "process_id"),
    (dict(coordinator="h", num_processes=2, process_id=0), "coordinator"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), "process_id"),
])
def test_cluster_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        distributed.resolve_cluster(environ={}, **kwargs)
    assert e.value.field == field and "Fix:" in str(e.value)


def test_flag_parsing():
    assert distributed.flag_on(["--distributed"], "--distributed")
    assert distributed.flag_on(["--distributed", "True", "--x", "1"], "--distributed")
    assert not distributed.flag_on(["--distributed", "False"], "--distributed")
    assert not distributed.flag_on(["--distributed=false"], "--distributed")
    assert distributed.initialize_if_requested(["--num-envs", "4"]) is None


# -- two processes ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _spawn(out: Path, devices: int, *cluster: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--worker", str(out), *cluster], cwd=REPO, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen, timeout: float = 400) -> str:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise AssertionError(f"worker timed out:\n{out[-3000:]}")
    assert p.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    procs = [_spawn(d / f"proc{i}", 2, f"127.0.0.1:{port}", "2", str(i)) for i in range(2)]
    single = _spawn(d / "single", 4)
    outs = [_finish(p) for p in procs + [single]]
    load = lambda name: (np.load(d / f"{name}.npz"), json.loads((d / f"{name}.json").read_text()))  # noqa: E731
    return {"proc0": load("proc0"), "proc1": load("proc1"), "single": load("single"), "logs": outs}


@pytest.mark.slow
def test_processes_see_the_global_mesh_and_end_identical(runs):
    (p0, i0), (p1, i1) = runs["proc0"], runs["proc1"]
    assert i0["process_count"] == i1["process_count"] == 2
    assert (i0["process_index"], i1["process_index"]) == (0, 1)
    assert i0["global_devices"] == i1["global_devices"] == 4 and i0["local_devices"] == 2
    # every process computes with its own env shard but holds the same, all-reduced parameters
    for k in p0.files:
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
    assert not np.allclose(p0["params"], runs["single"][0]["init_params"])  # training did move them


@pytest.mark.slow
def test_two_processes_match_one_process_four_devices(runs):
    """Same seed, same global mesh of 4 devices, same env shards (device i gets fold_in(key, i) whichever process
    owns it): the computations are the same except for the gradient all-reduce. In one process XLA:CPU sums the 4
    per-device gradients itself; across processes gloo's all-reduce sums them in another order. float32 addition is
    not associative, so the averaged gradients differ by a few ulp and the parameters drift apart by ~1e-7..1e-6
    over a few updates (Adam rescales tiny differences). The initial parameters and every update's episode stats
    (computed from the same rollouts up to that rounding) agree; the final parameters agree to 1e-5."""
    (p0, _), (s, _) = runs["proc0"], runs["single"]
    np.testing.assert_array_equal(p0["init_params"], s["init_params"])
    np.testing.assert_allclose(p0["params"], s["params"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(p0["loss"], s["loss"], rtol=1e-4, atol=1e-5)
    print("max |params(2 processes) - params(1 process)| =", float(np.abs(p0["params"] - s["params"]).max()))


def _ppo_cli(run_dir: Path, port: int, i: int, updates: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.ppo", "--distributed", "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", "2", "--process-id", str(i), "--num-devices", "4", "--num-envs", "8", "--num-steps", "16",
           "--hidden", "16", "--num-minibatches", "2", "--update-epochs", "1", "--total-timesteps",
           str(8 * 16 * updates), "--checkpoint-every", "5", "--progress", "False", "--run-dir", str(run_dir),
           "--resume"]
    with open(log, "w") as f:  # a file, not a pipe: nothing blocks on output while the test waits
        return subprocess.Popen(cmd, cwd=REPO, env=_env(2), stdout=f, stderr=subprocess.STDOUT)


def _wait(procs, log_dir: Path, phase: str, timeout: float = 300) -> list[str]:
    """Waits for every process to exit by itself; one still running after ``timeout`` s (a generous bound: a
    stopped run exits within a chunk, seconds) is a hang: it is killed and the test fails naming it."""
    import time
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.5)
    hung = [i for i, p in enumerate(procs) if p.poll() is None]
    for i in hung:
        procs[i].kill()
        procs[i].wait()
    outs = [(log_dir / f"{phase}{i}.log").read_text() for i in range(len(procs))]
    assert not hung, (f"process(es) {hung} still running {timeout} s after the stop signal", [o[-2000:] for o in outs])
    return outs


@pytest.mark.slow
def test_distributed_cli_stops_together_and_resumes(tmp_path):
    """``experiments.ppo --distributed``: SIGTERM to ONE process stops both at the same chunk boundary (a lone
    process would hang in the next all-reduce), both save, and a relaunch resumes both from that checkpoint."""
    import signal
    import time
    run, updates = tmp_path / "run", 2000
    port = _free_port()
    procs = [_ppo_cli(run, port, i, updates, tmp_path / f"a{i}.log") for i in range(2)]
    deadline = time.time() + 400
    while not (run / "checkpoints").exists() or not list((run / "checkpoints").glob("[0-9]*")):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint appeared"
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    outs = _wait(procs, tmp_path, "a")
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, [o[-2000:] for o in outs]
    stopped = {o.split("stopped at update ")[1].split("/")[0] for o in outs}
    assert len(stopped) == 1, outs
    k = int(stopped.pop())
    assert 0 < k < updates and k % 5 == 0
    # relaunch (same settings): both resume from update k; stop them again (via process 0) after a chunk
    port = _free_port()
    procs = [_ppo_cli(run, port, i, updates, tmp_path / f"b{i}.log") for i in range(2)]
    deadline = time.time() + 400
    while not (run / "checkpoints" / str(k + 5)).exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.5)
    procs[0].send_signal(signal.SIGTERM)
    outs = _wait(procs, tmp_path, "b")
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, [o[-2000:] for o in outs]
    for o in outs:
        assert f"resumed {run} at update {k}/{updates}" in o, o[-2000:]
    assert len({o.split("stopped at update ")[1].split("/")[0] for o in outs}) == 1


# -- worker ----------------------------------------------------------------------------------------------------------
def _worker(out: str, cluster: list[str]) -> None:
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if cluster:
        distributed.initialize(cluster[0], int(cluster[1]), int(cluster[2]))
    from jax.flatten_util import ravel_pytree

    from agents import ppo
    cfg = ppo.Config(**CFG)
    trainer = ppo.make_trainer(cfg)
    key = jax.random.PRNGKey(7)
    rs0 = jax.jit(trainer.init)(key)
    rs, metrics = jax.jit(lambda rs: trainer.run(rs, None, cfg.num_updates))(rs0)
    flat = lambda p: np.asarray(ravel_pytree(p)[0])  # noqa: E731 -- replicated: readable on every process
    np.savez(out + ".npz", params=flat(rs.train_state.params), init_params=flat(rs0.train_state.params),
             loss=np.stack([np.asarray(metrics[k]) for k in ("loss/policy", "loss/value")]))
    Path(out + ".json").write_text(json.dumps({"process_count": jax.process_count(),
                                               "process_index": jax.process_index(),
                                               "global_devices": len(jax.devices()),
                                               "local_devices": len(jax.local_devices())}))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3:])
