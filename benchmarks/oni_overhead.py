"""ONI's overhead: env-steps/s of ONI (annotator service running, reward model, host hook) vs plain PPO on the
same NetHack/MiniHack pool, measured in one process, plus the embedded annotator's throughput.

    python -m benchmarks.oni_overhead --env MiniHack-KeyRoom-Fixed-S5-v0 --reward-model classification
    python -m benchmarks.oni_overhead --annotator llm          # SmolLM2 in JAX in the annotator process

PPO and ONI are timed in alternating short rounds (after untimed warm-up updates, which compile, and once the
annotator has caught up), so load changes on a shared machine hit both alike. Reported: env-steps/s of each over
all its rounds, and the median of the per-round ONI/PPO ratios (robust to load drifting between rounds). Both
trainers step the same env pool (throughput only: each sees the other's steps as a jump in its episodes). Target:
ONI >= 85% of PPO's env-steps/s.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

import jax  # noqa: E402

from agents import oni, ppo, ppo_host  # noqa: E402
from envs.nethack import PoolConfig  # noqa: E402
from jaxrl_pref.annotation.backends import Prompt, make_backend, task_for_env  # noqa: E402
from jaxrl_pref.annotation.client import AnnotatorClient, start_server, stop_server  # noqa: E402
from jaxrl_pref.config import cli  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Bench(oni.ONIOptions):
    env_name: str = "MiniHack-KeyRoom-Fixed-S5-v0"
    num_envs: int = 16
    num_steps: int = 32
    updates: int = 2
    """Timed updates per round."""
    rounds: int = 12
    labels: int = 512
    """Distinct synthetic messages for the annotator-throughput measurement."""
    annotator: str = "embedded"
    """The annotator service's backend: embedded, llm (SmolLM2 in JAX, or --llm-model), scripted, bow."""
    llm_model: str = "default"
    """llm annotator: a GGUF file, a Hugging Face directory or default."""


def _time(trainer, state, n):
    t = time.perf_counter()
    state, m = trainer.run(state, None, n)
    jax.block_until_ready(state.train_state.params)
    return state, time.perf_counter() - t, m


def main(argv=None) -> int:
    cfg = cli(Bench, argv, description=__doc__.split("\n\n")[0], aliases={"--env": "env_name"})
    ppo_cfg = ppo.host_config(env_name=cfg.env_name, num_envs=cfg.num_envs, num_steps=cfg.num_steps,
                              total_timesteps=cfg.num_envs * cfg.num_steps * cfg.updates * (cfg.rounds + 1))
    tmp = tempfile.mkdtemp(prefix="oni_bench_")
    pool = PoolConfig().make_pool(cfg.env_name, cfg.num_envs, 0)
    extra = ["--model", cfg.llm_model] if cfg.annotator == "llm" else []
    proc, url = start_server(f"{tmp}/labels.db", cfg.annotator, log_path=f"{tmp}/annotator.log", extra_args=extra,
                             timeout=300.0)
    client = AnnotatorClient(url, task_for_env(cfg.env_name))
    try:
        ppo_tr = ppo_host.pool_trainer(ppo_cfg, pool)
        reward = oni.make_reward(cfg)
        oni_tr = ppo_host.pool_trainer(ppo_cfg, pool, reward=reward, host_hook=oni.ONILoop(cfg, reward, client))
        s_ppo, s_oni = ppo_tr.init(jax.random.PRNGKey(0)), oni_tr.init(jax.random.PRNGKey(0))
        s_ppo, _, _ = _time(ppo_tr, s_ppo, 2)  # warm-up: compile
        s_oni, _, _ = _time(oni_tr, s_oni, 2)
        t0 = time.time()  # let the annotator label the first messages (and compile) before timing
        while time.time() - t0 < 120 and (client.server_metrics.get("queue_depth", 1) > 0 or client.outbox):
            time.sleep(0.5)
        s_oni, _, _ = _time(oni_tr, s_oni, 1)
        steps = cfg.updates * cfg.num_steps * cfg.num_envs
        ppo_t, oni_t = [], []
        for r in range(cfg.rounds):
            s_ppo, dt, _ = _time(ppo_tr, s_ppo, cfg.updates)
            ppo_t.append(dt)
            s_oni, dt, m = _time(oni_tr, s_oni, cfg.updates)
            oni_t.append(dt)
            print(f"round {r}: ppo {steps / ppo_t[-1]:.0f} env-steps/s, oni {steps / oni_t[-1]:.0f} env-steps/s "
                  f"(labels {m['labels/labeled'][-1]:.0f}, distinct messages {m['messages/distinct_seen'][-1]:.0f}, "
                  f"annotator queue {m.get('annotator/queue_depth', [float('nan')])[-1]:.0f})", flush=True)
        p, o = steps * len(ppo_t) / sum(ppo_t), steps * len(oni_t) / sum(oni_t)
        paired = statistics.median(a / b for a, b in zip(ppo_t, oni_t))
        server = client.server_metrics
    finally:
        client.close()
        stop_server(proc)
        pool.close()
    # annotator throughput, in this process (the same backend the service runs)
    backend = make_backend(cfg.annotator, model=cfg.llm_model)
    prompt = Prompt.load(task_for_env(cfg.env_name))
    msgs = [f"You see here {i} gold pieces and a {w}." for i, w in
            zip(range(cfg.labels), ["dagger", "scroll", "wand", "ring"] * cfg.labels)]
    backend.label(prompt, msgs[:backend.batch_size])  # compile
    msgs = msgs[backend.batch_size:]
    t = time.perf_counter()
    backend.label(prompt, msgs)
    lps = len(msgs) / (time.perf_counter() - t)
    print(f"\n{cfg.env_name}, {cfg.num_envs} envs x {cfg.num_steps} steps, reward model {cfg.reward_model}, "
          f"{cfg.rounds} rounds x {cfg.updates} updates")
    print(f"PPO: {p:.0f} env-steps/s   ONI: {o:.0f} env-steps/s   ratio ONI/PPO = {o / p:.1%}   "
          f"median per-round ratio = {paired:.1%} (target >= 85%)")
    print(f"{cfg.annotator} annotator ({backend.describe()}): {lps:.0f} labels/s (batches of {backend.batch_size}, "
          f"this process); "
          f"service during the run: {server.get('labeled_total', 0):.0f} labelled, "
          f"mean latency {server.get('latency_s_mean', 0) * 1000:.0f} ms/label")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
