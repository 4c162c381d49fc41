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


import jax
import numpy as np

from benchmarks.ppo_throughput import Bench, alternate, config_of, jitted_loop_parser, measure_each, seed_keys  # also sets synchronous CPU dispatch

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
        out[m] = b.summary(cfg.total_timesteps * num_seeds)
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
    p = jitted_loop_parser(__doc__.split("\n\n")[0], "MiniGrid-DoorKey-8x8", 32, 128, 262_144, METHODS,
                           DEFAULT_METHODS, [1, 4])
    args = p.parse_args(argv)
    cfg = config_of(args)
    print(f"config: {cfg}\nbonus: {BonusConfig()}\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"jax {jax.__version__}", flush=True)
    return measure_each(args, cfg, measure, report)


if __name__ == "__main__":
    main()
