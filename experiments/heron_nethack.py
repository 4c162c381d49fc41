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
from typing import Optional, Sequence

from experiments import ppo_nethack as pn  # first: sets synchronous CPU dispatch before JAX starts

from jaxrl_pref.rewards.factors import MINIHACK  # noqa: E402
from jaxrl_pref.rewards.preference import PreferenceConfig, PreferenceReward  # noqa: E402


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
    rm = opts.preference_config()
    return pn.run_main(opts, agent="heron_nethack", module="experiments.heron_nethack",
                       trainer_kwargs={"reward": PreferenceReward(rm, MINIHACK)},
                       run_info={"heron": dataclasses.asdict(rm)})


if __name__ == "__main__":
    raise SystemExit(main())
