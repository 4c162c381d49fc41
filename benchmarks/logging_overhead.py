"""Cost of live logging: PPO env-steps/s without a ``log_fn`` vs. with :class:`jaxrl_pref.logging.Logger`.

    python -m benchmarks.logging_overhead                 # CartPole, ppo.Config() defaults (500k steps), 3 reps
    python -m benchmarks.logging_overhead --reps 5 --log-every 10 --num-seeds 8

Both variants run the whole training as one compiled program (``init`` + ``run`` of all updates); compile time is
measured apart (ahead-of-time ``lower().compile()``). Timed runs alternate (plain, logged, plain, logged, ...) so
that drift in machine load hits both alike; the overhead is from the medians. The logged variant writes
tensorboard scalars (to a temporary directory) every ``--log-every`` updates. Target: <= 5 %.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()  # as the experiment CLIs do (jax#25861); applies to both variants alike

from agents import ppo  # noqa: E402
from jaxrl_pref.logging import Logger  # noqa: E402


def build(cfg: ppo.Config, num_seeds: int, log_fn=None, log_every: int = 1):
    trainer = ppo.make_trainer(cfg, log_fn=log_fn, log_every=log_every)

    def train(key):
        rs = trainer.init(key)
        rs, metrics = trainer.run(rs, None, cfg.num_updates)
        return rs.train_state.params, metrics["episode_return"]

    keys = jax.vmap(jax.random.PRNGKey)(np.arange(num_seeds)) if num_seeds > 1 else jax.random.PRNGKey(0)
    fn = jax.jit(jax.vmap(train)) if num_seeds > 1 else jax.jit(train)
    t = time.perf_counter()
    compiled = fn.lower(keys).compile()
    return compiled, keys, time.perf_counter() - t


def timed(compiled, keys) -> float:
    t = time.perf_counter()
    out = compiled(keys)
    jax.block_until_ready(out)
    jax.effects_barrier()  # the logger's callbacks have all run
    return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--total-timesteps", type=int, default=ppo.Config.total_timesteps)
    p.add_argument("--num-seeds", type=int, default=1)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--progress", action="store_true", help="also print progress lines from the logger")
    args = p.parse_args(argv)

    cfg = ppo.Config(env_name=args.env, total_timesteps=args.total_timesteps)
    steps = cfg.num_updates * cfg.num_envs * cfg.num_steps * args.num_seeds
    print(f"{args.env}: {cfg.num_updates} updates x {cfg.num_envs * cfg.num_steps} steps x {args.num_seeds} seed(s) "
          f"= {steps:,} env steps per run; log_every={args.log_every}; {jax.devices()[0].platform}")

    with tempfile.TemporaryDirectory() as tmp:
        logger = Logger(tmp, num_seeds=args.num_seeds, steps_per_update=cfg.num_envs * cfg.num_steps,
                        log_every=args.log_every, total_updates=cfg.num_updates, progress=args.progress)
        plain, keys, c_plain = build(cfg, args.num_seeds)
        logged, _, c_logged = build(cfg, args.num_seeds, logger, args.log_every)
        print(f"compile: plain {c_plain:.1f} s, with logger {c_logged:.1f} s")
        timed(plain, keys), timed(logged, keys)  # warm-up (first-run allocations, callback registration)
        t_plain, t_logged = [], []
        for r in range(args.reps):
            t_plain.append(timed(plain, keys))
            t_logged.append(timed(logged, keys))
            print(f"rep {r}: plain {steps / t_plain[-1]:,.0f} steps/s ({t_plain[-1]:.2f} s) | "
                  f"logged {steps / t_logged[-1]:,.0f} steps/s ({t_logged[-1]:.2f} s)")
        logger.close()
        logged_updates = len(logger.history)

    mp, ml = statistics.median(t_plain), statistics.median(t_logged)
    overhead = (ml / mp - 1.0) * 100.0
    print(f"median: plain {steps / mp:,.0f} env steps/s, logged {steps / ml:,.0f} env steps/s -> overhead "
          f"{overhead:+.1f} % (target <= 5 %); logger wrote {logged_updates} updates over "
          f"{args.reps + 1} logged runs")
    return {"plain_sps": steps / mp, "logged_sps": steps / ml, "overhead_pct": overhead,
            "compile_plain_s": c_plain, "compile_logged_s": c_logged}


if __name__ == "__main__":
    main()
