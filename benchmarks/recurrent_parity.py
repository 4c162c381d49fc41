"""Recurrent learning parity: this project's GRU, LSTM and MLP PPO vs purejaxrl's ``ppo_rnn.py``, same config, same
seeds, final return with a 95% interval per task.

    python -m benchmarks.recurrent_parity                                   # CartPole, Acrobot, FourRooms; 4 seeds
    python -m benchmarks.recurrent_parity --envs Acrobot-v1 --seeds 8 --json runs/parity.json
    python -m benchmarks.recurrent_parity --anchor ''                       # the project's networks only

The config is the anchor bench's (``../shared/anchors/bench_ppo_rnn.py``): 4 envs x 128 steps, 500k env steps per
seed, 4 epochs x 4 minibatches, lr 2.5e-4 annealed, gamma 0.99, lambda 0.95, Dense(128)+relu -> GRU/LSTM(128) ->
heads of Dense(128)+relu; the MLP row is the same network without the core. The recurrent rows use the project's
default critic (``auto``: for the GRU ``detached``, the core's output through a stop-gradient plus the critic's own
torso; for the LSTM ``separate``, its own torso and core); ``gru:shared``
is the anchor's exact architecture (one core trained by both losses). The project runs with its defaults
otherwise (truncated episodes bootstrap from ``V(final_obs)``; the anchor treats them as terminal). Seeds: the keys
``jax.random.split(PRNGKey(0), seeds)``, vmapped, on both sides.

Final return: the mean return of the episodes that ended in the last ``--last`` updates (5% of training by
default), per seed; both sides computed the same way from per-update episode sums and counts (the anchor bench's
own number counts an update in which no episode ended as a return of 0, which drags a solved CartPole below 500).
Interval: 95% percentile bootstrap over seeds (10,000 resamples). Verdict per row: ``>= anchor`` when the row's
mean is at or above the lower end of the anchor's interval.

The anchor is a yardstick outside the project: it is run in a subprocess from ``--anchor DIR`` (purejaxrl's
directory, default ``../shared/anchors/purejaxrl``) and never imported here. ``NPROC=3`` is set for it (see
docs/performance.md: its vmapped LAPACK initialiser otherwise stalls on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from agents import ppo
from jaxrl_pref.stats import bootstrap_mean_interval, episode_mean
from jaxrl_pref.testing import RNN_BENCH

ROOT = Path(__file__).resolve().parents[1]
BENCH = {k: v for k, v in RNN_BENCH.items() if k != "env_name"}  # the anchor bench's config, on any env
ENVS = ("CartPole-v1", "Acrobot-v1", "FourRooms-misc")

# Run in a subprocess with the anchor's directory on sys.path: argv = [anchor_dir, env, seeds, last, total_timesteps].
# Prints per-seed episode-return sums and counts of the last `last` updates as one JSON line.
_ANCHOR_DRIVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
import ppo_rnn
env, seeds, last, total = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
cfg = dict(LR=2.5e-4, NUM_ENVS=4, NUM_STEPS=128, TOTAL_TIMESTEPS=total, UPDATE_EPOCHS=4, NUM_MINIBATCHES=4,
           GAMMA=0.99, GAE_LAMBDA=0.95, CLIP_EPS=0.2, ENT_COEF=0.01, VF_COEF=0.5, MAX_GRAD_NORM=0.5,
           ENV_NAME=env, ANNEAL_LR=True, DEBUG=False)
t = time.perf_counter()
out = jax.block_until_ready(jax.jit(jax.vmap(ppo_rnn.make_train(cfg)))(
    jax.random.split(jax.random.PRNGKey(0), seeds)))
m = out["metric"]
shape = (seeds, m["returned_episode"].shape[1], -1)  # [seeds, updates, steps * envs]
done = np.asarray(m["returned_episode"]).reshape(shape)[:, -last:]
rets = np.asarray(m["returned_episode_returns"]).reshape(shape)[:, -last:]
print(json.dumps({"sums": (rets * done).sum((1, 2)).tolist(), "counts": done.sum((1, 2)).tolist(),
                  "seconds": time.perf_counter() - t}))
"""


def final_returns(sums, counts) -> list[float]:
    """Per seed: the mean return of the episodes counted (NaN for a seed that finished none)."""
    return episode_mean(sums, counts).tolist()


def project(env: str, network: str, seeds: int, last: int, total: int) -> dict:
    """``network``: ``mlp``, ``gru``, ``lstm``, or ``gru:shared`` etc. (a recurrent network with another critic)."""
    net, _, critic = network.partition(":")
    cfg = ppo.Config(env_name=env, network=net, **{**BENCH, "total_timesteps": total},
                     **({"critic": critic} if critic else {}))
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    t = time.perf_counter()
    out = jax.block_until_ready(jax.jit(jax.vmap(ppo.make_train(cfg)))(keys))
    ret, n = np.asarray(out.metrics["episode_return"]), np.asarray(out.metrics["episodes"])  # [seeds, updates]
    sums = np.where(n > 0, ret * n, 0.0)[:, -last:].sum(1)
    return {"final": final_returns(sums, n[:, -last:].sum(1)), "seconds": time.perf_counter() - t}


def anchor(anchor_dir: str, env: str, seeds: int, last: int, total: int) -> dict:
    r = subprocess.run([sys.executable, "-c", _ANCHOR_DRIVER, anchor_dir, env, str(seeds), str(last), str(total)],
                       capture_output=True, text=True, env={**os.environ, "NPROC": "3"})
    if r.returncode != 0:
        raise RuntimeError(f"anchor run on {env} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return {"final": final_returns(d["sums"], d["counts"]), "seconds": d["seconds"]}


def summarize(results: dict) -> str:
    lines = ["| task | policy | final return, mean [95% CI] | per seed | vs anchor |", "|---|---|---|---|---|"]
    for env, rows in results.items():
        a = rows.get("purejaxrl ppo_rnn")
        a_lo = bootstrap_mean_interval(a["final"])[0] if a else None
        for name, r in rows.items():
            x = np.asarray(r["final"])
            lo, hi = bootstrap_mean_interval(x)
            verdict = "" if a is None or r is a else (">= anchor" if x.mean() >= a_lo else "BELOW anchor")
            lines.append(f"| {env} | {name} | {x.mean():.1f} [{lo:.1f}, {hi:.1f}] | "
                         f"{', '.join(f'{v:.1f}' for v in x)} | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", nargs="+", default=list(ENVS))
    p.add_argument("--networks", nargs="+", default=["gru", "lstm", "mlp"],
                   help="mlp, gru, lstm; NET:CRITIC for a recurrent network with another critic (e.g. gru:shared)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--total-timesteps", type=int, default=BENCH["total_timesteps"])
    p.add_argument("--last", type=int, default=0, help="updates the final return averages over (0: the last 5%%)")
    p.add_argument("--anchor", default=str(ROOT.parent / "shared" / "anchors" / "purejaxrl"),
                   help="purejaxrl's directory (holding ppo_rnn.py); '' to run the project's networks only")
    p.add_argument("--json", help="write the per-seed results here")
    a = p.parse_args(argv)
    updates = a.total_timesteps // (BENCH["num_envs"] * BENCH["num_steps"])
    last = a.last or max(1, updates // 20)
    if a.anchor and not (Path(a.anchor) / "ppo_rnn.py").exists():
        p.error(f"--anchor {a.anchor}: no ppo_rnn.py there; pass purejaxrl's directory, or --anchor '' to skip it")
    results: dict = {}
    for env in a.envs:
        rows = results[env] = {}
        if a.anchor:
            rows["purejaxrl ppo_rnn"] = anchor(a.anchor, env, a.seeds, last, a.total_timesteps)
        for net in a.networks:
            rows[net] = project(env, net, a.seeds, last, a.total_timesteps)
        print(f"{env}: " + ", ".join(f"{k} {np.mean(v['final']):.1f} ({v['seconds']:.0f}s)" for k, v in rows.items()),
              flush=True)
        if a.json:  # after every task: a long sweep keeps what it measured
            Path(a.json).write_text(json.dumps({"args": vars(a), "last": last, "results": results}, indent=1))
    print(f"final return = mean return of the episodes ended in the last {last} of {updates} updates; "
          f"{a.seeds} seeds; {time.strftime('%Y-%m-%d')}")
    print(summarize(results))
    return results


if __name__ == "__main__":
    main()
