"""HERON on NetHack/MiniHack, kept as an alias: ``python -m experiments.heron_nethack`` is
``python -m experiments.heron`` with ``--env MiniHack-Room-5x5-v0`` by default."""
from __future__ import annotations

import dataclasses

from experiments import heron as _heron  # first: sets up JAX before anything imports it
from jaxrl_pref import cli

SPEC = dataclasses.replace(_heron.SPEC, name="heron_nethack", module="experiments.heron_nethack", doc=__doc__,
                           default_env="MiniHack-Room-5x5-v0")


parse, main = cli.entry_points(SPEC)

if __name__ == "__main__":
    raise SystemExit(main())
