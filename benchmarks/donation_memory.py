"""Peak memory with and without buffer donation (issue 23 item 4), each case in a fresh process.

    python -m benchmarks.donation_memory                 # every case, donated vs not
    python -m benchmarks.donation_memory --case sqirl_host --json out.json

Cases (what is donated):
* ``ppo_chunk``: the runner's chunk call (``jax.jit(run, donate_argnums=0)``) on PPO with a large MLP
  (hidden 2048 x 2048: parameters + Adam moments ~ 100 MB), 3 chunks.
* ``ppo_host``: PPO's host-loop ``learn`` (learner state donated unless ``--overlap``) on the same network through
  :class:`envs.host.JaxHostEnv`, 3 updates.
* ``sqirl_host``: SQIRL's host-loop ``learn`` (replay buffer and stacked policies donated) on DeepSea-20 with 256
  episodes per timestep (buffer ~ 170 MB), 3 timesteps.

"Not donated" runs the same code with ``donate_argnums`` dropped from every ``jax.jit`` (patched before the
project is imported). Reported: the process's peak resident memory (``ru_maxrss``) after the calls, and the state's
size. On CPU the device memory is the process's memory, so the difference is the copy donation avoids; on a GPU
the same copy would sit in device memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("ppo_chunk", "ppo_host", "sqirl_host")


def _child(case: str, donate: bool) -> dict:
    import resource

    import jax
    if not donate:
        real_jit = jax.jit

        def jit(fun=None, **kw):
            kw.pop("donate_argnums", None)
            kw.pop("donate_argnames", None)
            return real_jit(fun, **kw) if fun is not None else (lambda f: real_jit(f, **kw))
        jax.jit = jit
    from jaxrl_pref.runner import use_sync_cpu_dispatch
    use_sync_cpu_dispatch()
    import numpy as np

    from agents import ppo, ppo_host, sqirl
    from envs.host import JaxHostEnv

    def nbytes(tree):
        return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))

    big = dict(env_name="CartPole-v1", num_envs=4, num_steps=8, total_timesteps=4 * 8 * 3, hidden=(2048, 2048),
               update_epochs=1, num_minibatches=1)
    if case == "ppo_chunk":
        tr = ppo.make_trainer(ppo.Config(**big))
        state = jax.jit(tr.init)(jax.random.PRNGKey(0))
        size = nbytes(state)
        run = jax.jit(lambda s: tr.run(s, None, 1), **({"donate_argnums": 0} if donate else {}))
        for _ in range(3):
            state, _ = run(state)
            jax.block_until_ready(state)
    elif case == "ppo_host":
        import flax.linen as nn

        from jaxrl_pref.networks import MLP, EncoderActorCritic

        class DictMLP(nn.Module):  # JaxHostEnv's observations are {"obs": ...}
            @nn.compact
            def __call__(self, obs):
                return MLP(big["hidden"], "tanh")(obs["obs"])
        cfg = ppo.Config(**big)
        tr = ppo_host.make_trainer(cfg, JaxHostEnv("CartPole-v1", cfg.num_envs, seed=0),
                                   network=EncoderActorCritic(2, DictMLP()))
        state = tr.init(jax.random.PRNGKey(0))
        size = nbytes(state)
        state, _ = tr.run(state, None, 3)
        jax.block_until_ready(state)
    else:
        cfg = sqirl.Config(env_name="DeepSea-20", episodes_per_timestep=256, buffer_timesteps=20, n_epochs=1,
                           eval_episodes=256, hidden=(64,))
        tr = sqirl.make_trainer(cfg, env=JaxHostEnv("DeepSea-20", 256, seed=0), horizon=20)
        state = tr.init(jax.random.PRNGKey(0))
        size = nbytes(state)
        state, _ = tr.run(state, None, 3)
        jax.block_until_ready(state)
    return {"case": case, "donate": donate, "state_mb": size / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=CASES, action="append")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child[0], a.child[1] == "1")))
        return
    rows = []
    for case in a.case or CASES:
        out = {}
        for donate in (True, False):
            p = subprocess.run([sys.executable, "-m", "benchmarks.donation_memory", "--child", case, str(int(donate))],
                               cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            if p.returncode != 0:
                raise SystemExit(f"{case} (donate={donate}) failed:\n{p.stderr[-3000:]}")
            out[donate] = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(out[donate])
        saved = out[False]["peak_rss_mb"] - out[True]["peak_rss_mb"]
        print(f"{case:>10}: state {out[True]['state_mb']:7.1f} MB | peak RSS donated {out[True]['peak_rss_mb']:7.1f} MB,"
              f" not donated {out[False]['peak_rss_mb']:7.1f} MB (saves {saved:6.1f} MB)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
