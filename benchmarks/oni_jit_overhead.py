"""ONI's overhead in the jitted loop on a captioned JAX task: env-steps/s of PPO vs ONI-retrieval, -classification
and -ranking on the same task, seeds vmapped, measured side by side in one process.

    python -m benchmarks.oni_jit_overhead --env MiniGrid-DoorKey-8x8 --num-seeds 4

Each method runs what ``python -m experiments.oni`` runs on a captioned env (:mod:`agents.oni_captioned`): PPO's
compiled chunk of ``label_sync_every`` updates (``jit(vmap(trainer.run))``, the state donated, compiled ahead of
time as the runner compiles it), then the chunk hook (counts to the host, new captions / pairs to the annotator,
answers into the device state). The annotator is a real service process with the **scripted** backend (instant
keyword labels, no model: the pipeline -- service, label store, client, hook -- is measured, not a language model's
speed), one client per ONI method. Methods run in alternating rounds, their order rotated each round (after an
untimed warm-up that compiles and lets the first answers arrive), so load changes on a shared machine hit them
alike. Reported: env-steps/s of each over all its rounds, and the median per-round ratio to PPO. Target: ONI >= 85%
of PPO.

The guards against reward hacking (docs/guards.md) are methods too: ``<model>+ens<K>`` (an ensemble of K, e.g.
``classification+ens5``) and ``<model>+rpo`` (RPO's penalty, coefficient 0.5), each also compared with its single
model (the ``vs the single model`` column; target for K = 5: >= 85%)::

    python -m benchmarks.oni_jit_overhead --env KeyDoorLever-9 --methods ppo classification classification+ens5 \
        classification+rpo ranking ranking+ens5
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from agents import oni, oni_captioned, ppo  # noqa: E402
from envs import captions  # noqa: E402
from jaxrl_pref.annotation.backends import task_for_env  # noqa: E402
from jaxrl_pref.annotation.client import AnnotatorClient, start_server, stop_server  # noqa: E402
from jaxrl_pref.config import cli  # noqa: E402
from jaxrl_pref.runner import seed_keys  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Bench:
    env_name: str = "MiniGrid-DoorKey-8x8"
    num_envs: int = 16
    num_steps: int = 128
    num_seeds: int = 4
    """Seeds vmapped in one program (as --num-seeds)."""
    label_sync_every: int = 10
    """Updates per compiled chunk; the hook runs after each (as --label-sync-every)."""
    chunks: int = 1
    """Chunks per method per round."""
    rounds: int = 12
    methods: tuple[str, ...] = ("ppo", "retrieval", "classification", "ranking")


def guarded_options(name: str) -> oni.ONIOptions:
    """``classification`` / ``classification+ens5`` / ``ranking+rpo`` -> ONI's options for that model and guard."""
    model, _, guard = name.partition("+")
    if guard.startswith("ens"):
        return oni.ONIOptions(reward_model=model, rm_ensemble=int(guard[3:]))
    if guard == "rpo":
        return oni.ONIOptions(reward_model=model, rpo_coef=0.5)
    if guard:
        raise SystemExit(f"error: methods: unknown guard {guard!r} in {name!r} (use +ens<K> or +rpo)")
    return oni.ONIOptions(reward_model=model)


class _Method:
    def __init__(self, name: str, cfg: ppo.Config, bench: Bench, url: str):
        self.name, self.bench = name, bench
        self.client, self.hook, reward = None, None, None
        if name != "ppo":
            table = captions.caption_table(cfg.env_name)
            o = guarded_options(name)
            self.client = AnnotatorClient(url, task_for_env(cfg.env_name))
            self.hook = oni_captioned.CaptionLoop(o, table, self.client, every=bench.label_sync_every)
            reward = oni_captioned.make_reward(o, table)
        self.trainer = ppo.make_trainer(cfg, reward, chunk_hook=self.hook)
        n = bench.label_sync_every
        self.state = jax.jit(jax.vmap(self.trainer.init))(seed_keys(0, bench.num_seeds))
        # compiled ahead of time, as the runner compiles its chunks: a state the hook changed in structure, shape
        # or placement would be refused here, not silently recompiled
        self.run = jax.jit(jax.vmap(lambda s: self.trainer.run(s, None, n)), donate_argnums=0).lower(
            self.state).compile()
        self.done, self.times, self.metrics = 0, [], {}

    def chunk(self) -> float:
        """One compiled chunk and the hook after it, as the runner runs them; returns the seconds taken."""
        t = time.perf_counter()
        self.state, m = self.run(self.state)
        jax.block_until_ready(self.state)
        self.done += self.bench.label_sync_every
        if self.hook is not None:
            self.state = self.hook(self.state, self.done, seed_axis=True)
        dt = time.perf_counter() - t
        self.metrics = {k: np.asarray(v)[:, -1].mean() for k, v in m.items()}
        return dt

    def close(self):
        if self.client is not None:
            self.client.close()


def main(argv=None) -> int:
    b = cli(Bench, argv, description=__doc__.split("\n\n")[0], aliases={"--env": "env_name"})
    cfg = ppo.Config(env_name=b.env_name, num_envs=b.num_envs, num_steps=b.num_steps,
                     total_timesteps=b.num_envs * b.num_steps)
    tmp = tempfile.mkdtemp(prefix="oni_jit_bench_")
    proc, url = start_server(f"{tmp}/labels.db", "scripted", log_path=f"{tmp}/annotator.log")
    methods = []
    try:
        for name in b.methods:
            t = time.perf_counter()
            m = _Method(name, cfg, b, url)
            m.chunk()  # compile
            methods.append(m)
            print(f"{name}: compiled + first chunk in {time.perf_counter() - t:.1f} s", flush=True)
        time.sleep(1.5)  # the first answers arrive (the client polls every 0.5 s)
        for _ in range(2):
            for m in methods:
                m.chunk()  # untimed: loads the first answers (the classifier / ranking model start training)
        steps = b.label_sync_every * b.num_envs * b.num_steps * b.num_seeds * b.chunks
        for r in range(b.rounds):
            line = []
            for m in methods[r % len(methods):] + methods[:r % len(methods)]:  # rotated: no method always first
                m.times.append(sum(m.chunk() for _ in range(b.chunks)))
                line.append(f"{m.name} {steps / m.times[-1]:,.0f}")
            print(f"round {r}: " + ", ".join(line) + " env-steps/s", flush=True)
    finally:
        for m in methods:
            m.close()
        stop_server(proc)
    base = methods[0]
    print(f"\n{b.env_name}: {b.num_seeds} seeds vmapped x {b.num_envs} envs x {b.num_steps} steps, chunks of "
          f"{b.label_sync_every} updates + the hook; {b.rounds} rounds x {b.chunks} chunk(s) per method; annotator: "
          "scripted backend service")
    print("| method | env-steps/s | vs PPO (all rounds) | median per-round ratio | vs the single model (median "
          "per-round) | labels / pairs at the end |")
    print("|---|---|---|---|---|---|")
    by_name = {m.name: m for m in methods}
    for m in methods:
        sps = steps * len(m.times) / sum(m.times)
        ratio = sum(base.times) / sum(m.times)
        paired = statistics.median(a / t for a, t in zip(base.times, m.times))
        single = by_name.get(m.name.partition("+")[0]) if "+" in m.name else None
        vs_single = "" if single is None else \
            f"{statistics.median(a / t for a, t in zip(single.times, m.times)):.1%}"
        lab = m.metrics.get("labels/pairs", m.metrics.get("labels/labeled", float("nan")))
        print(f"| {'PPO' if m.name == 'ppo' else 'ONI-' + m.name} | {sps:,.0f} | {ratio:.1%} | {paired:.1%} | "
              f"{vs_single} | {'' if m.name == 'ppo' else f'{lab:.0f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
