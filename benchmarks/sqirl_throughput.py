"""SQIRL throughput: env steps/s and wall time per iteration (= one timestep) for 1 and 8 vmapped seeds.

    python -m benchmarks.sqirl_throughput                       # DeepSea-8 and KeyDoor-5
    python -m benchmarks.sqirl_throughput --envs DeepSea-10 --episodes 128 --iterations 5

Per env, in one run: the in-jit trainer with 1 seed and with 8 seeds (compiled once each, timed warm over
``--iterations`` iterations), the host-env loop (same learner, env behind JaxHostEnv, 1 seed), and PPO (1 seed,
16 envs x 32 steps) over the same number of env steps as the 1-seed SQIRL measurement. Printed ratios: 8 seeds vs
1 seed (aggregate steps/s), host loop vs in-jit, SQIRL vs PPO. "env steps" counts every env step computed
(episodes x H per iteration); SQIRL's experience (steps before each episode ended) can be fewer.
"""
from __future__ import annotations

import argparse
import time

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from agents import ppo, sqirl  # noqa: E402


def time_sqirl(cfg: sqirl.Config, seeds: int, iters: int):
    tr = sqirl.Trainer(cfg)
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    init = jax.jit(jax.vmap(tr.init))
    run = jax.jit(jax.vmap(lambda s: tr.run(s, None, iters)))
    t0 = time.perf_counter()
    state = jax.block_until_ready(init(keys))
    compiled = run.lower(state).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, m = jax.block_until_ready(compiled(state))
    wall = time.perf_counter() - t0
    steps = seeds * iters * cfg.episodes_per_timestep * tr.horizon
    return {"wall_per_iter": wall / iters, "steps_per_s": steps / wall, "compile_s": compile_s,
            "experience_per_s": float(np.asarray(m["experience_steps"])[:, -1].sum()) / wall}


def time_host(cfg: sqirl.Config, iters: int):
    from envs.host import JaxHostEnv
    env = JaxHostEnv(cfg.env_name, cfg.episodes_per_timestep, seed=0)
    # JaxHostEnv.reset jits env.reset anew on every call (~3 s of compilation here); SQIRL resets twice per
    # iteration, so measure the loop with a reset compiled once (same keys, same observations).
    reset_once = jax.jit(env.env.reset)

    def reset():
        env._key, k = jax.random.split(env._key)
        obs, env._state = reset_once(k, env.params)
        return {"obs": np.asarray(obs)}

    env.reset = reset
    tr = sqirl.HostTrainer(cfg, env, horizon=cfg.resolved_horizon())
    state = tr.init(jax.random.PRNGKey(0))
    state, _ = tr.run(state, None, 1)  # compiles act / learn
    t0 = time.perf_counter()
    state, m = tr.run(state, None, iters)
    wall = time.perf_counter() - t0
    # host iterations include the evaluation rollout on the same env: 2 x episodes x H env steps each
    steps = iters * cfg.episodes_per_timestep * tr.horizon
    return {"wall_per_iter": wall / iters, "steps_per_s": steps / wall}


def time_ppo(env_name: str, total: int):
    batch = 16 * 32
    cfg = ppo.Config(env_name=env_name, num_envs=16, num_steps=32, total_timesteps=max(total // batch, 1) * batch)
    tr = ppo.make_trainer(cfg)
    state = jax.block_until_ready(jax.jit(tr.init)(jax.random.PRNGKey(0)))
    compiled = jax.jit(lambda s: tr.run(s, None, cfg.num_updates)).lower(state).compile()
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state))
    wall = time.perf_counter() - t0
    return {"steps_per_s": cfg.num_updates * batch / wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", nargs="+", default=["DeepSea-8", "KeyDoor-5"])
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--no-host", action="store_true")
    a = p.parse_args(argv)
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); episodes/timestep {a.episodes}, "
          f"{a.iterations} timed iterations")
    for name in a.envs:
        cfg = sqirl.Config(env_name=name, episodes_per_timestep=a.episodes, planning_depth=2)
        iters = min(a.iterations, cfg.resolved_horizon())
        one = time_sqirl(cfg, 1, iters)
        eight = time_sqirl(cfg, 8, iters)
        base = time_ppo(name, iters * cfg.episodes_per_timestep * cfg.resolved_horizon())
        print(f"\n{name} (H={cfg.resolved_horizon()}, {cfg.grad_steps} Adam steps/iteration, k=2)")
        for label, r in (("in-jit, 1 seed", one), ("in-jit, 8 seeds", eight)):
            print(f"  SQIRL {label:16s} {r['steps_per_s']:>10,.0f} env steps/s  {r['experience_per_s']:>10,.0f} "
                  f"experience/s  {r['wall_per_iter'] * 1e3:8.1f} ms/iteration  (compile {r['compile_s']:.1f} s)")
        print(f"  PPO   in-jit, 1 seed   {base['steps_per_s']:>10,.0f} env steps/s (16 envs x 32 steps, same steps)")
        print(f"  ratio 8 seeds / 1 seed (aggregate steps/s): {eight['steps_per_s'] / one['steps_per_s']:.2f}x; "
              f"wall per iteration {eight['wall_per_iter'] / one['wall_per_iter']:.2f}x")
        print(f"  ratio SQIRL / PPO (1 seed, env steps/s): {one['steps_per_s'] / base['steps_per_s']:.2f}x")
        if not a.no_host:
            host = time_host(cfg, iters)
            print(f"  SQIRL host loop, 1 seed {host['steps_per_s']:>9,.0f} env steps/s (exploration steps; plus an "
                  f"eval rollout)  {host['wall_per_iter'] * 1e3:8.1f} ms/iteration; in-jit / host speed: "
                  f"{one['steps_per_s'] / host['steps_per_s']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
