"""PPO training throughput (env-steps/s) for 1 seed and N vmapped seeds, ours next to rejax's PPO.

    python -m benchmarks.ppo_throughput                     # CartPole-v1, ppo.Config() defaults, seeds 1 and 8
    python -m benchmarks.ppo_throughput --seeds 1 8 --reps 5 --json out.json
    python -m benchmarks.ppo_throughput --no-rejax          # ours only

What is timed: one compiled call that runs the whole training (``total_timesteps`` env steps per seed) and
blocks until done. Compilation is measured apart (ahead-of-time ``lower().compile()``) and reported separately.
Timed runs alternate between implementations (ours, rejax, ours, rejax, ...) so that drift in machine load hits
both alike; env-steps/s come from the median time. The final return is the mean episode return over the last
10 updates (ours, from the training metrics) or of 128 greedy-free evaluation episodes after training (rejax,
untimed), per seed.

rejax (``pip install -e ".[bench]"``) expects the pre-1.0 gymnax ``step`` with five return values; a small
adapter here folds ``terminated | truncated`` into ``done`` so it runs on gymnax 1.0. Its PPO differs from ours
in ways the mapping cannot remove, printed with the results: separate Adam states for actor and critic,
element-wise gradient clipping (``optax.clip``) instead of global-norm clipping, no learning-rate annealing, no
value clipping and no truncation bootstrap. If rejax is missing or fails, the script says so and reports ours.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()  # as the experiment CLIs do (jax#25861); applies to both implementations alike

from agents import ppo  # noqa: E402
from jaxrl_pref.stats import final_score  # noqa: E402


class Bench:
    """A compiled training function plus how to read its final per-seed return."""

    def __init__(self, name: str, fn: Callable, keys, final_return: Callable):
        self.name, self.keys, self._final = name, keys, final_return
        t = time.perf_counter()
        self.compiled = jax.jit(fn).lower(keys).compile()
        self.compile_s = time.perf_counter() - t
        self.times: list[float] = []
        self.out = None

    def run(self) -> None:
        t = time.perf_counter()
        self.out = jax.block_until_ready(self.compiled(self.keys))
        self.times.append(time.perf_counter() - t)

    def final_returns(self) -> np.ndarray:
        return np.atleast_1d(np.asarray(self._final(self.out, self.keys)))

    def summary(self, steps: int, final_key: str = "final") -> dict:
        """Its timings after :func:`alternate`: compile seconds, median and all run seconds, env-steps/s for a run
        of ``steps`` env steps, and the final score per seed (under ``final_key``)."""
        med = statistics.median(self.times)
        return {"compile_s": self.compile_s, "run_s_median": med, "run_s_all": self.times,
                "env_steps_per_s": steps / med, final_key: self.final_returns().tolist()}


def alternate(benches, reps: int) -> None:
    """One untimed warm-up run of each bench, then ``reps`` rounds running each in turn (machine drift hits all
    alike); times in ``bench.times``."""
    for b in benches:
        b.run()
        b.times.clear()
    for _ in range(reps):
        for b in benches:
            b.run()


def jitted_loop_parser(description: str, env: str, num_envs: int, num_steps: int, total_timesteps: int,
                       methods, default_methods, seeds) -> argparse.ArgumentParser:
    """The options every method-vs-PPO benchmark of the jitted loop takes (``--env --num-envs --num-steps
    --total-timesteps --methods --seeds --reps --json``), with these defaults; a benchmark adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--env", default=env)
    p.add_argument("--num-envs", type=int, default=num_envs)
    p.add_argument("--num-steps", type=int, default=num_steps)
    p.add_argument("--total-timesteps", type=int, default=total_timesteps)
    p.add_argument("--methods", nargs="+", default=list(default_methods), choices=methods)
    p.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="vmapped seed counts to measure")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    return p


def config_of(args) -> "ppo.Config":
    """PPO's config from :func:`jitted_loop_parser`'s options."""
    from agents import ppo
    return ppo.Config(env_name=args.env, num_envs=args.num_envs, num_steps=args.num_steps,
                      total_timesteps=args.total_timesteps)


def measure_each(args, cfg, measure, report, more=()) -> list[dict]:
    """``measure(cfg, args.methods, n, args.reps)`` for each seed count of ``--seeds``, then each of ``more`` (no
    argument), each result printed by ``report`` as it comes; all written to ``--json`` when given."""
    results = []
    for r in (*(lambda n=n: measure(cfg, args.methods, n, args.reps) for n in args.seeds), *more):
        results.append(r())
        print(report(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def seed_keys(num_seeds: int):
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(num_seeds))
    return keys if num_seeds > 1 else keys[0]


def ours(cfg: ppo.Config, num_seeds: int) -> Bench:
    train = ppo.make_train(cfg)

    def fn(key):
        out = train(key)
        return out.metrics["episode_return"]

    fn = jax.vmap(fn) if num_seeds > 1 else fn
    return Bench("jaxrl_pref", fn, seed_keys(num_seeds),
                 lambda ret, _: final_score(ret, last=10))


class FiveValueStep:
    """gymnax 1.0 env (six-value ``step``) behind the pre-1.0 five-value ``step`` that rejax calls."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):  # only called for names not found on the adapter itself
        if name == "_env":  # during copy/unpickling, before __init__ ran
            raise AttributeError(name)
        return getattr(self._env, name)

    def step(self, key, state, action, params=None):
        obs, state, reward, terminated, truncated, info = self._env.step(key, state, action, params)
        return obs, state, reward, jnp.logical_or(terminated, truncated), info

    def __hash__(self):  # rejax passes the env as a static jit argument
        return hash((FiveValueStep, id(self._env)))

    def __eq__(self, other):
        return isinstance(other, FiveValueStep) and other._env is self._env


def rejax_bench(cfg: ppo.Config, num_seeds: int) -> Bench:
    import gymnax
    from rejax import PPO as RejaxPPO
    from rejax.evaluate import evaluate

    base, params = gymnax.make(cfg.env_name)
    env = FiveValueStep(base)
    algo = RejaxPPO.create(
        env=env, env_params=params, num_envs=cfg.num_envs, num_steps=cfg.num_steps, num_epochs=cfg.update_epochs,
        num_minibatches=cfg.num_minibatches, learning_rate=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm,
        gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_eps=cfg.clip_eps, ent_coef=cfg.ent_coef,
        vf_coef=cfg.vf_coef, total_timesteps=cfg.total_timesteps, eval_freq=cfg.total_timesteps,
        skip_initial_evaluation=True, agent_kwargs={"activation": cfg.activation, "hidden_layer_sizes": cfg.hidden})
    # evaluation is not part of training: a no-op callback while timed, real episodes afterwards (untimed)
    algo = algo.replace(eval_callback=lambda a, ts, rng: jnp.zeros(()))

    def fn(key):
        ts, _ = algo.train(key)
        return ts

    def final(ts, keys):
        def one(ts, key):
            _, returns = evaluate(algo.make_act(ts), key, env, params, 128, params.max_steps_in_episode)
            return returns.mean()
        return jax.vmap(one)(ts, keys) if num_seeds > 1 else one(ts, keys)

    return Bench("rejax", jax.vmap(fn) if num_seeds > 1 else fn, seed_keys(num_seeds), final)


def measure(cfg: ppo.Config, num_seeds: int, reps: int, with_rejax: bool) -> dict:
    benches = [ours(cfg, num_seeds)]
    rejax_note: Optional[str] = None
    if with_rejax:
        try:
            benches.append(rejax_bench(cfg, num_seeds))
        except ImportError:
            rejax_note = 'rejax is not installed (pip install -e ".[bench]"); ours only'
        except Exception as e:  # report, don't hide: the comparison is optional, our figures are not
            rejax_note = f"rejax could not run on this config: {type(e).__name__}: {e}"
    for b in benches:
        b.run()  # warm-up (first-call allocations), not counted
        b.times.clear()
    for _ in range(reps):
        for b in benches:
            b.run()
    steps = cfg.total_timesteps * num_seeds
    result = {"num_seeds": num_seeds, "total_env_steps": steps, "rejax_note": rejax_note}
    for b in benches:
        result[b.name] = b.summary(steps, "final_return")
        result[b.name]["seeds_at_475"] = int((b.final_returns() >= 475).sum())
    if "rejax" in result:
        result["ratio_vs_rejax"] = result["jaxrl_pref"]["env_steps_per_s"] / result["rejax"]["env_steps_per_s"]
    return result


def report(r: dict) -> str:
    lines = [f"--- {r['num_seeds']} seed(s), {r['total_env_steps']:,} env steps per call"]
    for name in ("jaxrl_pref", "rejax"):
        if name in r:
            x = r[name]
            fr = np.asarray(x["final_return"])
            lines.append(f"{name:>11}: {x['env_steps_per_s']:>12,.0f} env-steps/s  run {x['run_s_median']:.2f}s "
                         f"(median of {len(x['run_s_all'])})  compile {x['compile_s']:.1f}s  final return "
                         f"mean {fr.mean():.1f} min {fr.min():.1f}  seeds >= 475: {x['seeds_at_475']}/{fr.size}")
    if "ratio_vs_rejax" in r:
        lines.append(f"      ratio: jaxrl_pref / rejax = {r['ratio_vs_rejax']:.2f}x")
    if r["rejax_note"]:
        lines.append(f"      note: {r['rejax_note']}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--total-timesteps", type=int, default=ppo.Config.total_timesteps)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 8], help="vmapped seed counts to measure")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-rejax", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    cfg = ppo.Config(env_name=args.env, total_timesteps=args.total_timesteps)
    print(f"config: {cfg}\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    if not args.no_rejax:
        print("rejax mapping: same num_envs/num_steps/epochs/minibatches/lr/gamma/lambda/clip/ent/vf/hidden/"
              "activation; differs: separate actor/critic Adam, optax.clip (not global norm), no lr anneal, no "
              "value clipping, no truncation bootstrap")
    results = []
    for n in args.seeds:
        r = measure(cfg, n, args.reps, not args.no_rejax)
        print(report(r), flush=True)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": str(cfg), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
