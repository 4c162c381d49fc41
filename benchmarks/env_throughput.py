"""NetHack/MiniHack throughput: raw nle, the worker pool, and PPO training on the pool, in one run.

    python -m benchmarks.env_throughput              # NetHackScore-v0, MiniHack-Corridor-R3-v0, MiniHack-Room-5x5-v0
    python -m benchmarks.env_throughput --seconds 20 --num-envs 32 --json out.json

Two MiniHack tasks by default: on Corridor-R3 a short PPO run plays episodes about as long as random play's, so
ppo/pool measures the training loop; on Room-5x5 PPO learns within seconds to end episodes in ~10 steps (random
play: ~70), and since every episode costs a ~1.5 ms reset in NLE's C code, resets set ppo/pool there (the bound
is printed).

For each task it measures, interleaved ``--reps`` times so that drift in machine load hits all alike (medians
reported):

* ``raw``: one ``nle`` env stepped in this process with random actions (same observation keys the pool asks nle
  for; auto-reset by hand) -- the single-process baseline;
* ``raw_fast``: the same through :class:`envs.nle_worker.FastStep` (NLE's step without the gym layer, as the
  pool's workers step) -- separates that gain from the pool's parallelism;
* ``raw_vec``: all ``--num-envs`` nle envs stepped round-robin in this process through gym's ``step`` -- what a
  single-process vector env (gymnasium's ``SyncVectorEnv``) does with the pool's batch: the pool's parallel
  speed-up at equal batch size;
* ``raw_rr``: as many nle envs as one pool worker holds (``num_envs / num_workers``), stepped round-robin in
  this process through FastStep -- separates the cost of many NetHack instances per core (their game data evict
  each other from the caches; sharing one copy of the game's code made no difference) from the pool's own
  overhead;
* ``pool``: :class:`envs.nethack.NLEPool` (``--num-envs`` envs over ``--num-workers`` processes) with random
  actions, observations copied out each step as the trainer gets them; with ``--env-groups 2`` the two groups
  are pipelined (``send``/``recv``), as the PPO loop runs them;
* ``pool_socket``: the same pool with ``spin=0`` (every wake-up through the socket, as on CPUs other than
  x86-64): what polling the shared-memory counters saves;
* ``c_step_us`` / ``python_step_us`` / ``reset_us``: the ``raw_rr`` run again, timing NetHack's C step, the
  Python around it and the resets apart: they give the C-only ceiling (what ``num_workers`` processes could step
  with no Python at all) and the bound resets put on ppo/pool (a policy that ends episodes sooner pays more
  resets; the bound assumes a free learner and policy);
* ``ppo``: PPO's host-loop trainer with the pool defaults of ``experiments.ppo`` (:func:`agents.ppo.host_config`)
  (``--num-envs``; policy act per step + PPO update per rollout), compile excluded (one warm-up update).

Printed: steps/s of each and the ratios pool/raw and pool/raw_vec (target >= 1.6 on 2 cores: against one env,
and against a single process stepping the same batch), and ppo/pool (target >= 0.5); and steps per CPU-second of
raw and of the pool (host + workers), which separates the pool's own overhead from the effect of other load on the
machine (wall-clock ratios on a shared machine mostly measure the scheduler).

``--host-envs K`` has the training process step ``K`` envs of each group itself (``NLEPool(host_envs=K)``, one
worker process fewer), pool and PPO alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Optional

import numpy as np

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

import jax  # noqa: E402

from envs import nle_worker  # noqa: E402
from agents import ppo, ppo_host  # noqa: E402
from envs.nethack import PoolConfig  # noqa: E402


def _cpu_seconds(pids) -> float:
    """CPU time (user + system) used so far by the processes ``pids`` (Linux /proc)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


class _TimedGame:
    """Stands in for an nle env's ``nethack._pynethack`` (the C game) and adds the time spent in its ``step`` to
    ``clock[0]``: separates NetHack's own C step from the Python around it."""

    def __init__(self, game, clock: list):
        self._game, self._clock = game, clock

    def step(self, action):
        t = time.perf_counter()
        self._game.step(action)
        self._clock[0] += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self._game, name)


def raw_rate(task: str, seconds: float, seed: int = 0, num_envs: int = 1, fast: bool = False,
             split: Optional[dict] = None) -> tuple[float, float]:
    """(steps per second, steps per CPU-second) of ``num_envs`` nle envs stepped round-robin in this process
    through gym's ``step`` (``fast``: through the workers' :class:`envs.nle_worker.FastStep`, ending episodes as
    they do, without NLE's quit sequence). ``split``: filled with the seconds spent in NetHack's C step
    (``c_step``) and in resets (``reset``), and the number of ``steps`` and ``resets``."""
    envs_ = [nle_worker.make_env(task, {"fix_moon_phase": True}, ("glyphs_crop", "blstats", "message"))
             for _ in range(num_envs)]
    c_clock = [0.0]
    if split is not None:
        for e in envs_:
            e.unwrapped.nethack._pynethack = _TimedGame(e.unwrapped.nethack._pynethack, c_clock)
    steppers = [nle_worker.FastStep(e, quit=False).step if fast and nle_worker.FastStep.supports(e) else e.step
                for e in envs_]
    rng = np.random.default_rng(seed)
    n_act = envs_[0].action_space.n
    episode = [0] * num_envs
    for i, env in enumerate(envs_):
        env.unwrapped.seed(*nle_worker.episode_seeds(seed, i, 0), reseed=False)
        env.reset()
    steps, resets, reset_s, t0, c0 = 0, 0, 0.0, time.perf_counter(), time.process_time()
    c_clock[0] = 0.0
    while time.perf_counter() - t0 < seconds:
        for row in rng.integers(n_act, size=(max(256 // num_envs, 1), num_envs)).tolist():
            for i, (env, step, a) in enumerate(zip(envs_, steppers, row)):
                _, _, done, trunc, _ = step(a)
                steps += 1
                if done or trunc:
                    episode[i] += 1
                    r0, c_before = time.perf_counter(), c_clock[0]
                    env.unwrapped.seed(*nle_worker.episode_seeds(seed, i, episode[i]), reseed=False)
                    env.reset()
                    reset_s += time.perf_counter() - r0
                    c_clock[0] = c_before  # steps NLE's reset takes count as reset time
                    resets += 1
    rate, cpu = steps / (time.perf_counter() - t0), time.process_time() - c0
    for env in envs_:
        env.close()
    if split is not None:
        split.update(c_step=c_clock[0], reset=reset_s, steps=steps, resets=resets, cpu=cpu)
    return rate, steps / cpu


def pool_rate(pool, seconds: float, seed: int = 0) -> tuple[float, float, float]:
    """(steps per second, steps per CPU-second of the host and the workers together, steps per episode)."""
    rng = np.random.default_rng(seed)
    pool.reset()
    G, B = pool.num_groups, pool.group_size
    steps, episodes, t0 = 0, 0, time.perf_counter()
    c0 = time.process_time() + _cpu_seconds(pool.worker_pids)
    for g in range(G):  # groups pipelined as the PPO loop runs them: one steps while the other is read
        pool.send(rng.integers(pool.num_actions, size=B), g)
    while time.perf_counter() - t0 < seconds:
        for g in range(G):
            info = pool.recv(g)[4]
            pool.send(rng.integers(pool.num_actions, size=B), g)
            steps += B
            episodes += int(info["episode_done"].sum())
    for g in range(G):
        pool.recv(g)
    cpu = time.process_time() + _cpu_seconds(pool.worker_pids) - c0
    return steps / (time.perf_counter() - t0), steps / cpu, steps / max(episodes, 1)


class PPORun:
    def __init__(self, cfg, pool, pool_cfg):
        self.cfg, self.trainer = cfg, ppo_host.pool_trainer(cfg, pool, pool_cfg)
        self.state = self.trainer.init(jax.random.PRNGKey(0))
        self.state, _ = self.trainer.run(self.state, None, 1)  # compiles act and learn
        jax.block_until_ready(self.state)

    def rate(self, seconds: float) -> tuple[float, float]:
        """(env steps per second, steps per episode: a policy that ends episodes sooner pays more resets)."""
        per = self.cfg.num_steps * self.cfg.num_envs
        steps, episodes, t0 = 0, 0.0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self.state, m = self.trainer.run(self.state, None, 1)
            jax.block_until_ready(self.state)
            steps += per
            episodes += float(np.nansum(m.get("episodes", 0.0)))
        return steps / (time.perf_counter() - t0), steps / max(episodes, 1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["NetHackScore-v0", "MiniHack-Corridor-R3-v0", "MiniHack-Room-5x5-v0"])
    p.add_argument("--num-envs", type=int, default=ppo.HOST_DEFAULTS["num_envs"])
    p.add_argument("--num-workers", type=int, default=0, help="0: one per CPU core")
    p.add_argument("--num-steps", type=int, default=ppo.HOST_DEFAULTS["num_steps"])
    p.add_argument("--overlap", action="store_true", help="PPO with collection/learning overlap")
    p.add_argument("--env-groups", type=int, default=PoolConfig.env_groups,
                   help="env groups (pipelined: one steps while the host works on the other), pool and PPO alike")
    p.add_argument("--host-envs", type=int, default=PoolConfig.host_envs,
                   help="envs per group the training process steps itself (NLEPool host_envs; -1: auto, as in "
                        "experiments.ppo), pool and PPO alike")
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}; num_envs={a.num_envs}, "
          f"env_groups={a.env_groups}, host_envs={a.host_envs}, overlap={a.overlap}, "
          f"num_workers={a.num_workers or 'cores'}, {a.reps} reps x {a.seconds:.0f} s each, medians")
    results = {}
    for task in a.tasks:
        cfg = ppo.host_config(env_name=task, num_envs=a.num_envs, num_steps=a.num_steps,
                              total_timesteps=a.num_envs * a.num_steps * 10_000)
        pool_cfg = PoolConfig(num_workers=a.num_workers, overlap=a.overlap, env_groups=a.env_groups,
                              host_envs=a.host_envs)
        pool = pool_cfg.make_pool(task, a.num_envs, seed=0)
        socket_pool = None
        try:
            socket_pool = pool_cfg.make_pool(task, a.num_envs, seed=0, spin=0.0) if pool.spin > 0 else None
            ppo_run = PPORun(cfg, pool, pool_cfg)
            procs = pool.num_workers + (pool.host_envs > 0)  # the host steps envs too with --host-envs
            per_worker = -(-a.num_envs // procs)  # envs per process, all groups
            rates = {"raw": [], "pool": [], "ppo": [], "raw_per_cpu_s": [], "pool_per_cpu_s": [],
                     "raw_fast": [], "raw_fast_per_cpu_s": [],
                     "raw_rr": [], "raw_rr_per_cpu_s": [], "pool_episode_len": [], "ppo_episode_len": [],
                     "raw_vec": [], "raw_vec_per_cpu_s": [], "pool_socket": [], "pool_socket_per_cpu_s": [],
                     "pool_socket_episode_len": [], "c_step_us": [], "python_step_us": [], "reset_us": []}
            for _ in range(a.reps):
                for k, fn in (("raw", lambda: raw_rate(task, a.seconds)),
                              ("raw_fast", lambda: raw_rate(task, a.seconds, fast=True)),
                              ("raw_rr", lambda: raw_rate(task, a.seconds, num_envs=per_worker, fast=True)),
                              ("raw_vec", lambda: raw_rate(task, a.seconds, num_envs=a.num_envs)),
                              ("pool", lambda: pool_rate(pool, a.seconds)),
                              ("pool_socket", lambda: pool_rate(socket_pool, a.seconds) if socket_pool else
                               (float("nan"),) * 3)):
                    rate, per_cpu, *ep_len = fn()
                    rates[k].append(rate)
                    rates[k + "_per_cpu_s"].append(per_cpu)
                    if ep_len:
                        rates[k + "_episode_len"].append(ep_len[0])
                split = {}
                raw_rate(task, a.seconds, num_envs=per_worker, fast=True, split=split)
                rates["c_step_us"].append(split["c_step"] / split["steps"] * 1e6)
                rates["python_step_us"].append((split["cpu"] - split["c_step"] - split["reset"]) / split["steps"] * 1e6)
                rates["reset_us"].append(split["reset"] / max(split["resets"], 1) * 1e6)
                ppo_run.trainer._obs = None  # the pool was reset by the random-action run
                rate, ep_len = ppo_run.rate(a.seconds)
                rates["ppo"].append(rate)
                rates["ppo_episode_len"].append(ep_len)
        finally:
            pool.close()
            if socket_pool is not None:
                socket_pool.close()
        med = {k: statistics.median(v) for k, v in rates.items()}
        plain = ("_us", "_episode_len", "_per_cpu_s")  # medians that are not steps per second
        r = {**{k if k.endswith(plain) else f"{k}_steps_per_s": v for k, v in med.items()},
             "pool_over_raw": med["pool"] / med["raw"], "ppo_over_pool": med["ppo"] / med["pool"],
             "workers": pool.num_workers, "host_envs": pool.host_envs, "all": rates}
        results[task] = r
        r["pool_over_raw_vec"] = med["pool"] / med["raw_vec"]
        print(f"{task:24s} ({pool.num_workers} worker processes, {pool.host_envs} envs per group in the host)")
        print(f"{'':24s} raw {med['raw']:8.0f}/s   pool {med['pool']:8.0f}/s   ppo {med['ppo']:8.0f}/s   "
              f"pool/raw {r['pool_over_raw']:.2f} (target 1.6)   ppo/pool {r['ppo_over_pool']:.2f} (target 0.5)")
        fast = med["raw_fast_per_cpu_s"] / med["raw_per_cpu_s"]
        r["raw_fast_over_raw_per_cpu_s"] = fast
        print(f"{'':24s} {a.num_envs} envs round-robin in one process through gym's step (a single-process vector "
              f"env, the pool's batch): {med['raw_vec']:.0f}/s; pool / that: {r['pool_over_raw_vec']:.2f} (target "
              f"1.6); socket-only pool (spin=0): {med['pool_socket']:.0f}/s, pool / that: "
              f"{med['pool'] / med['pool_socket']:.2f}")
        print(f"{'':24s} one env through FastStep (as the workers step): {med['raw_fast']:.0f}/s, "
              f"{fast:.2f}x gym's step per CPU-second; pool / that: {med['pool'] / med['raw_fast']:.2f}")
        eff = med["pool_per_cpu_s"] / med["raw_per_cpu_s"]
        r["pool_over_raw_per_cpu_s"] = eff
        rr = med["raw_rr_per_cpu_s"] / med["raw_fast_per_cpu_s"]  # both through FastStep, as the workers step
        r["raw_rr_over_raw_fast_per_cpu_s"], r["envs_per_worker"] = rr, per_worker
        print(f"{'':24s} {per_worker} envs stepped round-robin in one process through FastStep (as each worker "
              f"does): {med['raw_rr_per_cpu_s']:.0f} steps per CPU-second = {rr:.2f}x one env (cache/TLB cost of "
              f"many NetHack instances per process); pool vs that: "
              f"{med['pool_per_cpu_s'] / med['raw_rr_per_cpu_s']:.2f}x")
        print(f"{'':24s} steps per episode: random actions {med['pool_episode_len']:.0f}, PPO "
              f"{med['ppo_episode_len']:.0f} (each episode costs a reset: a policy that ends them sooner steps "
              f"slower)")
        print(f"{'':24s} steps per CPU-second: raw {med['raw_per_cpu_s']:.0f}, pool {med['pool_per_cpu_s']:.0f} "
              f"(host + workers, polling included) = {eff:.2f}x raw; with {procs} idle cores it "
              f"could reach ~{eff * procs:.1f}x raw")
        # what bounds the targets here: NetHack's own C step (no Python at all), and the resets a policy pays
        c_us, reset_us = med["c_step_us"], med["reset_us"]
        random_reset_us = reset_us / med["pool_episode_len"]  # resets' share of a step at random play
        ceiling = procs / ((c_us + random_reset_us) * 1e-6)
        r["c_only_ceiling_over_raw"] = ceiling / med["raw"]
        fast_ceiling = procs / ((c_us + med["python_step_us"] + random_reset_us) * 1e-6)
        r["fast_step_ceiling_over_raw"] = fast_ceiling / med["raw"]
        pool_cpu_us = 1e6 / med["pool_per_cpu_s"]  # all the pool's CPU per step, resets at random play included
        per_step_us = pool_cpu_us - random_reset_us
        bound = pool_cpu_us / (per_step_us + reset_us / med["ppo_episode_len"])
        r["ppo_over_pool_reset_bound"] = bound
        print(f"{'':24s} NetHack's C step with {per_worker} games per process: {c_us:.1f} us (+ "
              f"{med['python_step_us']:.1f} us of Python in FastStep); with no Python at all {procs} processes "
              f"could step at most {ceiling:.0f}/s = {ceiling / med['raw']:.2f}x raw; with FastStep's Python and no "
              f"other cost (no pool) {fast_ceiling:.0f}/s = {fast_ceiling / med['raw']:.2f}x raw")
        print(f"{'':24s} resets: {reset_us:.0f} us each; at PPO's {med['ppo_episode_len']:.0f} steps per episode "
              f"(random play {med['pool_episode_len']:.0f}) ppo/pool could reach at most {bound:.2f} even with a "
              f"free learner and policy (the pool's CPU per step, {pool_cpu_us:.0f} us, with PPO's reset rate)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
