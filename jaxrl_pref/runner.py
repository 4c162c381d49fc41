"""The experiment driver every agent reuses: seeds, chunked jitted training, checkpoints, exact resume, logging.

An agent provides ``make_trainer(cfg, log_fn=..., log_every=...)`` returning an object with

* ``init(key, hp) -> state`` and
* ``run(state, hp, num_updates) -> (state, metrics)`` (``metrics[k]`` has a leading ``[num_updates]`` axis),

both pure and jittable, as a :class:`jaxrl_pref.loop.ScanLoop` (e.g. :class:`agents.ppo.Trainer`) is.
:func:`run` (``run(make_trainer, cfg, RunSpec(...))``, or :func:`run_experiment` with the spec's fields as
keywords) then

1. builds one PRNG key per seed (seed ``i`` of a run uses ``PRNGKey(seed + i)``) and ``vmap``\\ s ``init``/``run``
   over seeds (``hp`` optionally batched over seeds too);
2. cuts the ``num_updates`` into chunks of ``checkpoint_every`` updates counted from update 0 (plus a shorter last
   chunk), compiles ``run`` once per chunk length, and loops over the chunks on the host;
3. after every chunk saves the state and all per-update metrics so far (atomic orbax checkpoint), rewrites
   ``metrics.csv``/``metrics.jsonl``, and checks the loss metrics for NaN (stops with a clear message, keeping the
   last good checkpoint);
4. on ``resume=True`` restores the newest intact checkpoint and continues. Because the chunking is fixed and the
   state (incl. PRNG keys and counters) is restored bit for bit, the final parameters and metrics are bitwise equal
   to those of an uninterrupted run;
5. on SIGTERM/SIGINT finishes the current chunk, saves, and returns with ``interrupted`` set (a second SIGINT
   aborts at once);
6. writes ``run_dir/{config.json, metrics.csv, metrics.jsonl, learning_curve.png, tb/, checkpoints/}``.

A jitted trainer may have a ``chunk_hook``: host work between compiled chunks (ONI on captioned JAX envs sends the
messages seen to its annotator and loads the labels that arrived into the reward state). It is a callable
``hook(state, update, seed_axis=...) -> state`` with an ``every`` attribute: the runner cuts its chunks further at
every multiple of ``every`` updates (0: at the checkpoints only; fixed from update 0 like the chunks, so resume stays
exact) and calls the hook on the state after each piece, before that state is checkpointed. ``seed_axis``: the state
has the vmapped seeds' leading axis (sequential seeds: called per seed). The hook must keep the state's structure,
shapes and shardings (the compiled chunk is reused); its time counts as training time.

Host-side trainers (:class:`jaxrl_pref.loop.HostLoop`, ``jittable = False``: envs stepped outside jit) go
through the same chunks, checkpoints, logging and resume; their ``run`` is called as plain Python (it jits its own
``act``/``learn``), one seed per process. Their checkpoints hold the learner (parameters, optimiser, keys,
counters), not the host envs' games: a resumed run continues with fresh episodes, so it is not bitwise equal to an
uninterrupted one.

Seeds and devices: ``vmap`` over seeds around a ``shard_map`` over several (forced CPU) devices deadlocks, so with
``num_devices > 1`` and ``num_seeds > 1`` the seeds are run one after another within each chunk (same results per
seed, ``num_seeds`` times the wall time). Throughput-wise, prefer one device per job and many seeds, or many
devices and one seed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_pref.checkpoint import Checkpointer, CheckpointError, has_checkpoints, move_aside
from jaxrl_pref.config import ConfigError
from jaxrl_pref.logging import Logger, plot_learning_curve, write_metrics

__all__ = ["run_experiment", "run", "RunSpec", "RunResult", "DivergenceError", "chunk_bounds", "segment_bounds",
           "seed_keys", "use_sync_cpu_dispatch"]


def use_sync_cpu_dispatch() -> bool:
    """Works around jax#25861: with asynchronous CPU dispatch, programs that call back into Python (the trainers'
    ``log_fn`` through ``jax.debug.callback``) occasionally hang for good -- seen here with vmapped seeds on a
    2-core machine. Synchronous dispatch costs nothing for one long program per chunk.

    Only takes effect before the CPU backend exists, i.e. before the first array, ``jax.devices()`` or
    ``import gymnax``/``envs``/``agents`` (gymnax creates arrays at import): entry points call it first thing.
    Returns whether it took effect."""
    from jax._src import xla_bridge  # private, only to report whether the flag can still matter
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return "cpu" not in getattr(xla_bridge, "_backends", {})

# run settings that change the numbers: a resumed run must use the same ones
IDENTITY_KEYS = ("num_seeds", "seed", "checkpoint_every", "num_updates", "hp")


class DivergenceError(RuntimeError):
    """A watched metric (the losses) became NaN; the run stopped and kept its last good checkpoint."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    state: Any                          # final state: batched over seeds (vmap), a list per seed (sequential),
                                        # or unbatched (one seed)
    metrics: dict                       # {k: np.ndarray [num_seeds, updates_done]} (update j+1 in column j)
    updates_done: int
    num_updates: int
    steps_per_update: int
    resumed_from: Optional[int] = None  # update restored from, if resumed
    interrupted: Optional[int] = None   # signal number that stopped the run early
    compile_s: float = 0.0
    train_s: float = 0.0
    paths: dict = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.updates_done >= self.num_updates

    @property
    def env_steps_per_sec(self) -> float:
        """Env steps (all seeds) per second of training in this session, compile time excluded."""
        done = self.updates_done - (self.resumed_from or 0)
        n = next(iter(self.metrics.values())).shape[0] if self.metrics else 1
        return done * self.steps_per_update * n / self.train_s if self.train_s > 0 else math.nan


def chunk_bounds(num_updates: int, checkpoint_every: int) -> list[tuple[int, int]]:
    """``[(0, c), (c, 2c), ..., (k*c, num_updates)]``: the fixed chunking that makes resume exact."""
    return [(a, min(a + checkpoint_every, num_updates)) for a in range(0, num_updates, checkpoint_every)]


def segment_bounds(num_updates: int, checkpoint_every: int, hook_every: int = 0) -> list[tuple[int, int]]:
    """The chunks of :func:`chunk_bounds` cut further at every multiple of ``hook_every`` (0: not cut): the programs
    a run with a chunk hook runs, the hook called after each. Fixed from update 0, like the chunks, so a resumed run
    cuts where an uninterrupted one does."""
    cuts = {b for _, b in chunk_bounds(num_updates, checkpoint_every)}
    if hook_every:
        cuts |= set(range(hook_every, num_updates, hook_every))
    cuts = sorted(cuts)
    return list(zip([0] + cuts[:-1], cuts))


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
    """``[num_seeds, 2]`` raw keys, ``PRNGKey(seed + i)`` for seed ``i`` (so seed i of a vmapped run starts like a
    single-seed run with ``seed + i``)."""
    return jnp.stack([jax.random.PRNGKey(seed + i) for i in range(num_seeds)])


class _LogProxy:
    """Stable callable handed to the trainer; forwards to the logger once it exists (after restore)."""

    def __init__(self):
        self.target = None

    def __call__(self, step, metrics):
        if self.target is not None:
            self.target(step, metrics)


class _GracefulStop:
    """Turns SIGTERM/SIGINT into a flag checked between chunks. A second SIGINT raises KeyboardInterrupt."""

    def __init__(self, enabled: bool, on_signal: Callable[[int], None]):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: Optional[int] = None
        self._on_signal = on_signal
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            self._on_signal(signum)

    def __enter__(self):
        if self.enabled:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def _json_safe(obj):
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (np.ndarray, jax.Array)):
            return np.asarray(o).tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")
    return json.loads(json.dumps(obj, default=default))


def _config_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return _json_safe(dataclasses.asdict(cfg))
    if isinstance(cfg, Mapping):
        return _json_safe(dict(cfg))
    raise TypeError("cfg must be a dataclass or a mapping")


def _hp_json(hp) -> Optional[dict]:
    if hp is None:
        return None
    leaves, _ = jax.tree_util.tree_flatten_with_path(hp)
    return {jax.tree_util.keystr(p): np.asarray(x).tolist() for p, x in leaves}


def _diff(saved: Mapping, now: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<unset>"), now.get(k, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            out.append(f"{prefix}{k}: {a!r} in the checkpoint, {b!r} now")
    return out


def _check_same_run(saved: Mapping, identity: Mapping, where) -> None:
    diffs = _diff({"config": saved.get("config", {}), **{k: saved.get("run", {}).get(k) for k in IDENTITY_KEYS}},
                  {"config": identity["config"], **{k: identity["run"].get(k) for k in IDENTITY_KEYS}})
    if diffs:
        raise ConfigError("resume", f"{where} was started with different settings ("
                          + "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "") + ")",
                          f"pass the options it was started with (see {Path(where) / 'config.json'}), or "
                          "--no-resume to start it over, or another --run-dir")


def _to_host(metrics: Mapping, batched: bool) -> dict:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(jax.device_get(v))
        out[k] = a if batched else a[None]
    return out


def _any_process_signal(signum: Optional[int]) -> Optional[int]:
    """The stop signal received by this or any other process of a multi-process (jax.distributed) run, so that
    every process stops at the same chunk boundary (one that went on alone would block in the next chunk's
    collectives)."""
    if jax.process_count() == 1:
        return signum
    from jax.experimental import multihost_utils
    got = int(np.asarray(multihost_utils.process_allgather(np.int32(signum or 0))).max())
    return got or None


def _first_nan(chunk: Mapping[str, np.ndarray], prefixes: Sequence[str]) -> Optional[tuple[str, int, int]]:
    for k in sorted(chunk):
        if not any(k.startswith(p) for p in prefixes):
            continue
        bad = np.isnan(chunk[k])
        if bad.any():
            s, j = np.argwhere(bad)[np.argmin(np.argwhere(bad)[:, 1])]
            return k, int(s), int(j)
    return None


def run_for_cli(run: Callable[[], "RunResult"], *, module: str, run_dir, unit: str = "update",
                errors: tuple = ()) -> tuple[int, Optional["RunResult"]]:
    """Calls ``run()`` (a :func:`run_experiment` call) for a command-line entry point and maps the outcome to an
    exit status, printing one ``error: ...`` line where it fails: 2 for a bad option or an unusable checkpoint
    (``ConfigError``, ``CheckpointError`` and the extra ``errors``), 1 for divergence, ``128 + signal`` when a
    signal stopped the run (with the ``python -m <module> --resume <run_dir>`` line to continue it), else 0.
    Returns ``(status, result)``; ``result`` is None when the run raised."""
    import sys
    try:
        result = run()
    except DivergenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1, None
    except (ConfigError, CheckpointError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    if result.interrupted is not None:
        print(f"stopped by signal {result.interrupted} after {unit} {result.updates_done}/{result.num_updates} "
              f"(checkpoint saved). Continue with: python -m {module} --resume {run_dir}", file=sys.stderr)
        return 128 + int(result.interrupted), result
    return 0, result


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """How to run an experiment (everything but the trainer and the agent's config); see :func:`run`.

    ``resume``: ``True`` continues from the newest intact checkpoint in ``run_dir`` (or starts fresh if there is
    none); ``False`` starts over, moving old ``checkpoints/`` and ``tb/`` aside; ``None`` starts fresh but refuses
    (ConfigError) if ``run_dir`` already holds checkpoints. ``hp``: hyperparameters passed to ``init``/``run``
    (``None``: the trainer's defaults); with ``hp_batched`` every leaf has a leading ``[num_seeds]`` axis (a sweep:
    seed ``i`` uses ``hp[i]``). ``num_updates`` / ``steps_per_update`` default to ``cfg.num_updates`` /
    ``cfg.num_envs * cfg.num_steps``. ``stop_after``: stop (saved, resumable) once at least this many updates are
    done -- to fit a time slot. ``nan_check``: metric-name prefixes whose NaN stops the run
    (:class:`DivergenceError`). ``stream``: where progress and the summary are printed (default stdout).
    ``trainer_kwargs``: passed on to ``make_trainer``.
    """
    run_dir: Path
    num_seeds: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    resume: Optional[bool] = None
    progress: bool = True
    per_seed: bool = False
    hp: Any = None
    hp_batched: bool = False
    num_updates: Optional[int] = None
    steps_per_update: Optional[int] = None
    agent: Optional[str] = None
    run_info: Optional[Mapping] = None
    stop_after: Optional[int] = None
    max_to_keep: int = 3
    tensorboard: bool = True
    plot: bool = True
    handle_signals: bool = True
    nan_check: Sequence[str] = ("loss",)
    stream: Any = None
    trainer_kwargs: Optional[Mapping] = None


def run_experiment(make_trainer: Callable, cfg, *, run_dir, **options) -> RunResult:
    """Trains ``num_seeds`` seeds of ``make_trainer(cfg, ...)`` in checkpointed chunks: :func:`run` with
    ``RunSpec(run_dir=run_dir, **options)`` (the keywords are :class:`RunSpec`'s fields)."""
    return run(make_trainer, cfg, RunSpec(run_dir=Path(run_dir), **options))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a run derives from the agent's config and its :class:`RunSpec` before anything is built."""
    spec: RunSpec
    num_updates: int
    steps_per_update: int
    sequential: bool   # several devices and seeds: seeds one after another
    vmapped: bool      # several seeds vmapped
    identity: dict     # {"config": ..., "run": ...}, saved and compared on resume

    @property
    def run_dir(self) -> Path:
        return Path(self.spec.run_dir)

    @property
    def hp_axis(self):
        return 0 if self.spec.hp_batched else None

    def hp_of(self, i: int):
        hp = self.spec.hp
        return jax.tree.map(lambda x: x[i], hp) if (self.spec.hp_batched and hp is not None) else hp


def _plan(cfg, spec: RunSpec) -> _Plan:
    if jax.process_count() > 1 and jax.process_index() != 0:  # multi-process (jax.distributed): process 0 logs
        spec = dataclasses.replace(spec, tensorboard=False, plot=False, progress=False)
    for name, example in (("num_seeds", 1), ("log_every", 10), ("checkpoint_every", 100)):
        v = getattr(spec, name)
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(name, f"must be a positive integer, got {v!r}",
                              f"pass e.g. --{name.replace('_', '-')} {example}")
    num_updates = int(cfg.num_updates if spec.num_updates is None else spec.num_updates)
    steps_per_update = spec.steps_per_update
    if steps_per_update is None:
        steps_per_update = int(getattr(cfg, "num_envs", 1) * getattr(cfg, "num_steps", 1))
    sequential = int(getattr(cfg, "num_devices", 1)) > 1 and spec.num_seeds > 1
    if spec.hp_batched and spec.hp is not None:
        bad = [x.shape for x in jax.tree.leaves(spec.hp) if np.ndim(x) == 0 or np.shape(x)[0] != spec.num_seeds]
        if bad:
            raise ConfigError("hp", f"hp_batched needs a leading [num_seeds={spec.num_seeds}] axis on every leaf, "
                              f"got shapes {bad}", "broadcast the hyperparameters to one value per seed")
    run_dict = {"num_seeds": spec.num_seeds, "seed": spec.seed, "checkpoint_every": spec.checkpoint_every,
                "num_updates": num_updates, "hp": _hp_json(spec.hp), "hp_batched": spec.hp_batched,
                "steps_per_update": steps_per_update, "log_every": spec.log_every,
                "seeds_sequential": sequential, **_json_safe(dict(spec.run_info or {}))}
    return _Plan(spec, num_updates, steps_per_update, sequential, spec.num_seeds > 1 and not sequential,
                 {"config": _config_dict(cfg), "run": run_dict})


def _resume_policy(plan: _Plan) -> tuple[bool, list]:
    """Applies ``resume`` before anything expensive; returns (a checkpoint exists, paths moved aside)."""
    run_dir, resume = plan.run_dir, plan.spec.resume
    existing = has_checkpoints(run_dir / "checkpoints")
    if existing and resume is None:
        raise ConfigError("resume", f"{run_dir} already holds checkpoints of a run",
                          "pass --resume to continue it, --no-resume to start it over, or choose another --run-dir")
    if existing and resume:
        cfg_file = run_dir / "config.json"
        if cfg_file.exists():
            try:
                saved_cfg = json.loads(cfg_file.read_text())
            except ValueError:
                saved_cfg = None
            if isinstance(saved_cfg, dict):
                _check_same_run(saved_cfg, plan.identity, run_dir)
    moved = []
    if existing and resume is False:
        moved = [p for p in (move_aside(run_dir / "checkpoints"), move_aside(run_dir / "tb")) if p is not None]
    return existing, moved


def _init_state(trainer, plan: _Plan):
    """Every seed's initial state: batched (vmapped seeds), a list (sequential seeds) or one state."""
    spec = plan.spec
    keys = seed_keys(spec.seed, spec.num_seeds)
    if plan.sequential:
        init_one = jax.jit(trainer.init)
        return [init_one(keys[i], plan.hp_of(i)) for i in range(spec.num_seeds)]
    if plan.vmapped:
        return jax.jit(jax.vmap(trainer.init, in_axes=(0, plan.hp_axis)))(keys, spec.hp)
    return jax.jit(trainer.init)(keys[0], plan.hp_of(0))


def run(make_trainer: Callable, cfg, spec: RunSpec) -> RunResult:
    """Trains ``spec.num_seeds`` seeds of ``make_trainer(cfg, log_fn=..., log_every=..., **spec.trainer_kwargs)``
    in checkpointed chunks (see the module docstring). ``cfg`` (the agent's config dataclass) is saved to
    ``config.json`` and compared on resume; ``num_updates``, ``steps_per_update`` and ``num_devices`` are read from
    it unless the spec gives them.

    Returns a :class:`RunResult`. Raises :class:`~jaxrl_pref.config.ConfigError` for bad settings (before
    compiling), :class:`~jaxrl_pref.checkpoint.CheckpointError` for unusable checkpoints and
    :class:`DivergenceError` on NaN losses.
    """
    plan = _plan(cfg, spec)
    spec = plan.spec
    existing, moved = _resume_policy(plan)
    proxy = _LogProxy()
    # vmapped seeds log from each chunk's outputs (one transfer per chunk): a callback inside a vmapped scan runs
    # once per seed on every update, whatever log_every says (a device->host round trip each on an accelerator)
    trainer = make_trainer(cfg, log_fn=None if plan.vmapped else proxy, log_every=spec.log_every,
                           **dict(spec.trainer_kwargs or {}))
    if not getattr(trainer, "jittable", True) and spec.num_seeds != 1:
        raise ConfigError("num_seeds", f"a host-env (Sebulba) trainer trains one seed per process, got "
                          f"{spec.num_seeds}", "pass --num-seeds 1 and start one process per seed (--seed 0, ...)")
    t0 = time.perf_counter()
    state = _init_state(trainer, plan)
    session = _Session(trainer, plan, proxy, state, compile_s=time.perf_counter() - t0)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    session.ckpt = Checkpointer(plan.run_dir / "checkpoints", max_to_keep=spec.max_to_keep)
    try:
        if existing and spec.resume:
            session.restore()
        config_json = {"agent": spec.agent, **plan.identity}
        (plan.run_dir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
        session.logger = Logger(plan.run_dir, num_seeds=spec.num_seeds, steps_per_update=plan.steps_per_update,
                                log_every=spec.log_every, total_updates=plan.num_updates, start_update=session.done,
                                progress=spec.progress, tensorboard=spec.tensorboard, per_seed=spec.per_seed,
                                stream=spec.stream, description=spec.agent or "training")
        try:
            return session.train(moved)
        finally:
            session.logger.close()
    finally:
        session.ckpt.close()


class _Session:
    """One process's run over the chunks still to train: compiled programs, checkpoints, metrics, timing."""

    def __init__(self, trainer, plan: _Plan, proxy: _LogProxy, state, compile_s: float):
        self.trainer, self.plan, self.proxy, self.state = trainer, plan, proxy, state
        self.done, self.resumed_from, self.history = 0, None, {}
        self.compile_s, self.train_s = compile_s, 0.0
        self.ckpt: Optional[Checkpointer] = None
        self.logger: Optional[Logger] = None
        self._compiled = {}

    def restore(self) -> None:
        # arrays a reward transform grows during a run (ONI's message table) come back at their saved shape
        resizable = getattr(getattr(self.trainer, "reward", None), "resizable", None)
        restored = self.ckpt.restore(target=self.state, resizable=resizable)
        _check_same_run(restored.extra, self.plan.identity, self.plan.run_dir)
        self.state, self.done, self.resumed_from = restored.state, restored.step, restored.step
        self.history = dict(restored.history or {})
        bounds = {b for _, b in chunk_bounds(self.plan.num_updates, self.plan.spec.checkpoint_every)}
        if self.done not in bounds and self.done != 0:
            raise CheckpointError(self.ckpt.step_dir(self.done), f"update {self.done} is not a chunk boundary of "
                                  "this run", "resume with the same --checkpoint-every, or --no-resume")

    def program(self, n: int):
        """``run(state, hp, n)``: compiled ahead of time on first use per chunk length (timed apart)."""
        if n not in self._compiled:
            t0 = time.perf_counter()
            plan, trainer, state = self.plan, self.trainer, self.state
            body = lambda rs, h: trainer.run(rs, h, n)  # noqa: E731
            if not getattr(trainer, "jittable", True):  # host loop: jits its own pieces
                self._compiled[n] = body
            # the state is donated: each chunk writes its new state into the old one's buffers (the old state is
            # checkpointed already), so a run holds one copy of it on the device, not two
            elif plan.vmapped:
                self._compiled[n] = jax.jit(jax.vmap(body, in_axes=(0, plan.hp_axis)), donate_argnums=0).lower(
                    state, plan.spec.hp).compile()
            else:
                self._compiled[n] = jax.jit(body, donate_argnums=0).lower(state[0] if plan.sequential else state,
                                                                          plan.hp_of(0)).compile()
            self.compile_s += time.perf_counter() - t0
        return self._compiled[n]

    def run_chunk(self, n: int):
        """Trains every seed ``n`` updates from ``self.state``; returns (new state, {k: [num_seeds, n]})."""
        fn, plan = self.program(n), self.plan
        t = time.perf_counter()
        if plan.sequential:
            outs = [fn(self.state[i], plan.hp_of(i)) for i in range(plan.spec.num_seeds)]
            new_state = [o[0] for o in outs]
            chunk = {k: np.stack([np.asarray(jax.device_get(o[1][k])) for o in outs]) for k in outs[0][1]}
        else:
            new_state, m = fn(self.state, plan.spec.hp)
            chunk = _to_host(m, plan.vmapped)
        jax.block_until_ready(new_state)
        jax.effects_barrier()
        self.train_s += time.perf_counter() - t
        return new_state, chunk

    def run_hook(self, hook, update: int) -> None:
        """The trainer's chunk hook on the state after ``update`` (timed with training: it is part of the run's
        cost): on the seed-batched state (``seed_axis=True``), one seed's, or each seed's in turn (sequential)."""
        t = time.perf_counter()
        if self.plan.sequential:
            self.state = [hook(s, update, seed_axis=False) for s in self.state]
        else:
            self.state = hook(self.state, update, seed_axis=self.plan.vmapped)
        self.train_s += time.perf_counter() - t

    def check_nan(self, chunk: Mapping, first_update: int) -> None:
        """Raises :class:`DivergenceError` (metrics written, no checkpoint) if a watched metric is NaN."""
        nan = _first_nan(chunk, self.plan.spec.nan_check)
        if nan is None:
            return
        write_metrics(self.plan.run_dir, self.history, self.plan.steps_per_update)
        k, s, j = nan
        last = self.ckpt.latest_step()
        kept = (f"the last good checkpoint is update {last} in {self.ckpt.directory}" if last is not None
                else "no checkpoint was saved before it")
        raise DivergenceError(
            f"{k} became NaN at update {first_update + j + 1} (seed {s}): training diverged and was stopped; "
            f"{kept}; metrics up to there are in {self.plan.run_dir / 'metrics.csv'}. Fix: lower --learning-rate "
            "or --max-grad-norm, or normalise observations/rewards")

    def train(self, moved: Sequence[Path]) -> RunResult:
        plan, spec, logger = self.plan, self.plan.spec, self.logger
        if moved:
            logger.message("moved the previous run's files aside: " + ", ".join(str(p) for p in moved))
        if self.resumed_from is not None:
            logger.message(f"resumed {plan.run_dir} at update {self.resumed_from}/{plan.num_updates}")

        def on_signal(signum):
            logger.message(f"received {signal.Signals(signum).name}: finishing the current chunk, then saving and "
                           "stopping (press Ctrl-C again to abort without saving)")

        self.proxy.target = logger
        hook = getattr(self.trainer, "chunk_hook", None)
        checkpoints = {b for _, b in chunk_bounds(plan.num_updates, spec.checkpoint_every)}
        with _GracefulStop(spec.handle_signals, on_signal) as stop:
            for a, b in segment_bounds(plan.num_updates, spec.checkpoint_every,
                                       getattr(hook, "every", 0) if hook is not None else 0):
                if b <= self.done:
                    continue
                if a == self.done or a in checkpoints:  # stop only where the state is checkpointed
                    signum = _any_process_signal(stop.signum)
                    if signum is not None or (spec.stop_after is not None and self.done >= spec.stop_after):
                        stop.signum = stop.signum if stop.signum is not None else signum  # another process's signal
                        break
                logger.reset_timer(a)
                new_state, chunk = self.run_chunk(b - a)
                self.history = concat_metrics(self.history, chunk)
                self.check_nan(chunk, a)  # a diverged state is not checkpointed
                self.state, self.done = new_state, b
                if hook is not None:
                    self.run_hook(hook, b)
                    host = hook_metrics(hook, chunk)
                    if host:  # the hook's own numbers (ONI: the annotator's), at the chunk's last update
                        chunk = {**chunk, **host}
                        self.history = concat_metrics(self.history, host, overwrite_last=b - a)
                if b in checkpoints:
                    self.ckpt.save(b, self.state, extra_json={**plan.identity, "agent": spec.agent,
                                                              "updates_done": b}, history=self.history)
                    write_metrics(plan.run_dir, self.history, plan.steps_per_update)
                if plan.vmapped:
                    logger.log_updates(a, chunk)
                logger.log_chunk(a, chunk)
            interrupted = stop.signum
            # still under the handler: a SIGTERM now (say a requeue as the run ends) must not kill the last save
            logger.flush()
            self.ckpt.wait()
        return self.finish(interrupted)

    def finish(self, interrupted: Optional[int]) -> RunResult:
        plan, history, run_dir = self.plan, self.history, self.plan.run_dir
        paths = {"run_dir": run_dir, "config": run_dir / "config.json", "checkpoints": self.ckpt.directory}
        if history:
            paths["metrics_csv"], paths["metrics_jsonl"] = write_metrics(run_dir, history, plan.steps_per_update)
        if plan.spec.plot and history and "episode_return" in history:
            png = plot_learning_curve(history, run_dir / "learning_curve.png", plan.steps_per_update,
                                      title=f"{plan.spec.agent or 'agent'}: "
                                            f"{plan.identity['config'].get('env_name', '')}")
            if png is not None:
                paths["learning_curve"] = png
        if (run_dir / "tb").exists():
            paths["tensorboard"] = run_dir / "tb"
        result = RunResult(run_dir, self.state, history, self.done, plan.num_updates, plan.steps_per_update,
                           self.resumed_from, interrupted, self.compile_s, self.train_s, paths)
        self.logger.message(_summary(result, self.ckpt.latest_step()))
        return result


def concat_metrics(history: Mapping, chunk: Mapping, overwrite_last: int = 0) -> dict:
    """``history`` and a chunk's metrics (``[seeds, n]`` each) side by side, a metric missing on either side NaN there
    (a key first reported mid-run, or not in every chunk). ``overwrite_last=n``: ``chunk`` replaces the history's last
    ``n`` updates of its keys instead of extending them."""
    if not history:
        return dict(chunk)
    first = next(iter(history.values()))
    seeds, width = first.shape[0], first.shape[1] - overwrite_last
    n = next(iter(chunk.values())).shape[1]
    out = {}
    for k in history.keys() | chunk.keys():
        old = history[k][:, :width] if k in history else np.full((seeds, width), np.nan, np.float32)
        new = chunk[k] if k in chunk else (history[k][:, width:] if overwrite_last else
                                           np.full((seeds, n), np.nan, np.float32))
        out[k] = np.concatenate([old, new], axis=1)
    return out


def hook_metrics(hook, chunk: Mapping) -> dict:
    """The chunk hook's ``metrics()`` (host numbers, e.g. ONI's annotator counters) as a chunk's metrics: each value
    at the chunk's last update, for every seed (NaN at the chunk's other updates). ``{}`` if the hook has none."""
    get = getattr(hook, "metrics", None)
    if get is None or not chunk:
        return {}
    seeds, n = next(iter(chunk.values())).shape[:2]
    out = {}
    for k, v in get().items():
        col = np.full((seeds, n), np.nan, np.float32)
        col[:, -1] = v
        out[k] = col
    return out


def _summary(r: RunResult, latest: Optional[int]) -> str:
    seeds = next(iter(r.metrics.values())).shape[0] if r.metrics else 0
    head = (f"finished {r.updates_done} updates" if r.finished else
            f"stopped at update {r.updates_done}/{r.num_updates}"
            + (f" ({signal.Signals(r.interrupted).name})" if r.interrupted else ""))
    if r.updates_done > (r.resumed_from or 0):
        session = (f"this session {r.train_s:.1f} s training ({r.env_steps_per_sec:,.0f} env steps/s) "
                   f"+ {r.compile_s:.1f} s compile")
    else:
        session = "nothing to train in this session"
    lines = [f"{head}: {r.updates_done * r.steps_per_update:,} env steps per seed x {seeds} seed(s); {session}",
             f"outputs in {r.run_dir}/:"]
    p = r.paths
    lines.append("  config.json")
    if "metrics_csv" in p:
        lines.append("  metrics.csv, metrics.jsonl   (one row per seed and update)")
    if "learning_curve" in p:
        lines.append("  learning_curve.png")
    if "tensorboard" in p:
        lines.append(f"  tb/                          tensorboard --logdir {p['tensorboard']}")
    lines.append(f"  checkpoints/                 latest: update {latest}" if latest is not None else
                 "  checkpoints/                 (none saved)")
    return "\n".join(lines)
