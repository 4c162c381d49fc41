"""Train HERON on NetHack/MiniHack (host envs, Sebulba loop): PPO on a preference reward model learnt from
hierarchical comparisons of the MiniHack reward factors (``depth``, ``gold``, ``damage``, ``steps``, computed from
``blstats``; :data:`jaxrl_pref.rewards.factors.MINIHACK`)::

    python -m experiments.heron_nethack --env MiniHack-Room-5x5-v0 --factors 'depth>damage>steps' --margins 0 0 1
    python -m experiments.heron_nethack --resume runs/heron_nethack-x     # continue from the last checkpoint

The pool, network, logging, checkpoints and resume are those of :mod:`experiments.ppo_nethack`; the reward model
is the same :class:`jaxrl_pref.rewards.preference.PreferenceReward` that :mod:`experiments.heron` uses on JAX envs,
plugged into the host trainer through the reward-transform seam. Every field is a flag (``--help`` lists them).
Quote the ranking: ``>`` is a shell redirect (or write ``--factors depth damage steps``).

Exit status: 0 done; 2 bad option or unusable checkpoint; 1 training diverged; 128+signal when stopped by a signal.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Optional, Sequence

from experiments import ppo_nethack as pn  # first: sets synchronous CPU dispatch before JAX starts

from jaxrl_pref.rewards.factors import MINIHACK  # noqa: E402
from jaxrl_pref.rewards.preference import PreferenceConfig, PreferenceReward  # noqa: E402
from jaxrl_pref.runner import run_experiment, run_for_cli  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Options(pn.Options, PreferenceConfig):
    """NetHack PPO options plus HERON's reward-model settings (defaults sized for 2 CPU cores)."""
    env_name: str = "MiniHack-Room-5x5-v0"
    factors: tuple[str, ...] = ("depth", "damage", "steps")
    """Reward factors, most important first: 'a>b>c' or separate words (from depth, gold, damage, steps)."""
    margins: tuple[float, ...] = (0.0, 0.0, 1.0)
    """One margin per ranked factor (multiples of the factor's std over the buffer unless --absolute-margins)."""
    buffer_segments: int = 256
    min_segments: int = 32
    rm_batch_size: int = 16

    def validate(self) -> None:
        super().validate()  # NetHack PPO + run options
        self.validate_rm()
        self.resolve(MINIHACK)  # unknown factor names, margins length
        self.validate_rollout(self.num_steps, self.num_envs)

    def preference_config(self) -> PreferenceConfig:
        return PreferenceConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PreferenceConfig)})


def parse(argv: Optional[Sequence[str]] = None) -> Options:
    return pn.parse(argv, options=Options, sections=("heron",))


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse(argv)
    cfg = opts.agent_config()
    run_dir = opts.run_dir or opts.resume or f"runs/heron_nethack-{opts.env_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume = True if opts.resume is not None else (False if opts.no_resume else None)
    try:
        pool = pn.make_pool(cfg, opts.seed)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reward = PreferenceReward(opts.preference_config(), MINIHACK)
    try:
        status, _ = run_for_cli(
            lambda: run_experiment(pn.make_trainer, cfg, run_dir=run_dir, num_seeds=1, seed=opts.seed,
                                   log_every=opts.log_every, checkpoint_every=opts.checkpoint_every, resume=resume,
                                   progress=opts.progress, agent="heron_nethack",
                                   trainer_kwargs={"env": pool, "reward": reward},
                                   run_info={"num_workers": pool.num_workers,
                                             "heron": dataclasses.asdict(opts.preference_config())}),
            module="experiments.heron_nethack", run_dir=run_dir)
    finally:
        pool.close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
