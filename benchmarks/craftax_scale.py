"""Craftax at scale: PPO, PPO-RNN, PPO+RND and PPO+E3B trained for a budget; env-steps/s and the final Craftax score
next to the Craftax scoreboard.

    python -m benchmarks.craftax_scale                      # GPU: Craftax-Symbolic-v1, 1M steps, 1024 envs, 4 methods
    python -m benchmarks.craftax_scale --env Craftax-Classic-Symbolic-v1 --total-timesteps 8192 --num-envs 16 \\
        --num-steps 64 --hidden 64 64                       # CPU smoke run (a few minutes on 2 cores, mostly compile)
    python -m benchmarks.craftax_scale --methods random --total-timesteps 262144   # env throughput, random actions

Every method is :mod:`agents.ppo` (``make_train``) on the same env batch: ``ppo`` the MLP policy, ``ppo_rnn`` a GRU
core (``network="gru"``), ``rnd``/``e3b`` the MLP policy plus an exploration bonus
(:func:`jaxrl_pref.rewards.bonus.with_bonus`, as ``--bonus rnd|e3b`` on the CLIs; ``--rnd-coef``/``--e3b-coef``);
``random`` steps the env with uniformly random actions (no learning; ``--reset-ratio`` applies to it only, PPO's
env uses the default). PPO hyperparameters follow Craftax's PPO baseline (lr 2e-4, GAE lambda 0.8, 8 minibatches, 4 epochs,
3 x 512 tanh layers by default).

What is timed: one compiled call running the whole training of ``--seeds`` seeds (vmapped; seeds one after another
with several devices, whose envs are then split over them), blocked on; compilation (ahead of time) is reported
apart. env-steps/s = env steps of all seeds / that time. The final score is ``episode_score`` (episode return as a
% of the maximum return, the scoreboard's measure; :mod:`envs.craftax`) averaged over the last 10% of updates (at
least one) that finished episodes, then over seeds; "n/a" when no episode finished in them (short budgets:
early Classic episodes last ~60-160 steps).

Scoreboard (Craftax paper, Craftax-Symbolic, % of max return): at 1B steps PPO-RNN 15.3, RND 12.0, PPO 11.9,
ICM 11.9, E3B 11.0; at 1M steps every method is at about 2.2-2.3. It is for full Craftax: Classic scores are not
comparable.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()  # as the experiment CLIs do (jax#25861)

import envs  # noqa: E402
from agents import ppo  # noqa: E402
from jaxrl_pref.rewards.bonus import BonusConfig, with_bonus  # noqa: E402
from jaxrl_pref.stats import final_score  # noqa: E402

METHODS = ("ppo", "ppo_rnn", "rnd", "e3b", "random")
SCOREBOARD_1B = {"ppo": 11.9, "ppo_rnn": 15.3, "rnd": 12.0, "e3b": 11.0}  # ICM 11.9 (not run here)
SCOREBOARD_1M = "~2.2-2.3"


def bonus_reward(method: str, coef: float, num_envs: int):
    """The RND/E3B reward transform (the shared helper of the PPO-family CLIs' ``--bonus``)."""
    return with_bonus(None, BonusConfig(bonus=method, bonus_coef=coef), num_envs)


def train_fn(method: str, args, num_devices: int):
    net = "gru" if method == "ppo_rnn" else "mlp"
    cfg = ppo.Config(env_name=args.env, num_envs=args.num_envs, num_steps=args.num_steps,
                     total_timesteps=args.total_timesteps, learning_rate=args.lr, gae_lambda=0.8,
                     num_minibatches=args.num_minibatches, update_epochs=4, hidden=tuple(args.hidden),
                     network=net, num_devices=num_devices)
    coef = {"rnd": args.rnd_coef, "e3b": args.e3b_coef}.get(method)
    reward = bonus_reward(method, coef, cfg.num_envs // num_devices) if coef is not None else None
    train = ppo.make_train(cfg, reward=reward)
    steps = cfg.num_updates * cfg.num_steps * cfg.num_envs

    def fn(key):
        return train(key).metrics["episode_score"]
    return fn, steps


def random_fn(args):
    env, p = envs.make(args.env, num_envs=args.num_envs, reset_ratio=args.reset_ratio)
    n_act = envs.spec(env, p).num_actions
    t = max(1, args.total_timesteps // args.num_envs)

    def fn(key):
        k0, k1 = jax.random.split(key)
        obs, s = env.reset(k0, p)

        def body(s, k):
            ka, ks = jax.random.split(k)
            a = jax.random.randint(ka, (args.num_envs,), 0, n_act)
            _, s, _, te, tr, info = env.step(ks, s, a, p)
            d = info["episode_done"].astype(jnp.float32)
            return s, ((info["episode_score"] * d).sum(), d.sum())

        _, (tot, n) = jax.lax.scan(body, s, jax.random.split(k1, t))
        # one "update" per 64 steps so that final_score's last-10% window means the same as for PPO
        u = max(1, t // 64)
        tot, n = tot[: u * (t // u)].reshape(u, -1).sum(1), n[: u * (t // u)].reshape(u, -1).sum(1)
        return jnp.where(n > 0, tot / jnp.maximum(n, 1.0), jnp.nan)
    return fn, t * args.num_envs


def run_method(method: str, args) -> dict:
    ndev = args.num_devices or jax.device_count()
    if method != "random" and args.num_envs % ndev:
        ndev = 1
    if method == "random":
        fn, steps = random_fn(args)
        ndev = 1
    else:
        fn, steps = train_fn(method, args, ndev)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(args.seeds))
    t = time.perf_counter()
    if ndev > 1 or args.seeds == 1:  # data-parallel training runs one seed at a time
        compiled = jax.jit(fn).lower(keys[0]).compile()
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        scores = np.stack([np.asarray(jax.block_until_ready(compiled(k))) for k in keys])
    else:
        compiled = jax.jit(jax.vmap(fn)).lower(keys).compile()
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        scores = np.asarray(jax.block_until_ready(compiled(keys)))
    train_s = time.perf_counter() - t
    total = steps * args.seeds
    return {"method": method, "env_steps": total, "compile_s": compile_s, "train_s": train_s,
            "steps_per_s": total / train_s,
            # episode_score over the last 10% of updates that finished episodes, pooled over seeds (NaN if none)
            "score": final_score(np.asarray(scores, np.float64), frac=0.1, pooled=True), "devices": ndev}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--env", default="Craftax-Symbolic-v1", choices=sorted(envs.craftax.NAMES))
    p.add_argument("--total-timesteps", type=int, default=1_000_000, help="env steps per seed and method")
    p.add_argument("--num-envs", type=int, default=1024)
    p.add_argument("--num-steps", type=int, default=64)
    p.add_argument("--num-minibatches", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 512, 512])
    p.add_argument("--methods", default="ppo,ppo_rnn,rnd,e3b", help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--rnd-coef", type=float, default=0.01, help="intrinsic-reward coefficient of rnd")
    p.add_argument("--e3b-coef", type=float, default=0.01, help="intrinsic-reward coefficient of e3b")
    p.add_argument("--reset-ratio", type=int, default=envs.craftax.DEFAULT_RESET_RATIO,
                   help="envs per freshly generated world (random method)")
    p.add_argument("--num-devices", type=int, default=0, help="0: all local devices")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        p.error(f"--methods: unknown {bad}; use {', '.join(METHODS)}")
    envs.craftax.require_craftax(args.env)

    dev = jax.devices()[0]
    print(f"{args.env}: {args.total_timesteps:,} steps/seed, {args.num_envs} envs x {args.num_steps} steps, "
          f"{args.seeds} seed(s); device {dev.platform}/{dev.device_kind} x{jax.device_count()}", flush=True)
    rows = []
    for m in methods:
        r = run_method(m, args)
        rows.append(r)
        print(f"  {m}: {r['steps_per_s']:,.0f} env-steps/s ({r['env_steps']:,} steps in {r['train_s']:.1f} s, "
              f"compile {r['compile_s']:.1f} s), score {r['score']:.2f}", flush=True)

    full = not args.env.startswith("Craftax-Classic")
    print(f"\n{'method':<8} {'env-steps/s':>12} {'compile s':>10} {'score %':>8} {'Craftax-1M':>11} {'Craftax-1B':>11}")
    for r in rows:
        s = "n/a" if np.isnan(r["score"]) else f"{r['score']:.2f}"
        b1 = f"{SCOREBOARD_1B[r['method']]:.1f}" if full and r["method"] in SCOREBOARD_1B else "-"
        m1 = SCOREBOARD_1M if full and r["method"] != "random" else "-"
        print(f"{r['method']:<8} {r['steps_per_s']:>12,.0f} {r['compile_s']:>10.1f} {s:>8} {m1:>11} {b1:>11}")
    if not full:
        print("(the scoreboard is for full Craftax, Craftax-Symbolic-v1; Classic scores are not comparable)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
