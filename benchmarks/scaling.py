"""Data-parallel scaling of PPO: env-steps/s on 1, 2 and 4 forced CPU devices in one process, and on 2 processes
x 2 devices joined with jax.distributed (gloo collectives over localhost TCP).

    python -m benchmarks.scaling                          # weak scaling: 32 envs per device, CartPole-v1
    python -m benchmarks.scaling --mode strong --num-envs 64 --updates 20 --reps 3
    python -m benchmarks.scaling --json scaling.json

Every configuration runs in fresh processes (the forced device count must be set before JAX starts). What is
timed: ``--updates`` PPO updates (rollout + GAE + SGD epochs, gradients all-reduced over the devices) in one
compiled call, best of ``--reps`` runs after an untimed compile; env-steps/s counts the envs of all devices.
``weak`` keeps the envs per device fixed (the batch grows with the devices: how one scales out on accelerators),
``strong`` splits a fixed number of envs.

What to expect. On this CPU the "devices" are slices of the same few cores (``--xla_force_host_platform_device_count``
only partitions the host), so more devices add no compute: with 2 cores, 2 devices can at best double a
single-threaded baseline and 4 devices only add all-reduce and scheduling overhead; 2 processes additionally pay
for gloo's TCP all-reduce of the gradients once per minibatch. The numbers show the overhead of the data-parallel
path, not its benefit. On real accelerators each device has its own compute and memory bandwidth: per-device
throughput stays roughly constant under weak scaling (near-linear env-steps/s), as long as the per-minibatch
gradient all-reduce (tens of KB for these MLPs, MBs for CNN encoders; ICI on TPU pods, NVLink/InfiniBand on GPU clusters) is
small next to the per-device rollout and SGD work -- i.e. use enough envs per device (hundreds to thousands for
gymnax envs) and few, large minibatches. Across hosts over plain Ethernet the all-reduce latency per minibatch
matters more; fewer minibatches per update or more envs per device keep it amortised.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _worker(a) -> None:
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if a.coordinator:
        from jaxrl_pref import distributed
        distributed.initialize(a.coordinator, a.num_processes, a.process_id)
    from agents import ppo
    devices = a.devices * max(1, a.num_processes or 1)
    num_envs = a.envs_per_device * devices if a.mode == "weak" else a.num_envs
    cfg = ppo.Config(env_name=a.env, num_envs=num_envs, num_steps=a.num_steps, num_devices=devices,
                     num_minibatches=a.num_minibatches, update_epochs=a.update_epochs,
                     total_timesteps=num_envs * a.num_steps * a.updates)
    trainer = ppo.make_trainer(cfg)
    rs = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    t = time.perf_counter()
    run = jax.jit(lambda s: trainer.run(s, None, a.updates)).lower(rs).compile()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        out = jax.block_until_ready(run(rs))
        times.append(time.perf_counter() - t)
    steps = a.updates * num_envs * a.num_steps
    if jax.process_index() == 0:
        print(json.dumps({"steps_per_s": steps / min(times), "compile_s": compile_s, "num_envs": num_envs,
                          "devices": devices, "processes": jax.process_count(),
                          "return": float(jax.numpy.nanmean(out[1]["episode_return"]))}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(a, devices: int, processes: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    base = [sys.executable, "-m", "benchmarks.scaling", "--worker", "--devices", str(devices), "--mode", a.mode,
            "--env", a.env, "--num-envs", str(a.num_envs), "--envs-per-device", str(a.envs_per_device),
            "--num-steps", str(a.num_steps), "--num-minibatches", str(a.num_minibatches), "--update-epochs",
            str(a.update_epochs), "--updates", str(a.updates), "--reps", str(a.reps)]
    if processes > 1:
        port = _free_port()
        procs = [subprocess.Popen(base + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                                          "--process-id", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(processes)]
    else:
        procs = [subprocess.Popen(base, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    outs = [p.communicate() for p in procs]
    for p, (o, e) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"worker failed ({devices} devices x {processes} processes):\n{e[-2000:]}")
    line = [ln for ln in outs[0][0].splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("weak", "strong"), default="weak")
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--envs-per-device", type=int, default=32, help="weak scaling: envs per device")
    ap.add_argument("--num-envs", type=int, default=64, help="strong scaling: total envs (divisible by 4)")
    ap.add_argument("--num-steps", type=int, default=64)
    ap.add_argument("--num-minibatches", type=int, default=2)
    ap.add_argument("--update-epochs", type=int, default=2)
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", help=argparse.SUPPRESS)
    ap.add_argument("--num-processes", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        _worker(a)
        return 0
    rows = []
    for label, devices, processes in (("1 device", 1, 1), ("2 devices", 2, 1), ("4 devices", 4, 1),
                                      ("2 processes x 2 devices", 2, 2)):
        r = _launch(a, devices, processes)
        rows.append({"config": label, **r})
        print(f"  {label:<26} {r['steps_per_s']:>12,.0f} env-steps/s  ({r['num_envs']} envs, compile "
              f"{r['compile_s']:.1f} s)", flush=True)
    base = rows[0]["steps_per_s"]
    print(f"\n{a.mode} scaling, {a.env}, {a.num_steps} steps x {a.updates} updates, {a.update_epochs} epochs x "
          f"{a.num_minibatches} minibatches, best of {a.reps}; {os.cpu_count()} CPU cores")
    print(f"{'configuration':<26} {'devices':>7} {'envs':>6} {'env-steps/s':>12} {'vs 1 device':>11} "
          f"{'ideal (accel.)':>14}")
    for r in rows:
        ideal = r["devices"]  # with one accelerator per device, weak or strong
        print(f"{r['config']:<26} {r['devices']:>7} {r['num_envs']:>6} {r['steps_per_s']:>12,.0f} "
              f"{r['steps_per_s'] / base:>10.2f}x {ideal:>13.0f}x")
    print("\n" + __doc__.split("What to expect. ")[1].strip())
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
