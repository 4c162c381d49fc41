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


# -- multi-process (multi-host) ------------------------------------------------------------------------------------
#
# One process per host (TPU VM worker, GPU node or Slurm task), all running the same program. After
# ``initialize`` every process sees the global device list (``jax.devices()``); ``data_mesh`` spans it, so the
# trainers' ``shard_map`` splits envs over the devices of all processes (each process steps the envs of its own
# devices: its env shard) and ``lax.pmean`` averages gradients across processes, leaving identical parameters on
# every host after each update. Inputs given by the host (PRNG key, hyperparameters) must be the same on every
# process; outputs with a replicated spec (parameters, metrics) can be read on any process.

import dataclasses as _dc
import os as _os
import re as _re
from typing import Mapping as _Mapping, Optional as _Optional, Sequence as _Sequence

DEFAULT_PORT = 12_321


@_dc.dataclass(frozen=True)
class ClusterSpec:
    coordinator: str     # host:port of process 0
    num_processes: int
    process_id: int
    source: str          # "args", "slurm" or "jax" (JAX's own detection: TPU pods, GKE, MPI)


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm node list: ``gpu[003-010,12],cpu1 -> gpu003``, ``node1,node2 -> node1``."""
    m = _re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, _, ranges = m.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_cluster(environ: _Optional[_Mapping[str, str]] = None, port: _Optional[int] = None
                  ) -> _Optional[ClusterSpec]:
    """The cluster of a Slurm job step (``srun``: one task per process), or None outside one.

    Process count/id come from ``SLURM_NTASKS``/``SLURM_PROCID``; the coordinator is the first node of the step
    (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``) on ``port`` (default: ``JAXRL_COORDINATOR_PORT``, else
    12321 + job id mod 1000, so concurrent jobs sharing a node do not collide)."""
    env = _os.environ if environ is None else environ
    if "SLURM_PROCID" not in env or not (env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")):
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodes:
        return None
    if port is None:
        port = int(env.get("JAXRL_COORDINATOR_PORT") or DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 1000)
    n = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    return ClusterSpec(f"{first_host(nodes)}:{port}", n, int(env["SLURM_PROCID"]), "slurm")


def resolve_cluster(coordinator: _Optional[str] = None, num_processes: _Optional[int] = None,
                    process_id: _Optional[int] = None, environ: _Optional[_Mapping[str, str]] = None
                    ) -> _Optional[ClusterSpec]:
    """Explicit settings win field by field; missing ones come from Slurm. None when nothing is given and there
    is no Slurm step: then JAX's own detection applies (TPU VM pods, GKE, Open MPI). Raises ConfigError naming
    the field when only some settings are known."""
    from jaxrl_pref.config import ConfigError
    auto = slurm_cluster(environ)
    if auto is None and coordinator is None and num_processes is None and process_id is None:
        return None
    coordinator = coordinator or (auto.coordinator if auto else None)
    num_processes = num_processes if num_processes is not None else (auto.num_processes if auto else None)
    process_id = process_id if process_id is not None else (auto.process_id if auto else None)
    for name, v, ex in (("coordinator", coordinator, "--coordinator 10.0.0.1:12321"),
                        ("num_processes", num_processes, "--num-processes 2"),
                        ("process_id", process_id, "--process-id 0")):
        if v is None:
            raise ConfigError(name, "is not given and not found in the environment (no Slurm job step)",
                              f"run under `srun` (one task per process), or pass {ex} to every process")
    if ":" not in coordinator:
        raise ConfigError("coordinator", f"{coordinator!r} has no port", f"pass host:port, e.g. {coordinator}:{DEFAULT_PORT}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError("process_id", f"must lie in [0, num_processes={num_processes}), got {process_id}",
                          "give each process a distinct id 0..num_processes-1")
    given = (coordinator, num_processes, process_id) != ((auto.coordinator, auto.num_processes, auto.process_id)
                                                          if auto else (None, None, None))
    return ClusterSpec(coordinator, int(num_processes), int(process_id), "args" if given or not auto else "slurm")


def initialize(coordinator: _Optional[str] = None, num_processes: _Optional[int] = None,
               process_id: _Optional[int] = None, cpu_collectives: str = "gloo",
               timeout_s: int = 300) -> ClusterSpec:
    """``jax.distributed.initialize`` for this process (see :func:`resolve_cluster`); call it first thing, before
    any JAX computation. On CPU, cross-process collectives go through ``cpu_collectives`` (gloo over TCP).
    Idempotent: a second call returns the cluster already joined."""
    global _CLUSTER
    if _CLUSTER is not None:
        return _CLUSTER
    spec = resolve_cluster(coordinator, num_processes, process_id)
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if spec is None:  # no Slurm step and no settings: let JAX detect the cluster (TPU VM pod slice, GKE, MPI)
        try:
            jax.distributed.initialize(initialization_timeout=timeout_s)
        except (ValueError, RuntimeError) as e:
            from jaxrl_pref.config import ConfigError
            raise ConfigError("coordinator", f"no cluster found to join ({e})",
                              "run under `srun` (one task per process), on every worker of a TPU VM pod slice, or "
                              "pass --coordinator HOST:PORT --num-processes N --process-id I to every process"
                              ) from None
        spec = ClusterSpec("(detected by jax)", jax.process_count(), jax.process_index(), "jax")
    else:
        jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id,
                                   initialization_timeout=timeout_s)
    _CLUSTER = spec
    return spec


_CLUSTER: _Optional[ClusterSpec] = None


def initialize_from_argv(argv: _Sequence[str]) -> ClusterSpec:
    """:func:`initialize` with ``--coordinator``/``--num-processes``/``--process-id`` read from a CLI argv (the
    entry points call this before parsing, since parsing checks ``jax.devices()``)."""
    def opt(name):
        val = None
        for i, a in enumerate(argv):
            if a == name and i + 1 < len(argv):
                val = argv[i + 1]
            elif a.startswith(name + "="):
                val = a.split("=", 1)[1]
        return val
    from jaxrl_pref.config import ConfigError
    vals = {}
    for name in ("--num-processes", "--process-id"):
        v = opt(name)
        if v is not None:
            try:
                vals[name] = int(v)
            except ValueError:
                raise ConfigError(name[2:].replace("-", "_"), f"must be an integer, got {v!r}", f"pass e.g. {name} 0") from None
    return initialize(opt("--coordinator"), vals.get("--num-processes"), vals.get("--process-id"))


def flag_on(argv: _Sequence[str], flag: str) -> bool:
    """Whether boolean ``flag`` is set in ``argv`` (bare, ``flag True`` or ``flag=True``); the last one wins."""
    on = False
    for i, a in enumerate(argv):
        if a == flag:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            on = nxt is None or nxt.startswith("--") or nxt.lower() in ("true", "1", "yes")
        elif a.startswith(flag + "="):
            on = a.split("=", 1)[1].lower() in ("true", "1", "yes")
    return on


def initialize_if_requested(argv: _Sequence[str], flag: str = "--distributed") -> _Optional[ClusterSpec]:
    """:func:`initialize_from_argv` if ``flag`` is on in ``argv`` (and no ``--help``), else None."""
    if not flag_on(argv, flag) or any(a in ("-h", "--help") for a in argv):
        return None
    if _CLUSTER is None:
        from jax._src import xla_bridge  # private: only to turn JAX's late-call RuntimeError into a clear one
        if getattr(xla_bridge, "_backends", {}):
            from jaxrl_pref.config import ConfigError
            raise ConfigError("distributed", "JAX was already initialised in this process before joining the "
                              "cluster", "start a fresh process: python -m experiments.<name> --distributed ...")
    return initialize_from_argv(argv)


def is_main_process() -> bool:
    """True on process 0 (the one that writes logs, metric files and plots)."""
    return jax.process_index() == 0
