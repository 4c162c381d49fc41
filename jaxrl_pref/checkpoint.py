"""Exact, atomic checkpoints of any pytree (an agent's ``RunnerState``) on top of orbax-checkpoint.

A checkpoint at ``step`` is a directory ``<dir>/<step>/`` written by orbax into a temporary directory and renamed
into place only once complete, so a job killed mid-save never leaves a half-written step behind. It holds three items:

* ``state``   -- the pytree's leaves, saved as arrays (``StandardSave``). Leaves are stored flat, keyed by their
  index, so any pytree (flax ``struct`` dataclasses, optax ``NamedTuple`` states, empty nodes) round-trips; the
  structure comes from the ``target`` template given to :meth:`Checkpointer.restore`.
* ``meta``    -- JSON: the leaves' paths/shapes/dtypes (checked against the template before restoring, so an
  incompatible checkpoint gives a clear error instead of a silent mis-restore) and the caller's ``extra_json``
  (the run's config, the number of updates done...).
* ``history`` -- optional host-side arrays (e.g. the per-update metrics collected so far), restored as numpy.

Once a save is final, a background thread records the size and CRC32 of every file of the step
(``jaxrl_pref_manifest.json``); restoring verifies them first, so silent corruption (same size, different bytes) is
caught too. Restoring gives back exactly what was saved: same tree structure, shapes and dtypes (raw ``uint32`` PRNG keys,
``int32`` counters; typed ``jax.random.key`` arrays are stored as their key data and re-wrapped), same shardings as
the template's arrays. If the newest checkpoint cannot be read, :meth:`Checkpointer.restore` warns and falls back to
the previous intact one.

Example::

    ckpt = Checkpointer("runs/x/checkpoints", max_to_keep=3)
    ckpt.save(100, runner_state, extra_json={"config": cfg_dict}, history={"episode_return": returns})
    ckpt.wait()
    restored = ckpt.restore(target=runner_state_template)   # latest intact step
    restored.state, restored.step, restored.extra, restored.history
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used. The message names the path and what to do about it."""

    def __init__(self, path, problem: str, fix: str):
        self.path = str(path)
        super().__init__(f"checkpoint {self.path}: {problem}. Fix: {fix}")


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint is intact but does not fit the template (different model/config)."""


class CheckpointWriteError(CheckpointError):
    """Writing checkpoint ``step`` failed (disk full, permissions, an I/O error): ``cause`` is what orbax or the file
    system raised. The steps saved before it are intact."""

    def __init__(self, path, step: Optional[int], cause: BaseException, manifest: bool = False):
        self.step, self.cause, self.manifest = step, cause, manifest
        what = "writing its checksum manifest" if manifest else "saving it"
        super().__init__(path, f"{what} failed ({type(cause).__name__}: {_short(cause)})",
                         "check free disk space and permissions")


_IO_WORDS = ("No space left on device", "os_error_code", "Disk quota exceeded", "Read-only file system",
             "Permission denied", "Input/output error", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED")


def is_io_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a file-system error: an ``OSError``, or one of the
    error types orbax/tensorstore wrap an errno in (``ValueError: RESOURCE_EXHAUSTED: ... [os_error_code='28']``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) or any(w in str(exc) for w in _IO_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    extra: dict
    history: Optional[dict]


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


def _is_key_array(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaf_info(path, x) -> dict:
    arr = jax.random.key_data(x) if _is_key_array(x) else x
    dtype = arr.dtype if hasattr(arr, "dtype") else np.asarray(arr).dtype
    return {"path": jax.tree_util.keystr(path), "shape": list(np.shape(arr)), "dtype": str(np.dtype(dtype)),
            "key": bool(_is_key_array(x))}


def _to_savable(x):
    if _is_key_array(x):
        return jax.random.key_data(x)
    if isinstance(x, jax.Array):
        return x
    return np.asarray(x)


def _leaf_name(i: int) -> str:
    return f"{i:06d}"


def _abstract(x):
    """Restore template for one leaf: jax arrays keep their sharding; everything else restores as numpy."""
    if _is_key_array(x):
        data = jax.random.key_data(x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
        if x.sharding is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        return x
    return np.zeros(np.shape(x), np.asarray(x).dtype)


def _rebuild(template_leaf, restored):
    if _is_key_array(template_leaf):
        return jax.random.wrap_key_data(restored, impl=jax.random.key_impl(template_leaf))
    if isinstance(template_leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return restored
    if isinstance(template_leaf, np.ndarray):
        return np.asarray(restored)
    if isinstance(template_leaf, np.generic):
        return np.asarray(restored).astype(template_leaf.dtype)[()]
    if isinstance(template_leaf, (bool, int, float, complex)):
        return type(template_leaf)(np.asarray(restored).item())
    return restored


def _json_safe(obj):
    """Round-trips through JSON (tuples -> lists, numpy scalars -> Python) so saved and fresh values compare."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


class Checkpointer:
    """Keeps the newest ``max_to_keep`` checkpoints of a pytree in ``directory`` (created if missing).

    Saves are asynchronous (orbax writes in a background thread after copying arrays to host); :meth:`wait` or
    :meth:`close` blocks until they are on disk. Use as a context manager to close automatically.
    """

    def __init__(self, directory, max_to_keep: Optional[int] = 3, async_save: bool = True):
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=async_save),
            item_names=("state", "meta", "history"),
        )
        self._unsealed: list[int] = []  # saved steps whose checksum manifest is not written yet
        self._sealer: Optional[threading.Thread] = None
        self._seal_error: Optional[BaseException] = None

    # -- queries ---------------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps on disk, including this object's pending asynchronous saves (waited for)."""
        if self._unsealed:
            self.wait()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    # -- save ------------------------------------------------------------------------------------------------
    def save(self, step: int, pytree: Any, extra_json: Optional[Mapping] = None,
             history: Optional[Mapping[str, Any]] = None) -> None:
        """Saves ``pytree`` (any pytree of arrays) as checkpoint ``step``; ``extra_json`` must be JSON-serialisable
        (NaN allowed); ``history`` is a flat dict of host arrays restored as numpy (e.g. metrics so far)."""
        ocp = _ocp()
        leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(pytree)
        meta = {"format": FORMAT_VERSION, "saved_at": time.time(),
                "leaves": [_leaf_info(p, x) for p, x in leaves_with_path],
                "history_keys": sorted(history) if history is not None else None,
                "extra": _json_safe(dict(extra_json or {}))}
        state = {_leaf_name(i): _to_savable(x) for i, (_, x) in enumerate(leaves_with_path)}
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if history is not None:
            items["history"] = ocp.args.StandardSave({k: np.asarray(v) for k, v in history.items()})
        self.wait()  # the previous save must be final before its checksums are written
        try:
            if step in self._manager.all_steps():  # e.g. re-saving after a resume at the same step
                self._manager.delete(step)
            ok = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 -- a full disk surfaces here as OSError or an orbax ValueError
            if is_io_error(e):
                raise CheckpointWriteError(self.step_dir(step), step, e) from e
            raise
        if not ok:
            raise CheckpointError(self.step_dir(step), "orbax refused to save this step",
                                  "check that the directory is writable and not shared with another run")
        self._unsealed.append(step)
        # checksum the step as soon as orbax has finalised it, while the caller goes on training
        self._sealer = threading.Thread(target=self._seal, name="checkpoint-sealer", daemon=True)
        self._sealer.start()

    def _seal(self) -> None:
        self._seal_error = self._finish(list(self._unsealed))  # re-raised by wait() in the caller's thread

    def _finish(self, steps: list) -> Optional[tuple]:
        """Waits for orbax, then writes the checksum manifests of ``steps``; returns ``(step, error, manifest)``
        for the first failure (``manifest``: orbax finished the step, only its manifest could not be written)."""
        try:
            self._manager.wait_until_finished()
        except BaseException as e:  # noqa: BLE001
            return (steps[0] if steps else None), e, False
        for step in steps:
            try:
                if not (self.step_dir(step) / MANIFEST).exists():
                    _write_manifest(self.step_dir(step))
            except BaseException as e:  # noqa: BLE001
                return step, e, True
        return None

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk (and checksummed). Raises
        :class:`CheckpointWriteError` if one of them failed (the steps saved before it stay intact)."""
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None
        pending, self._unsealed = list(self._unsealed), []
        failed, self._seal_error = self._seal_error, None
        if failed is None:
            failed = self._finish(pending)  # orbax re-raises its writer threads' errors here
        if failed is not None:
            step, err, manifest = failed
            raise CheckpointWriteError(self.step_dir(step) if step is not None else self.directory, step, err,
                                       manifest=manifest) from err

    # -- restore ---------------------------------------------------------------------------------------------
    def read_meta(self, step: int) -> dict:
        path = self.step_dir(step) / "meta"
        try:
            meta = self._manager.restore(step, args=_ocp().args.Composite(meta=_ocp().args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 -- any failure to read means the step is unusable
            raise CheckpointError(path, f"cannot read the checkpoint's metadata ({type(e).__name__}: {e})",
                                  _delete_fix(self.step_dir(step))) from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "leaves" not in meta:
            raise CheckpointError(path, "not a jaxrl_pref checkpoint (unknown metadata format)",
                                  _delete_fix(self.step_dir(step)))
        return meta

    def restore(self, step: Optional[int] = None, target: Any = None,
                resizable: Optional[Callable[[str], bool]] = None) -> Restored:
        """Restores checkpoint ``step`` (default: the newest intact one) into the structure of ``target``.

        ``target`` is a pytree like the one saved (concrete arrays or ``jax.ShapeDtypeStruct``); its leaves fix the
        restored shardings. ``resizable(path)`` (``path`` as ``jax.tree_util.keystr`` writes it) names the leaves
        that may have changed shape during the run (a table that grew): those are restored at their saved shape if
        only the sizes differ (same dtype and rank). With ``step=None`` a corrupt newest checkpoint is skipped with a
        warning and the previous one is tried. Raises :class:`IncompatibleCheckpointError` if the checkpoint does not
        fit ``target`` and :class:`CheckpointError` if no checkpoint can be read.
        """
        if target is None:
            raise TypeError("restore needs target= (a pytree like the saved one, e.g. the freshly initialised state)")
        if step is not None:
            return self._restore_step(step, target, resizable)
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(self.directory, "no checkpoint found", "start a new run (e.g. without --resume)")
        errors = []
        for s in reversed(steps):
            try:
                out = self._restore_step(s, target, resizable)
            except IncompatibleCheckpointError:
                raise
            except CheckpointError as e:
                errors.append(str(e))
                warnings.warn(f"{e}\n-> falling back to an older checkpoint", RuntimeWarning, stacklevel=2)
                continue
            return out
        raise CheckpointError(self.directory, f"none of the checkpoints {steps} could be read:\n  "
                              + "\n  ".join(errors),
                              f"delete {self.directory} (or pass --no-resume to start over)")

    def _restore_step(self, step: int, target, resizable=None) -> Restored:
        ocp = _ocp()
        step_dir = self.step_dir(step)
        if step not in self.all_steps():
            raise CheckpointError(step_dir, f"step {step} does not exist (have {self.all_steps()})",
                                  "pick an existing step or leave it out to restore the latest")
        _verify_manifest(step_dir)
        meta = self.read_meta(step)
        t_leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(target)
        t_leaves = [x for _, x in t_leaves_with_path]
        want = [_leaf_info(p, x) for p, x in t_leaves_with_path]
        have = meta["leaves"]
        if resizable is not None and len(want) == len(have):
            for i, (w, h) in enumerate(zip(want, have)):
                if (w["shape"] != h["shape"] and w["dtype"] == h["dtype"] and len(w["shape"]) == len(h["shape"])
                        and not w["key"] and resizable(w["path"])):
                    sharding = getattr(t_leaves[i], "sharding", None)
                    t_leaves[i] = jax.ShapeDtypeStruct(tuple(h["shape"]), np.dtype(h["dtype"]), sharding=sharding)
                    want[i] = {**w, "shape": h["shape"]}
        if len(want) != len(have) or any(
                (w["shape"], w["dtype"]) != (h["shape"], h["dtype"]) for w, h in zip(want, have)):
            raise IncompatibleCheckpointError(
                step_dir, "it does not match the state this run builds (different model, env or config?): "
                + _first_difference(have, want),
                f"resume with the options the run was started with, or {_delete_fix(self.directory)}")
        abstract = {_leaf_name(i): _abstract(x) for i, x in enumerate(t_leaves)}
        items = {"state": ocp.args.StandardRestore(abstract)}
        if meta.get("history_keys") is not None:
            items["history"] = ocp.args.StandardRestore()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # orbax: "sharding info not provided" for numpy leaves
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            state = restored.state
            leaves = [_rebuild(t, state[_leaf_name(i)]) for i, t in enumerate(t_leaves)]
            history = None
            if meta.get("history_keys") is not None:
                history = {k: np.asarray(v) for k, v in restored.history.items()}
        except Exception as e:  # noqa: BLE001 -- tensorstore/orbax raise many types for damaged files
            raise CheckpointError(step_dir, f"the checkpoint is damaged or incomplete ({type(e).__name__}: "
                                  f"{_short(e)})", _delete_fix(step_dir)) from e
        for h, x in zip(have, leaves):
            arr = jax.random.key_data(x) if _is_key_array(x) else np.asarray(x) if np.isscalar(x) else x
            if list(np.shape(arr)) != h["shape"] or str(np.dtype(arr.dtype)) != h["dtype"]:
                raise CheckpointError(step_dir, f"leaf {h['path']} restored with the wrong shape/dtype",
                                      _delete_fix(step_dir))
        return Restored(step, jax.tree_util.tree_unflatten(treedef, leaves), meta.get("extra", {}), history)

    # -- housekeeping ----------------------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


MANIFEST = "jaxrl_pref_manifest.json"


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _write_manifest(step_dir: Path) -> None:
    """Records size and CRC32 of every file of a finished step, so damage is detected before orbax reads it
    (orbax/tensorstore do not checksum array chunks, and a failed read there is noisy)."""
    if not step_dir.is_dir():  # already rotated away by max_to_keep
        return
    if jax.process_index() != 0:  # multi-process run: one shared step directory, process 0 writes its manifest
        return
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc(p)]
             for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = step_dir / (MANIFEST + ".tmp")
    try:
        tmp.write_text(json.dumps({"files": files}))
        tmp.replace(step_dir / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the step stays restorable, unverified, as one saved before manifests existed
        raise


def _verify_manifest(step_dir: Path) -> None:
    path = step_dir / MANIFEST
    if not path.exists():  # written after the save completes; a run killed just then has none
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(step_dir, f"its checksum manifest {MANIFEST} is unreadable ({e})",
                              _delete_fix(step_dir)) from e
    for rel, (size, crc) in files.items():
        p = step_dir / rel
        if not p.is_file():
            raise CheckpointError(step_dir, f"file {rel} is missing", _delete_fix(step_dir))
        if p.stat().st_size != size or _crc(p) != crc:
            raise CheckpointError(step_dir, f"file {rel} is damaged (size/checksum differ from when it was "
                                  "saved)", _delete_fix(step_dir))


def _delete_fix(path) -> str:
    return f"delete {path} (rm -rf) or pass --no-resume to start the run over"


def _short(e: BaseException, n: int = 300) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= n else s[:n] + "..."


def _first_difference(have: list, want: list) -> str:
    if len(have) != len(want):
        return f"the checkpoint has {len(have)} arrays, this run's state has {len(want)}"
    for h, w in zip(have, want):
        if (h["shape"], h["dtype"]) != (w["shape"], w["dtype"]):
            return (f"{w['path']} is {h['dtype']}{h['shape']} in the checkpoint but {w['dtype']}{w['shape']} "
                    f"in this run")
    return "unknown difference"


def move_aside(directory) -> Optional[Path]:
    """Renames an existing ``directory`` to ``<directory>.old-<timestamp>`` (used to start over without deleting)."""
    moved = move_aside_all([directory])
    return moved[0] if moved else None


def move_aside_all(paths) -> list[Path]:
    """Renames each existing file or directory of ``paths`` to ``<name>.old-<timestamp>``, one suffix for all of
    them (``-1``, ``-2``... appended when a name is taken), so the files of one earlier run stay together. Returns
    the new paths, in the order of ``paths``."""
    paths = [Path(p) for p in paths if Path(p).exists()]
    stamp = time.strftime('%Y%m%d-%H%M%S')
    suffix, i = f".old-{stamp}", 0
    while any(p.with_name(p.name + suffix).exists() for p in paths):
        i += 1
        suffix = f".old-{stamp}-{i}"
    out = []
    for p in paths:
        dest = p.with_name(p.name + suffix)
        shutil.move(str(p), str(dest))
        out.append(dest)
    return out


def finished_steps(directory) -> list[int]:
    """The finished checkpoint steps in ``directory``, sorted (cheap: reads no checkpoint, opens no orbax; a step
    being written, or one whose save failed, is not finished)."""
    d = Path(directory)
    try:
        return sorted(int(p.name) for p in d.iterdir()
                      if p.name.isdigit() and p.is_dir() and (p / "_CHECKPOINT_METADATA").exists())
    except OSError:
        return []


def has_checkpoints(directory) -> bool:
    """True if ``directory`` holds at least one finished checkpoint step (cheap, does not open orbax)."""
    return bool(finished_steps(directory))


__all__ = ["Checkpointer", "CheckpointError", "CheckpointWriteError", "IncompatibleCheckpointError", "Restored",
           "move_aside", "move_aside_all", "finished_steps", "has_checkpoints", "is_io_error"]
