"""One short check of a GPU/TPU machine (under 10 minutes): does everything that should run fast there run, and
does it behave as on CPU?

    python -m benchmarks.accelerator_check                   # defaults sized for one GPU
    python -m benchmarks.accelerator_check --budget 20000 --skip-oni   # a small CPU run (CI does this)

It runs, on whatever devices JAX sees (JAX_PLATFORMS picks them):
1. PPO (MLP) on CartPole-v1 for one seed and ``--seeds`` vmapped seeds, through the experiment runner: env steps/s,
   and the log callbacks per update (one seed: at most one per log_every; vmapped seeds: none, logged per chunk);
2. PPO with a GRU core (when this build has recurrent policies);
3. PPO with ``--normalize-obs --normalize-reward`` data-parallel over every device (when there are several);
4. a resume check: a run stopped half-way and resumed ends bitwise equal to an uninterrupted one;
5. ONI on a MiniHack task through the NetHack pool with the embedded annotator (needs the ``nle`` extra and the
   MiniLM package; ``--skip-oni`` leaves it out);
and prints, per item, env steps/s and the peak device memory (``memory_stats`` where the device reports it, else
the process's peak resident memory), then one JSON line. Exit status 1 if a check fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from agents import ppo  # noqa: E402
from jaxrl_pref import run_config  # noqa: E402
from jaxrl_pref.runner import run_experiment  # noqa: E402
from jaxrl_pref.stats import final_score  # noqa: E402


def peak_memory_mb() -> float:
    """Peak bytes in use on device 0 if it reports them (GPU/TPU), else this process's peak resident memory."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(cfg, run_dir, seeds: int, log_every: int = 1, **kw):
    calls = []

    def make_trainer(c, log_fn=None, log_every=1):
        counted = None if log_fn is None else (lambda s, m: (calls.append(1), log_fn(s, m)))
        return ppo.make_trainer(c, log_fn=counted, log_every=log_every)
    quiet = dict(progress=False, tensorboard=False, plot=False, handle_signals=False, stream=io.StringIO())
    r = run_experiment(make_trainer, cfg, run_dir=run_dir, num_seeds=seeds, log_every=log_every,
                       checkpoint_every=max(1, cfg.num_updates // 2), **{**quiet, **kw})
    jax.effects_barrier()
    return r, len(calls)


def check_ppo(name: str, cfg, tmp: Path, seeds: int, log_every: int) -> dict:
    r, calls = _run(cfg, tmp / name, seeds, log_every)
    ret = np.asarray(r.metrics["episode_return"], np.float64)
    return {"check": name, "seeds": seeds, "env_steps_per_s": r.env_steps_per_sec, "compile_s": r.compile_s,
            "callbacks_per_update": calls / max(r.updates_done, 1),
            "final_return": final_score(ret, frac=0.1, pooled=True), "peak_mb": peak_memory_mb(),
            "ok": bool(np.isfinite(np.asarray(r.metrics["loss/value"])).all())
            and (calls == 0 if seeds > 1 else calls <= r.updates_done // log_every)}


def check_resume(cfg, tmp: Path) -> dict:
    full, _ = _run(cfg, tmp / "full", 2)
    part, _ = _run(cfg, tmp / "cut", 2, stop_after=1)
    rest, _ = _run(cfg, tmp / "cut", 2, resume=True)
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(rest.state)))
    return {"check": "resume", "stopped_at": part.updates_done, "bitwise_equal": same, "ok": same,
            "peak_mb": peak_memory_mb()}


def check_oni(budget: int, tmp: Path) -> dict:
    import subprocess
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "experiments.oni", "--env", "MiniHack-Room-5x5-v0", "--total-timesteps",
                        str(budget), "--num-envs", "8", "--num-steps", "32", "--run-dir", str(tmp / "oni"),
                        "--progress", "False", "--reward-model", "retrieval"], cwd=Path(__file__).resolve().parents[1])
    rc = p.returncode
    updates = run_config.run_settings(tmp / "oni").get("num_updates", 0) if rc == 0 else 0
    # the run's own process: its peak resident memory (on an accelerator the device's peak is in its log)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"check": "oni", "exit_status": rc, "wall_s": time.perf_counter() - t, "ok": rc == 0,
            "updates": updates, "peak_mb": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=int, default=2_000_000, help="env steps per seed for the PPO checks")
    p.add_argument("--num-envs", type=int, default=256)
    p.add_argument("--seeds", type=int, default=8, help="vmapped seeds of the second PPO check")
    p.add_argument("--skip-oni", action="store_true")
    p.add_argument("--oni-budget", type=int, default=20_000)
    a = p.parse_args(argv)
    devices = jax.devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}); jax {jax.__version__}",
          flush=True)
    base = ppo.Config(env_name="CartPole-v1", num_envs=a.num_envs, num_steps=32, total_timesteps=a.budget,
                      num_minibatches=4, update_epochs=2)
    small = dataclasses.replace(base, total_timesteps=base.num_envs * base.num_steps * 4)
    tmp = Path(tempfile.mkdtemp(prefix="accel_check_"))
    results = [check_ppo("ppo_mlp", base, tmp, 1, 10), check_ppo("ppo_mlp_vmapped", base, tmp, a.seeds, 10)]
    if "network" in {f.name for f in dataclasses.fields(ppo.Config)}:
        results.append(check_ppo("ppo_gru", dataclasses.replace(base, network="gru"), tmp, 1, 10))
    n = len(devices)
    if n > 1 and base.num_envs % n == 0:
        results.append(check_ppo(f"ppo_{n}_devices_normalised", dataclasses.replace(
            base, num_devices=n, normalize_obs=True, normalize_reward=True), tmp, 1, 10))
    results.append(check_resume(small, tmp))
    if not a.skip_oni:
        results.append(check_oni(a.oni_budget, tmp))
    for r in results:
        rate = f"{r['env_steps_per_s']:>12,.0f} env-steps/s" if "env_steps_per_s" in r else " " * 24
        extra = {k: v for k, v in r.items() if k not in ("check", "env_steps_per_s", "peak_mb", "ok")}
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']:<28} {rate}  peak {r['peak_mb']:,.0f} MB  {extra}")
    print(json.dumps({"devices": [str(d) for d in devices], "results": results}, default=float))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
