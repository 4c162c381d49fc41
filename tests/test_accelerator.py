"""benchmarks/accelerator_check.py (the one-call GPU/TPU check) runs on CPU with a small budget: every check passes,
including the data-parallel normalisation check on 2 forced host devices and ONI through the NetHack pool."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_accelerator_check_runs_on_cpu_with_a_small_budget():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "CI": "true"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.accelerator_check", "--budget", "8192", "--num-envs", "16",
                        "--seeds", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    checks = {r["check"]: r for r in out["results"]}
    assert len(out["devices"]) == 2
    assert {"ppo_mlp", "ppo_mlp_vmapped", "ppo_gru", "ppo_2_devices_normalised", "resume", "oni"} <= set(checks), \
        sorted(checks)
    assert all(r["ok"] for r in out["results"]), out["results"]
    assert checks["ppo_mlp_vmapped"]["callbacks_per_update"] == 0  # vmapped seeds log from the chunk's outputs
    assert checks["ppo_mlp"]["callbacks_per_update"] <= 1
    assert checks["resume"]["bitwise_equal"] is True
    assert checks["oni"]["exit_status"] == 0 and checks["oni"]["updates"] > 0
    # the budget's numbers: 8192 env steps of 16 envs x 32 steps = 16 updates, logged every 10 (once, at update 10);
    # the resume check's 4-update run (checkpoints every 2) stops half-way; ONI's 20k steps of 8 x 32 = 78 updates
    assert checks["ppo_mlp"]["callbacks_per_update"] == 1 / 16
    assert checks["resume"]["stopped_at"] == 2
    assert checks["oni"]["updates"] == 20_000 // (8 * 32)
    for name in ("ppo_mlp", "ppo_mlp_vmapped", "ppo_gru", "ppo_2_devices_normalised"):
        r = checks[name]
        assert r["env_steps_per_s"] > 0 and r["compile_s"] > 0 and r["final_return"] >= 8, r  # CartPole: >= 8
    # peak memory in MB: on CPU the peak resident memory of a process that imported JAX and trained (hundreds of
    # MB; a unit slip -- bytes, KB, GB -- is off by 1024x), never falling (a peak), below the machine's memory
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20
    peaks = [r["peak_mb"] for r in out["results"]]
    assert all(50 < p < mem_mb for p in peaks), peaks
    in_order = ("ppo_mlp", "ppo_mlp_vmapped", "ppo_gru", "ppo_2_devices_normalised", "resume")  # as they ran
    in_process = [checks[c]["peak_mb"] for c in in_order]
    assert in_process == sorted(in_process), in_process
