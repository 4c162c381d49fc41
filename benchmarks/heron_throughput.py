"""HERON training throughput (env-steps/s) next to plain PPO on the same env and PPO settings, in one run.

    python -m benchmarks.heron_throughput                                   # PendulumFactors-v1, 1 seed
    python -m benchmarks.heron_throughput --env MountainCarContinuous-v0 --seeds 4 --reps 5

What is timed: one compiled call running the whole training (``total_timesteps`` env steps per seed) until done.
Both programs are compiled ahead of time (reported apart), warmed up once, then timed alternately (PPO, HERON,
PPO, HERON, ...) so drifting machine load hits both alike; figures use the median. Plain PPO trains on the env's
own reward (the same factor env, so the env cost is identical); HERON adds the reward model: buffer writes, the
all-pairs comparisons, ``rm_updates`` Adam steps on ``rm_batch_size`` segments and the per-step reward per update.
Target: HERON >= 80% of PPO's env-steps/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

from agents import heron, ppo  # noqa: E402
from jaxrl_pref.stats import final_score  # noqa: E402


def _compiled(train, num_seeds: int):
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(num_seeds))
    fn = lambda k: train(k).metrics["episode_return"]  # noqa: E731
    if num_seeds > 1:
        fn = jax.vmap(fn)
    else:
        keys = keys[0]
    t = time.perf_counter()
    c = jax.jit(fn).lower(keys).compile()
    return c, keys, time.perf_counter() - t


def measure(cfg: heron.Config, num_seeds: int, reps: int) -> dict:
    progs = {"ppo": ppo.make_train(cfg.ppo_config()), "heron": heron.make_train(cfg)}
    built = {k: _compiled(v, num_seeds) for k, v in progs.items()}
    times = {k: [] for k in progs}
    finals = {}
    for k, (c, keys, _) in built.items():
        jax.block_until_ready(c(keys))  # warm-up
    for _ in range(reps):
        for k, (c, keys, _) in built.items():
            t = time.perf_counter()
            ret = jax.block_until_ready(c(keys))
            times[k].append(time.perf_counter() - t)
            finals[k] = final_score(ret, last=10, pooled=True)
    steps = cfg.total_timesteps * num_seeds
    out = {"num_seeds": num_seeds, "env_steps": steps}
    for k in progs:
        med = statistics.median(times[k])
        out[k] = {"env_steps_per_s": steps / med, "run_s_median": med, "run_s_all": times[k],
                  "compile_s": built[k][2], "final_return": finals[k]}
    out["ratio"] = out["heron"]["env_steps_per_s"] / out["ppo"]["env_steps_per_s"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="PendulumFactors-v1")
    p.add_argument("--total-timesteps", type=int, default=102_400)
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--num-steps", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    cfg = heron.Config(env_name=a.env, total_timesteps=a.total_timesteps, num_envs=a.num_envs,
                       num_steps=a.num_steps)
    print(f"env {cfg.env_name}: num_envs={cfg.num_envs} num_steps={cfg.num_steps} epochs={cfg.update_epochs} "
          f"minibatches={cfg.num_minibatches} | reward model: segment_len={cfg.segment_len} "
          f"rm_batch_size={cfg.rm_batch_size} rm_updates={cfg.rm_updates} hidden={cfg.rm_hidden}")
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    results = []
    for n in a.seeds:
        r = measure(cfg, n, a.reps)
        results.append(r)
        print(f"--- {n} seed(s), {r['env_steps']:,} env steps per call")
        for k in ("ppo", "heron"):
            x = r[k]
            print(f"{k:>6}: {x['env_steps_per_s']:>10,.0f} env-steps/s  run {x['run_s_median']:.2f}s (median of "
                  f"{len(x['run_s_all'])})  compile {x['compile_s']:.1f}s  final return {x['final_return']:.1f}")
        print(f" ratio: HERON / PPO = {r['ratio']:.2f} (target >= 0.80)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": str(cfg), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
