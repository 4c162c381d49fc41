"""PPO env-steps/s with the rollouts' keys hashed unrolled (``jaxrl_pref.prng``, the default) vs JAX's default keys.

    python -m benchmarks.unrolled_keys                          # CartPole-v1 as bench_ppo.py, seeds 1 and 8
    python -m benchmarks.unrolled_keys --network gru --seeds 1 --reps 3

Both variants draw the same random bits (the trainers' numbers do not change); only how XLA runs each Threefry hash
differs: on CPU the default keys' hash is a five-iteration XLA loop, the unrolled one a fused kernel. Each variant
is compiled ahead of time, then they run alternately (``benchmarks.ppo_throughput.alternate``); env-steps/s come
from the median time. The default variant is built with ``jaxrl_pref.prng.unrolled`` replaced by the identity.
"""
from __future__ import annotations

import argparse
import statistics

from benchmarks.ppo_throughput import alternate, ours  # sets the experiments' CPU dispatch first

from agents import ppo
from jaxrl_pref import prng


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--network", default="mlp", choices=("mlp", "gru", "lstm"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--total-timesteps", type=int, default=500_000)
    a = p.parse_args(argv)
    # bench_ppo.py's configuration (purejaxrl's CartPole PPO)
    cfg = ppo.Config(env_name=a.env, num_envs=4, num_steps=128, total_timesteps=a.total_timesteps,
                     learning_rate=2.5e-4, update_epochs=4, num_minibatches=4, network=a.network)
    unrolled = prng.unrolled
    for n in a.seeds:
        fast = ours(cfg, n)
        prng.unrolled = lambda key: key  # noqa: E731  (traced now: the default keys' hash)
        try:
            default = ours(cfg, n)
        finally:
            prng.unrolled = unrolled
        fast.name, default.name = "unrolled keys", "default keys"
        alternate([fast, default], a.reps)
        steps = a.total_timesteps * n
        sps = {b.name: steps / statistics.median(b.times) for b in (fast, default)}
        for b in (fast, default):
            print(f"{a.env} {a.network} seeds={n} {b.name:14s} {sps[b.name]:10,.0f} env-steps/s "
                  f"(compile {b.compile_s:.1f} s; times {', '.join(f'{t:.2f}' for t in b.times)})")
        print(f"  speed-up {sps['unrolled keys'] / sps['default keys']:.2f}x")


if __name__ == "__main__":
    main()
