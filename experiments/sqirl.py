"""Train SQIRL on a sparse-reward task: ``python -m experiments.sqirl --env DeepSea-8 --planning-depth 2``.

One update is one timestep of the horizon (so ``--checkpoint-every`` counts timesteps). JAX envs train in one
compiled program per chunk (seeds vmapped); NetHack/MiniHack envs (or ``--host``) run the same agent through the
host loop, one seed per process. ``--total-timesteps`` is an env-step budget: SQIRL always trains all H timesteps
(its time-indexed greedy policy is complete only then), each on ``episodes_per_timestep`` episodes of H steps, so
the budget sets ``episodes_per_timestep = total_timesteps // H**2`` (the run prints what it chose)::

    python -m experiments.sqirl --env DeepSea-8 --total-timesteps 50000 --num-seeds 4 --run-dir runs/ds8
    python -m experiments.sqirl --resume runs/ds8             # continue (options read from runs/ds8/config.json)
    python -m experiments.sqirl --env KeyDoor-5 --host        # same env through the host-env loop (JaxHostEnv)
    python -m experiments.sqirl --env MiniHack-Room-5x5-v0 --horizon 50 --episodes-per-timestep 16  # env pool

Outputs as ``experiments.ppo``; ``learning_curve.png`` is the greedy policy's return per timestep. Logged per
timestep: ``episode_return``/``episode_success`` of the greedy time-indexed policy, ``explore/*`` of the
exploration episodes, ``loss/q_head*``, ``experience_steps`` (env steps of the episodes used so far).
"""
from __future__ import annotations

from jaxrl_pref import cli

cli.setup()  # before JAX starts

import numpy as np  # noqa: E402

from agents import sqirl  # noqa: E402
from experiments import launch  # noqa: E402


def train(opts, run_dir):
    result = launch.train_sqirl(opts, run_dir)
    m = result.metrics
    if {"episode_success", "episode_return", "experience_steps"} <= set(m) and m["episode_success"].size:
        print(f"final greedy policy: success {np.nanmean(m['episode_success'][:, -1]):.3f}, return "
              f"{np.nanmean(m['episode_return'][:, -1]):.3f} (mean over {m['episode_return'].shape[0]} seed(s)); "
              f"experience steps per seed {np.mean(m['experience_steps'][:, -1]):,.0f}")
    return result


SPEC = cli.Experiment(
    name="sqirl", module="experiments.sqirl", doc=__doc__, sections=(*launch.SQIRL_SECTIONS, launch.RUN),
    train=train, default_env="DeepSea-8", resolve=launch.resolve_sqirl, check=launch.check_sqirl, hparam_fields=sqirl.HPARAM_FIELDS,
    defaults=lambda env, host: {"log_every": 1, "checkpoint_every": 50}, unit="timestep", errors=(ImportError,))


parse, main = cli.entry_points(SPEC)

if __name__ == "__main__":
    raise SystemExit(main())
