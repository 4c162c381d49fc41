"""Recurrent PPO throughput (env-steps/s): GRU and LSTM policies at 1 and N vmapped seeds, next to the MLP.

    python -m benchmarks.ppo_rnn_throughput                          # CartPole-v1: mlp, gru, lstm at 1 and 8 seeds
    python -m benchmarks.ppo_rnn_throughput --networks gru --seeds 1 --reps 3 --json out.json

The config is the one ``../shared/anchors/bench_ppo_rnn.py`` times against purejaxrl's ``ppo_rnn.py``: 4 envs x 128
steps, 500k env steps per seed, 4 epochs x 4 minibatches (of whole env sequences for the recurrent networks),
``hidden=(128,)``, relu, ``rnn_hidden=128`` (Dense(128)+relu -> GRU/LSTM(128) -> actor and critic heads of
Dense(128)+relu). The MLP row uses the same hidden layer, so the rows differ only in the recurrent core. What is
timed: one compiled call that runs the whole training and blocks until done (compilation apart, reported
separately); implementations alternate between timed runs; env-steps/s from the median. Final return: mean episode
return over the last 10 updates, per seed.
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from benchmarks.ppo_throughput import alternate, ours  # also sets synchronous CPU dispatch, as the experiment CLIs do

from agents import ppo  # noqa: E402
from jaxrl_pref.testing import RNN_BENCH as BENCH  # noqa: E402  (the anchor bench's config)


def measure(cfgs: dict, num_seeds: int, reps: int) -> dict:
    benches = {name: ours(cfg, num_seeds) for name, cfg in cfgs.items()}
    alternate(benches.values(), reps)
    out = {"num_seeds": num_seeds}
    for name, b in benches.items():
        out[name] = b.summary(cfgs[name].total_timesteps * num_seeds, "final_return")
    return out


def report(r: dict) -> str:
    lines = [f"--- {r['num_seeds']} seed(s)"]
    for name, x in r.items():
        if name == "num_seeds":
            continue
        fr = np.asarray(x["final_return"])
        lines.append(f"{name:>5}: {x['env_steps_per_s']:>10,.0f} env-steps/s  run {x['run_s_median']:.1f}s (median of "
                     f"{len(x['run_s_all'])})  compile {x['compile_s']:.1f}s  final return mean {fr.mean():.1f} "
                     f"min {fr.min():.1f}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--networks", nargs="+", default=["mlp", "gru", "lstm"], choices=list(ppo.NETWORKS))
    p.add_argument("--total-timesteps", type=int, default=BENCH["total_timesteps"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 8], help="vmapped seed counts to measure")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    cfgs = {n: ppo.Config(**{**BENCH, "env_name": args.env, "total_timesteps": args.total_timesteps, "network": n})
            for n in args.networks}
    print(f"config: {cfgs[args.networks[0]]}\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"jax {jax.__version__}")
    results = []
    for n in args.seeds:
        r = measure(cfgs, n, args.reps)
        print(report(r), flush=True)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: str(v) for k, v in cfgs.items()}, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
