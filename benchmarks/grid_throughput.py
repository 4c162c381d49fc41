"""xminigrid tasks through ``envs.make`` vs xminigrid on its own: random-action env steps/s, in one run.

    python -m benchmarks.grid_throughput                                   # DoorKey-5x5, DoorKey-8x8, 256 envs
    python -m benchmarks.grid_throughput --envs MiniGrid-Empty-5x5 --num-envs 1024 --steps 256

Both sides step ``--num-envs`` envs for ``--steps`` steps in one jitted ``lax.scan`` with uniformly random actions,
timed warm (best of ``--reps``). The baseline is the simplest correct auto-resetting loop xminigrid offers:
its env under ``GymAutoResetWrapper``, vmapped, raw ``[7, 7, 2]`` uint8 observations. Ours adds what
``envs.make`` gives every JAX task: the one-hot observation (view, direction, carried item), success, episode
statistics and the ``final_obs`` of ended episodes. Printed: both rates and ours / baseline.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import envs


def _best(fn, arg, reps: int) -> float:
    jax.block_until_ready(fn(arg))  # compile
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        best = min(best, time.perf_counter() - t0)
    return best


def ours(name: str, n: int, steps: int, reps: int) -> float:
    env, params = envs.make(name, num_envs=n)
    num_actions = envs.spec(env, params).num_actions

    @jax.jit
    def run(key):
        obs, state = env.reset(key, params)

        def body(carry, k):
            state, total = carry
            k_act, k_step = jax.random.split(k)
            action = jax.random.randint(k_act, (n,), 0, num_actions)
            obs, state, reward, terminated, truncated, info = env.step(k_step, state, action, params)
            return (state, total + reward.sum() + info["episode_success"].sum() + obs[:, 0].sum()), None

        return jax.lax.scan(body, (state, jnp.float32(0)), jax.random.split(key, steps))[0][1]

    return n * steps / _best(run, jax.random.PRNGKey(0), reps)


def baseline(name: str, n: int, steps: int, reps: int) -> float:
    import xminigrid
    from xminigrid.wrappers import GymAutoResetWrapper
    env, params = xminigrid.make(name)
    env = GymAutoResetWrapper(env)
    num_actions = env.num_actions(params)
    reset = jax.vmap(env.reset, in_axes=(None, 0))
    step = jax.vmap(env.step, in_axes=(None, 0, 0))

    @jax.jit
    def run(key):
        timestep = reset(params, jax.random.split(key, n))

        def body(carry, k):
            timestep, total = carry
            action = jax.random.randint(k, (n,), 0, num_actions)
            timestep = step(params, timestep, action)
            return (timestep, total + timestep.reward.sum() + timestep.observation[:, 0, 0, 0].sum()), None

        return jax.lax.scan(body, (timestep, jnp.float32(0)), jax.random.split(key, steps))[0][1]

    return n * steps / _best(run, jax.random.PRNGKey(0), reps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--envs", nargs="+", default=["MiniGrid-DoorKey-5x5", "MiniGrid-DoorKey-8x8"])
    p.add_argument("--num-envs", type=int, default=256)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    print(f"devices: {jax.devices()}; {a.num_envs} envs x {a.steps} steps per call, best of {a.reps}")
    for name in a.envs:
        r_base = baseline(name, a.num_envs, a.steps, a.reps)
        r_ours = ours(name, a.num_envs, a.steps, a.reps)
        print(f"{name:24s} xminigrid + GymAutoResetWrapper {r_base:12,.0f} steps/s   envs.make {r_ours:12,.0f} steps/s"
              f"   ours/baseline {r_ours / r_base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
