"""Speed cost of language in the policy (``--language minilm``, ``--alignment-coef``; docs/language.md): env-steps/s
of PPO with and without the fused message embedding, in one process.

    python -m benchmarks.language_fusion                                  # KeyDoor-9, 32 x 64, 10 seeds vmapped
    python -m benchmarks.language_fusion --host-env MiniHack-Room-5x5-v0  # also the NetHack pool (host loop)
    python -m benchmarks.language_fusion --seeds 1 10 --json out.json

JAX task (captioned): what is timed is one compiled call running the whole training (``--total-timesteps`` env steps
per seed, seeds vmapped), compilation and the one-off caption embedding apart; methods ``ppo`` (plain),
``minilm`` (``--language minilm``), ``align`` (``--alignment-coef 0.01``), ``minilm+align``; timed runs alternate
between the methods, env-steps/s from the median (:mod:`benchmarks.ppo_throughput`'s ``Bench``).

Host env (``--host-env``, a NetHack/MiniHack pool, one seed): ``ppo`` (the NetHack encoder on glyphs_crop and
blstats), ``bytes`` (+ the byte-level message encoder: ``--encode-keys glyphs_crop blstats message``) and
``minilm`` (glyphs_crop, blstats + the fused MiniLM embedding, the host-side cache included); each
``--host-updates`` updates of the host loop (16 envs x 32 steps) after a warm-up of as many (which fills the
cache: a message seen for the first time costs one MiniLM call on the host), alternating, median of ``--reps``.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from benchmarks.ppo_throughput import Bench, alternate, config_of, jitted_loop_parser, measure_each, seed_keys  # also sets synchronous CPU dispatch

from agents import ppo  # noqa: E402
from jaxrl_pref import language  # noqa: E402
from jaxrl_pref.stats import final_score  # noqa: E402

METHODS = ("ppo", "minilm", "align", "minilm+align")
HOST_METHODS = ("ppo", "bytes", "minilm")


def bench(cfg: ppo.Config, method: str, num_seeds: int) -> Bench:
    cfg = dataclasses.replace(cfg, language="minilm" if "minilm" in method else "none")
    coef = 0.01 if "align" in method else 0.0
    reward = language.make_alignment(language.AlignmentConfig(coef), cfg.env_name, host=False)
    train = ppo.make_train(cfg, reward=reward)

    def fn(key):
        m = train(key).metrics
        return m["episode_success"] if "episode_success" in m else m["episode_return"]

    fn = jax.vmap(fn) if num_seeds > 1 else fn
    return Bench(method, fn, seed_keys(num_seeds), lambda out, _: final_score(out, last=10))


def measure(cfg: ppo.Config, methods, num_seeds: int, reps: int) -> dict:
    language.caption_embeddings(cfg.env_name)  # the one-off table (MiniLM on the host) before anything is timed
    benches = {m: bench(cfg, m, num_seeds) for m in methods}
    alternate(benches.values(), reps)
    out = {"where": cfg.env_name, "num_seeds": num_seeds}
    for m, b in benches.items():
        out[m] = b.summary(cfg.total_timesteps * num_seeds)
    return out


def measure_host(env_name: str, updates: int, reps: int, seed: int = 0) -> dict:
    from agents import ppo_host
    from envs.nethack import PoolConfig
    from jaxrl_pref.networks import NetHackNetConfig
    cfg = ppo.host_config(env_name=env_name)
    trainers, states, pools = {}, {}, []
    try:
        for m in HOST_METHODS:
            pool = PoolConfig().make_pool(env_name, cfg.num_envs, seed)
            pools.append(pool)
            keys = ("glyphs_crop", "blstats", "message") if m == "bytes" else ("glyphs_crop", "blstats")
            c = dataclasses.replace(cfg, language="minilm" if m == "minilm" else "none")
            trainers[m] = ppo_host.pool_trainer(c, pool, net=NetHackNetConfig(encode_keys=keys))
            states[m] = trainers[m].init(jax.random.PRNGKey(seed))
        times = {m: [] for m in HOST_METHODS}
        for r in range(reps + 1):  # round 0: warm-up (compiles; the cache fills)
            for m, t in trainers.items():
                start = time.perf_counter()
                states[m], _ = t.run(states[m], None, updates)
                jax.block_until_ready(states[m])
                if r:
                    times[m].append(time.perf_counter() - start)
        out = {"where": env_name, "num_seeds": 1}
        for m, t in trainers.items():
            med = statistics.median(times[m])
            out[m] = {"run_s_median": med, "run_s_all": times[m],
                      "env_steps_per_s": updates * cfg.steps_per_update / med}
            if m == "minilm":
                out[m]["distinct_messages"] = len(t.env.cache)
        return out
    finally:
        for p in pools:
            p.close()


def report(r: dict) -> str:
    lines = [f"--- {r['where']}, {r['num_seeds']} seed(s)" + (" vmapped" if r["num_seeds"] > 1 else "")]
    base = r["ppo"]["env_steps_per_s"]
    for m in dict.fromkeys((*METHODS, *HOST_METHODS)):
        if m not in r or not isinstance(r[m], dict):
            continue
        x = r[m]
        extra = (f"  compile {x['compile_s']:.1f}s  final success {np.mean(x['final']):.3f}" if "compile_s" in x
                 else "") + (f"  {x['distinct_messages']} distinct messages" if "distinct_messages" in x else "")
        lines.append(f"{m:>13}: {x['env_steps_per_s']:>9,.0f} env-steps/s  {x['env_steps_per_s'] / base:.3f}x ppo  "
                     f"run {x['run_s_median']:.2f}s (median of {len(x['run_s_all'])}){extra}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = jitted_loop_parser(__doc__.split("\n\n")[0], "KeyDoor-9", 32, 64, 65_536, METHODS, METHODS, [10])
    p.add_argument("--host-env", default="", help="also time the NetHack/MiniHack pool (e.g. MiniHack-Room-5x5-v0)")
    p.add_argument("--host-updates", type=int, default=10)
    args = p.parse_args(argv)
    cfg = config_of(args)
    print(f"config: {cfg}\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}",
          flush=True)
    host = [lambda: measure_host(args.host_env, args.host_updates, args.reps)] if args.host_env else []
    return measure_each(args, cfg, measure, report, host)


if __name__ == "__main__":
    main()
