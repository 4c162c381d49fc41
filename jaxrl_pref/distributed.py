"""Device-mesh helpers for data-parallel training (``shard_map`` over a 1-D ``data`` axis)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

DATA_AXIS = "data"
SPLIT = P(DATA_AXIS)   # leading axis split across devices
REPLICATED = P()        # same value on every device


def data_mesh(num_devices: int) -> Mesh:
    devices = jax.devices()
    if num_devices > len(devices):
        from jaxrl_pref.config import ConfigError
        raise ConfigError("num_devices", f"asked for {num_devices} devices but JAX sees {len(devices)} "
                          f"({devices[0].platform})",
                          "lower --num-devices, or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                          "before starting Python")
    return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def _spec(s):
    return REPLICATED if s is None else s


def shard(fn, mesh: Mesh, in_specs, out_specs):
    """``shard_map`` with ``None`` meaning replicated, for pytree-prefix specs."""
    is_leaf = lambda x: x is None or isinstance(x, P)
    ins = jax.tree.map(_spec, in_specs, is_leaf=is_leaf)
    outs = jax.tree.map(_spec, out_specs, is_leaf=is_leaf)
    return jax.shard_map(fn, mesh=mesh, in_specs=ins, out_specs=outs)
