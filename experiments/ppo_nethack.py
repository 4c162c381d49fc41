"""PPO on NetHack/MiniHack, kept as an alias: ``python -m experiments.ppo_nethack`` is ``python -m experiments.ppo``
with ``--env NetHackScore-v0`` by default and NetHack/MiniHack envs only (``experiments.ppo`` takes any env)."""
from __future__ import annotations

import dataclasses

from experiments import ppo as _ppo  # first: sets up JAX before anything imports it
from experiments import launch
from jaxrl_pref import cli
from jaxrl_pref.config import require


def _check(opts) -> None:
    require(opts.host, "env_name", f"{opts.env_name!r} is not a NetHack/MiniHack task",
            "pass --env NetHackScore-v0 (or another NetHack*-v0 / MiniHack-* task); JAX envs train with "
            "python -m experiments.ppo")
    launch.check_ppo(opts)


SPEC = dataclasses.replace(_ppo.SPEC, name="ppo_nethack", module="experiments.ppo_nethack", doc=__doc__,
                           default_env="NetHackScore-v0", check=_check)


parse, main = cli.entry_points(SPEC)

if __name__ == "__main__":
    raise SystemExit(main())
