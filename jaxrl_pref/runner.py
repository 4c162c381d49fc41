"""The experiment driver every agent reuses: seeds, chunked jitted training, checkpoints, exact resume, logging.

An agent provides ``make_trainer(cfg, log_fn=..., log_every=...)`` returning an object with

* ``init(key, hp) -> state`` and
* ``run(state, hp, num_updates) -> (state, metrics)`` (``metrics[k]`` has a leading ``[num_updates]`` axis),

both pure and jittable, as :class:`agents.ppo.Trainer` does. :func:`run_experiment` then

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

Host-side trainers (:class:`jaxrl_pref.sebulba.HostTrainer`, ``jittable = False``: envs stepped outside jit) go
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

__all__ = ["run_experiment", "RunResult", "DivergenceError", "chunk_bounds", "seed_keys", "use_sync_cpu_dispatch"]


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


def run_experiment(make_trainer: Callable, cfg, *, run_dir, num_seeds: int = 1, seed: int = 0,
                   log_every: int = 10, checkpoint_every: int = 100, resume: Optional[bool] = None,
                   progress: bool = True, per_seed: bool = False, hp: Any = None, hp_batched: bool = False,
                   num_updates: Optional[int] = None, steps_per_update: Optional[int] = None,
                   agent: Optional[str] = None, run_info: Optional[Mapping] = None,
                   stop_after: Optional[int] = None, max_to_keep: int = 3, tensorboard: bool = True,
                   plot: bool = True, handle_signals: bool = True,
                   nan_check: Sequence[str] = ("loss",), stream=None, trainer_kwargs: Optional[Mapping] = None
                   ) -> RunResult:
    """Trains ``num_seeds`` seeds of ``make_trainer(cfg, ...)`` in checkpointed chunks; see the module docstring.

    Args:
      make_trainer: ``make_trainer(cfg, log_fn=..., log_every=..., **trainer_kwargs)`` -> trainer
        (e.g. :func:`agents.ppo.make_trainer`).
      cfg: the agent's config dataclass; saved to ``config.json`` and compared on resume. ``num_updates``,
        ``steps_per_update`` (default ``cfg.num_envs * cfg.num_steps``) and ``num_devices`` are read from it
        unless given.
      run_dir: output directory (created).
      resume: ``True`` continues from the newest intact checkpoint in ``run_dir`` (or starts fresh if there is
        none); ``False`` starts over, moving old ``checkpoints/`` and ``tb/`` aside; ``None`` starts fresh but
        refuses (ConfigError) if ``run_dir`` already holds checkpoints.
      hp: hyperparameters passed to ``init``/``run`` (``None``: the trainer's defaults). With ``hp_batched`` every
        leaf has a leading ``[num_seeds]`` axis (a sweep: seed ``i`` uses ``hp[i]``).
      stop_after: stop (saved, resumable) once at least this many updates are done -- to fit a time slot.
      nan_check: metric-name prefixes whose NaN stops the run (:class:`DivergenceError`).
      stream: where progress and the summary are printed (default stdout).

    Returns a :class:`RunResult`. Raises :class:`~jaxrl_pref.config.ConfigError` for bad settings (before
    compiling), :class:`~jaxrl_pref.checkpoint.CheckpointError` for unusable checkpoints and
    :class:`DivergenceError` on NaN losses.
    """
    # -- settings ------------------------------------------------------------------------------------------------
    if jax.process_count() > 1 and jax.process_index() != 0:  # multi-process (jax.distributed): process 0 logs
        tensorboard, plot, progress = False, False, False
    for name, v, example in (("num_seeds", num_seeds, 1), ("log_every", log_every, 10),
                             ("checkpoint_every", checkpoint_every, 100)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(name, f"must be a positive integer, got {v!r}",
                              f"pass e.g. --{name.replace('_', '-')} {example}")
    num_updates = int(cfg.num_updates if num_updates is None else num_updates)
    if steps_per_update is None:
        steps_per_update = int(getattr(cfg, "num_envs", 1) * getattr(cfg, "num_steps", 1))
    num_devices = int(getattr(cfg, "num_devices", 1))
    sequential = num_devices > 1 and num_seeds > 1
    vmapped = num_seeds > 1 and not sequential
    if hp_batched and hp is not None:
        bad = [x.shape for x in jax.tree.leaves(hp) if np.ndim(x) == 0 or np.shape(x)[0] != num_seeds]
        if bad:
            raise ConfigError("hp", f"hp_batched needs a leading [num_seeds={num_seeds}] axis on every leaf, got "
                              f"shapes {bad}", "broadcast the hyperparameters to one value per seed")
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    cfg_dict = _config_dict(cfg)
    run_dict = {"num_seeds": num_seeds, "seed": seed, "checkpoint_every": checkpoint_every,
                "num_updates": num_updates, "hp": _hp_json(hp), "hp_batched": hp_batched,
                "steps_per_update": steps_per_update, "log_every": log_every,
                "seeds_sequential": sequential, **_json_safe(dict(run_info or {}))}
    identity = {"config": cfg_dict, "run": run_dict}

    # -- resume policy (before anything expensive) ---------------------------------------------------------------
    existing = has_checkpoints(ckpt_dir)
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
                _check_same_run(saved_cfg, identity, run_dir)
    moved = []
    if existing and resume is False:
        moved = [p for p in (move_aside(ckpt_dir), move_aside(run_dir / "tb")) if p is not None]

    # -- build (may raise ConfigError, e.g. too few devices) -----------------------------------------------------
    proxy = _LogProxy()
    trainer = make_trainer(cfg, log_fn=proxy, log_every=log_every, **dict(trainer_kwargs or {}))
    if not getattr(trainer, "jittable", True) and num_seeds != 1:
        raise ConfigError("num_seeds", f"a host-env (Sebulba) trainer trains one seed per process, got {num_seeds}",
                          "pass --num-seeds 1 and start one process per seed (--seed 0, --seed 1, ...)")
    hp_axis = 0 if hp_batched else None
    keys = seed_keys(seed, num_seeds)

    def hp_of(i):
        return jax.tree.map(lambda x: x[i], hp) if (hp_batched and hp is not None) else hp

    t0 = time.perf_counter()
    if sequential:
        init_one = jax.jit(trainer.init)
        state = [init_one(keys[i], hp_of(i)) for i in range(num_seeds)]
    elif vmapped:
        state = jax.jit(jax.vmap(trainer.init, in_axes=(0, hp_axis)))(keys, hp)
    else:
        state = jax.jit(trainer.init)(keys[0], hp_of(0))
    init_s = time.perf_counter() - t0

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(ckpt_dir, max_to_keep=max_to_keep)
    done, resumed_from, history = 0, None, None
    try:
        if existing and resume:
            restored = ckpt.restore(target=state)
            _check_same_run(restored.extra, identity, run_dir)
            state, done, resumed_from = restored.state, restored.step, restored.step
            history = restored.history
            if done not in {b for _, b in chunk_bounds(num_updates, checkpoint_every)} and done != 0:
                raise CheckpointError(ckpt.step_dir(done), f"update {done} is not a chunk boundary of this run",
                                      "resume with the same --checkpoint-every, or --no-resume")
        config_json = {"agent": agent, "config": cfg_dict, "run": run_dict}
        (run_dir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))

        logger = Logger(run_dir, num_seeds=num_seeds, steps_per_update=steps_per_update, log_every=log_every,
                        total_updates=num_updates, start_update=done, progress=progress, tensorboard=tensorboard,
                        per_seed=per_seed, stream=stream, description=agent or "training")
        try:
            return _loop(trainer, ckpt, logger, proxy, state=state, hp=hp, hp_axis=hp_axis, hp_of=hp_of,
                         done=done, history=history, resumed_from=resumed_from, num_updates=num_updates,
                         checkpoint_every=checkpoint_every, num_seeds=num_seeds, sequential=sequential,
                         vmapped=vmapped, steps_per_update=steps_per_update, run_dir=run_dir, identity=identity,
                         agent=agent, stop_after=stop_after, handle_signals=handle_signals, nan_check=nan_check,
                         plot=plot, init_s=init_s, moved=moved)
        finally:
            logger.close()
    finally:
        ckpt.close()


def _loop(trainer, ckpt: Checkpointer, logger: Logger, proxy: _LogProxy, *, state, hp, hp_axis, hp_of, done,
          history, resumed_from, num_updates, checkpoint_every, num_seeds, sequential, vmapped, steps_per_update,
          run_dir: Path, identity, agent, stop_after, handle_signals, nan_check, plot, init_s, moved) -> RunResult:
    history = dict(history or {})
    chunks = [(a, b) for a, b in chunk_bounds(num_updates, checkpoint_every) if b > done]
    if moved:
        logger.message("moved the previous run's files aside: " + ", ".join(str(p) for p in moved))
    if resumed_from is not None:
        logger.message(f"resumed {run_dir} at update {resumed_from}/{num_updates}")

    # -- one compiled program per chunk length, compiled ahead of time on first use (timed apart) --------------
    compiled = {}
    compile_s = init_s

    def program(n: int):
        nonlocal compile_s
        if n not in compiled:
            t0 = time.perf_counter()
            body = lambda rs, h: trainer.run(rs, h, n)  # noqa: E731
            if not getattr(trainer, "jittable", True):  # host loop: jits its own pieces
                compiled[n] = body
            elif vmapped:
                compiled[n] = jax.jit(jax.vmap(body, in_axes=(0, hp_axis))).lower(state, hp).compile()
            else:
                compiled[n] = jax.jit(body).lower(state[0] if sequential else state, hp_of(0)).compile()
            compile_s += time.perf_counter() - t0
        return compiled[n]

    def on_signal(signum):
        logger.message(f"received {signal.Signals(signum).name}: finishing the current chunk, then saving and "
                       "stopping (press Ctrl-C again to abort without saving)")

    proxy.target = logger
    train_s, interrupted = 0.0, None
    csv_path = run_dir / "metrics.csv"
    with _GracefulStop(handle_signals, on_signal) as stop:
        for a, b in chunks:
            signum = _any_process_signal(stop.signum)
            if signum is not None or (stop_after is not None and done >= stop_after):
                stop.signum = stop.signum if stop.signum is not None else signum  # another process's signal
                break
            fn = program(b - a)
            logger.reset_timer(a)
            t = time.perf_counter()
            if sequential:
                outs = [fn(state[i], hp_of(i)) for i in range(num_seeds)]
                new_state = [o[0] for o in outs]
                chunk = {k: np.stack([np.asarray(jax.device_get(o[1][k])) for o in outs]) for k in outs[0][1]}
            else:
                new_state, m = fn(state, hp)
                chunk = _to_host(m, vmapped)
            jax.block_until_ready(new_state)
            jax.effects_barrier()
            train_s += time.perf_counter() - t
            history = {k: np.concatenate([history[k], v], axis=1) if k in history else v for k, v in chunk.items()}
            nan = _first_nan(chunk, nan_check)
            if nan is not None:  # do not checkpoint a diverged state
                write_metrics(run_dir, history, steps_per_update)
                k, s, j = nan
                last = ckpt.latest_step()
                kept = (f"the last good checkpoint is update {last} in {ckpt.directory}" if last is not None
                        else "no checkpoint was saved before it")
                raise DivergenceError(
                    f"{k} became NaN at update {a + j + 1} (seed {s}): training diverged and was stopped; {kept}; "
                    f"metrics up to there are in {csv_path}. Fix: lower --learning-rate or --max-grad-norm, "
                    "or normalise observations/rewards")
            state, done = new_state, b
            ckpt.save(done, state, extra_json={**identity, "agent": agent, "updates_done": done}, history=history)
            write_metrics(run_dir, history, steps_per_update)
            logger.log_chunk(a, chunk)
        interrupted = stop.signum
        # still under the handler: a SIGTERM now (say a requeue as the run ends) must not kill the last save
        logger.flush()
        ckpt.wait()
    paths = {"run_dir": run_dir, "config": run_dir / "config.json", "checkpoints": ckpt.directory}
    if history:
        paths["metrics_csv"], paths["metrics_jsonl"] = write_metrics(run_dir, history, steps_per_update)
    if plot and history and "episode_return" in history:
        png = plot_learning_curve(history, run_dir / "learning_curve.png", steps_per_update,
                                  title=f"{agent or 'agent'}: {identity['config'].get('env_name', '')}")
        if png is not None:
            paths["learning_curve"] = png
    tb = run_dir / "tb"
    if tb.exists():
        paths["tensorboard"] = tb
    result = RunResult(run_dir, state, history, done, num_updates, steps_per_update, resumed_from, interrupted,
                       compile_s, train_s, paths)
    logger.message(_summary(result, ckpt.latest_step()))
    return result


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
