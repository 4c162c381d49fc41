"""Exploration-bonus overhead: PPO vs PPO+RND (one critic, or its own value head) vs PPO+E3B env-steps/s on the
same task and network, in one run.

    python -m benchmarks.bonus_throughput                                    # MiniGrid-DoorKey-8x8, 1 and 4 seeds
    python -m benchmarks.bonus_throughput --env DeepSea-20 --num-envs 16 --seeds 4 --json out.json

The PPO config is the one the exploration study uses (``experiments.sparse_study``'s defaults: 32 envs x 128
steps, 4 epochs x 4 minibatches, the MLP policy); the bonus is ``--bonus rnd|e3b`` with its defaults
(:class:`jaxrl_pref.rewards.bonus.BonusConfig`). What is timed: one compiled call that runs the whole training
(``total_timesteps`` env steps per seed, seeds vmapped) and blocks until done; compilation apart. Timed runs
alternate between the methods so machine drift hits all alike; env-steps/s from the median. Targets (issue 20):
RND >= 0.7x and E3B >= 0.6x plain PPO. ``e3b-unfused`` / ``rnd-unfused``: the same bonus with the seam's two calls
made apart (``update`` then ``__call__``, as before ``update_and_reward``): E3B's rollout scan three times per update
instead of once, RND's prediction error twice (``--methods ppo e3b e3b-unfused``).
"""
from __future__ import annotations

import argparse
import json
import statistics

import jax
import numpy as np

from benchmarks.ppo_throughput import Bench, alternate, seed_keys  # also sets synchronous CPU dispatch

from agents import ppo  # noqa: E402
from jaxrl_pref.rewards.bonus import BonusConfig, with_bonus  # noqa: E402
from jaxrl_pref.stats import final_score  # noqa: E402

METHODS = ("ppo", "rnd", "rnd-head", "e3b", "rnd-unfused", "e3b-unfused")
DEFAULT_METHODS = ("ppo", "rnd", "rnd-head", "e3b")
TARGETS = {"rnd": 0.7, "rnd-head": 0.7, "e3b": 0.6}


class Unfused:
    """A reward transform with the seam's calls made apart: everything of ``inner`` but ``update_and_reward``
    (recursively through ``WithBonus``'s base and bonus)."""

    def __init__(self, inner):
        self.inner = inner
        for name in ("base", "bonus"):
            if hasattr(inner, name):
                setattr(inner, name, Unfused(getattr(inner, name)))

    def __getattr__(self, name):
        if name == "update_and_reward":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, state, traj):
        return self.inner(state, traj)


def bench(cfg: ppo.Config, method: str, num_seeds: int) -> Bench:
    """``rnd-head``: RND as its own reward stream with a second value head (``--bonus-value-head``);
    ``*-unfused``: see the module doc."""
    bonus = BonusConfig(bonus="none" if method == "ppo" else method.split("-")[0],
                        bonus_value_head=method == "rnd-head")
    reward = with_bonus(None, bonus, cfg.num_envs)
    train = ppo.make_train(cfg, reward=Unfused(reward) if method.endswith("-unfused") else reward)

    def fn(key):
        m = train(key).metrics
        return m["episode_return"], m["episode_success"] if "episode_success" in m else m["episode_return"]

    fn = jax.vmap(fn) if num_seeds > 1 else fn
    return Bench(method, fn, seed_keys(num_seeds), lambda out, _: final_score(out[1], last=10))


def measure(cfg: ppo.Config, methods, num_seeds: int, reps: int) -> dict:
    benches = {m: bench(cfg, m, num_seeds) for m in methods}
    alternate(benches.values(), reps)
    out = {"num_seeds": num_seeds}
    for m, b in benches.items():
        med = statistics.median(b.times)
        out[m] = {"compile_s": b.compile_s, "run_s_median": med, "run_s_all": b.times,
                  "env_steps_per_s": cfg.total_timesteps * num_seeds / med, "final": b.final_returns().tolist()}
    return out


def report(r: dict) -> str:
    lines = [f"--- {r['num_seeds']} seed(s) vmapped"]
    base = r.get("ppo", {}).get("env_steps_per_s")
    for m in METHODS:
        if m not in r:
            continue
        x = r[m]
        ratio = f"  {x['env_steps_per_s'] / base:.3f}x PPO" if base and m != "ppo" else ""
        target = f" (target >= {TARGETS[m]})" if ratio and m in TARGETS else ""
        lines.append(f"{m:>11}: {x['env_steps_per_s']:>10,.0f} env-steps/s  run {x['run_s_median']:.2f}s (median of "
                     f"{len(x['run_s_all'])})  compile {x['compile_s']:.1f}s  final success/return "
                     f"{np.mean(x['final']):.3f}{ratio}{target}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="MiniGrid-DoorKey-8x8")
    p.add_argument("--num-envs", type=int, default=32)
    p.add_argument("--num-steps", type=int, default=128)
    p.add_argument("--total-timesteps", type=int, default=262_144)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 4], help="vmapped seed counts to measure")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    cfg = ppo.Config(env_name=args.env, num_envs=args.num_envs, num_steps=args.num_steps,
                     total_timesteps=args.total_timesteps)
    print(f"config: {cfg}\nbonus: {BonusConfig()}\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"jax {jax.__version__}", flush=True)
    results = []
    for n in args.seeds:
        r = measure(cfg, args.methods, n, args.reps)
        print(report(r), flush=True)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
