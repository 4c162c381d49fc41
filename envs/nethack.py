"""NetHack and MiniHack through ``nle``: a batched host env backed by a pool of worker processes.

``envs.make("NetHackScore-v0", num_envs=8)`` (or any ``MiniHack-*`` id) returns ``(NLEPool, None)``: a host env
with the interface :mod:`envs.host` documents (numpy in, numpy out, auto-reset, ``final_obs`` and
``episode_*`` statistics in ``info``), not a jittable gymnax env. Its keyword arguments are :class:`NLEPool`'s.

* ``num_workers`` processes (default: one per CPU core, at most one per env) each step ``num_envs / num_workers``
  envs. Workers are plain ``python envs/nle_worker.py`` processes: they never import JAX, start in well under a
  second and are never forked from a process running JAX threads.
* Observations are written by the workers into one shared-memory segment, and a step's command and its
  completion are counters in that segment too (on x86-64 each side polls them briefly before it sleeps on a
  socket: a wake-up through the kernel costs ~60 us across cores on a VM; ``spin``, :mod:`envs.nle_worker`).
  Nothing is pickled per step. ``step`` returns copies, so earlier results stay valid.
* Workers step each env with :class:`envs.nle_worker.FastStep` (NLE's own step without the gym layer: same
  results, 1.6-2x fewer CPU-seconds per step) where it replays the task exactly, else through gym.
* ``num_groups=2`` splits the envs into two groups that :meth:`NLEPool.send` / :meth:`NLEPool.recv` step on
  their own: the host works on one group's results (the policy's next actions) while the workers step the other.
* ``host_envs=K``: the host process steps the first ``K`` envs of each group itself, in :meth:`NLEPool.send`
  right after handing the workers their envs' step (default number of workers: one per core less one). On 2 cores
  this beats 2 workers: a host that polls for its workers competes with them for the cores, one that sleeps pays
  a ~60 us wake-up per step, and one that steps envs does neither. Those envs are not isolated: an error in one is
  raised by ``send``/``step`` (the step is withdrawn) instead of restarting a worker.
* Observations (``obs_keys``): ``glyphs_crop`` (``crop`` window of glyph ids centred on the agent, padded with
  ``nle.nethack.MAX_GLYPH``), ``glyphs`` (the full 21x79 map), ``chars``/``chars_crop``, ``blstats`` (27 int32)
  and ``message`` (the 256 raw message bytes, uint8, for reward models).
* Episodes end by termination (death, task success) or truncation (NLE's step limit, ``StepStatus.ABORTED``).
  Where the task's rule or the step limit ends an episode while the game still runs, gym's NLE plays out a quit
  sequence (prompts, tombstone, score files: ~0.4-0.7 ms, half a reset) whose screen its step then returns; the
  workers skip it, since the env is reset at once, and ``final_obs`` is the observation the episode ended on
  (:class:`envs.nle_worker.FastStep` ``quit=False``; tasks it does not replay keep gym's behaviour).
  ``info`` holds, per env, ``episode_done`` and for finished episodes ``episode_return``, ``episode_length``,
  ``episode_depth`` (deepest dungeon level reached), ``episode_score`` (in-game score at the end) and, for tasks
  that define success (``NetHackStaircase*``, ``NetHackOracle``, MiniHack), ``episode_success``.
* Seeding: episode ``e`` of env ``i`` uses NetHack seeds :func:`envs.nle_worker.episode_seeds` ``(seed, i, e)``
  (no anti-TAS reseeding), so a pool's batch equals the same envs stepped one by one.
* Worker death (killed, crashed, or silent past ``step_timeout``) is noticed within the step: the worker is
  restarted with fresh envs, its envs' episodes are reported as truncated (``final_obs`` = the last observation
  the pool returned, reward 0, the statistics of the cut episode) and the run goes on (``restarts`` counts them).
* ``close()`` (also called by a finaliser at interpreter exit or when the pool is garbage collected) stops the
  workers and unlinks the segment. If the host is killed outright, the workers see their socket close and exit,
  and Python's resource tracker unlinks the segment.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import os
import socket
import subprocess
import sys
import time
import warnings
import weakref
from multiprocessing import shared_memory
from typing import Optional, Sequence

import numpy as np

from envs import nle_worker as W

NETHACK_TASKS = ("NetHackScore-v0", "NetHackStaircase-v0", "NetHackStaircasePet-v0", "NetHackOracle-v0",
                 "NetHackGold-v0", "NetHackEat-v0", "NetHackScout-v0", "NetHackChallenge-v0", "NetHack-v0")
INSTALL_HINT = 'install the NetHack extra: pip install -e ".[nle]"  (pip packages nle and minihack)'

__all__ = ["NLEPool", "PoolConfig", "make", "register_all", "registered", "require_nle", "NETHACK_TASKS"]


def require_nle(task: str = "NetHack-v0"):
    """Imports nle (and minihack for ``MiniHack-*``) or raises an ImportError saying which extra to install."""
    try:
        import nle  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{task} needs the `nle` package, which is not installed; {INSTALL_HINT}") from e
    if W.is_minihack(task):
        try:
            import minihack  # noqa: F401
        except ImportError as e:
            raise ImportError(f"{task} needs the `minihack` package, which is not installed; {INSTALL_HINT}") from e


_MINIHACK_IDS: Optional[tuple] = None


def minihack_tasks() -> tuple:
    """Registered MiniHack ids (empty when minihack is not installed)."""
    global _MINIHACK_IDS
    if _MINIHACK_IDS is None:
        try:
            import gymnasium
            import minihack  # noqa: F401
            _MINIHACK_IDS = tuple(sorted(k for k in gymnasium.registry if k.startswith("MiniHack-")))
        except ImportError:
            _MINIHACK_IDS = ()
    return _MINIHACK_IDS


# the annotator's prompt of the NetHack tasks that have their own; the others use the generic one
PROMPT_TASKS = {"NetHackScore-v0": "nethack_score", "NetHackStaircase-v0": "nethack_staircase",
                "NetHackStaircasePet-v0": "nethack_staircase", "NetHackOracle-v0": "nethack_oracle"}


def register_all(register) -> None:
    """Registers the NetHack tasks and (as one prefix entry: listing them imports minihack) every ``MiniHack-*`` id
    with :func:`envs.register`: host envs built by :func:`make`, with the host defaults and the bottom-line reward
    factors (:data:`envs.factors.MINIHACK`); registering imports neither nle nor minihack."""
    from envs.factors import MINIHACK
    host = dict(factory=make, host=True, defaults="host", factors=MINIHACK)
    for name in NETHACK_TASKS:
        register(name, family="nethack", task=PROMPT_TASKS.get(name), **host)
    register("MiniHack-", family="minihack", prefix=True, task="minihack", **host)


def registered() -> list[str]:
    return list(NETHACK_TASKS) + list(minihack_tasks())


def _check_task(task: str) -> None:
    require_nle(task)
    if task in NETHACK_TASKS:
        return
    if task not in minihack_tasks():
        close = difflib.get_close_matches(task, registered(), n=3)
        raise ValueError(f"env_name: unknown NetHack/MiniHack task {task!r}."
                         + (f" Did you mean {', '.join(close)}?" if close else "")
                         + " Known MiniHack tasks: python -c 'import envs.nethack as n; print(n.minihack_tasks())'")


class WorkerError(RuntimeError):
    """A worker failed to start (bad task or env kwargs): carries the worker's traceback."""


class _Worker:
    """Host-side record of one worker process: its envs are ``groups[g] = (start, count)``, one slice per group."""

    def __init__(self, index: int, groups: list):
        self.index, self.groups = index, groups
        self.proc: Optional[subprocess.Popen] = None
        self.sock: Optional[socket.socket] = None
        self.seq = 0  # commands issued to this process
        self.waiter: Optional[W.Waiter] = None

    def slice(self, group: int) -> slice:
        start, count = self.groups[group]
        return slice(start, start + count)

    @property
    def envs(self) -> str:
        return ", ".join(f"{a}..{a + n - 1}" for a, n in self.groups)


def _shutdown(workers: list, shm_box: list, local_slots: list, timeout: float = 2.0) -> None:
    """Stops workers (closing their sockets ends them; SIGKILL after ``timeout``), closes the host's own envs and
    unlinks the segment; safe to call twice."""
    W.close_envs(local_slots)
    for w in workers:
        if w.sock is not None:
            try:
                w.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    deadline = time.monotonic() + timeout
    for w in workers:
        if w.proc is not None:
            try:
                w.proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.proc = None
        if w.sock is not None:
            w.sock.close()
            w.sock = None
    while shm_box:
        shm = shm_box.pop()
        try:
            shm.close()
        except BufferError:  # a view is still alive somewhere: the unlink below still frees the name
            pass
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


class NLEPool:
    """A batch of ``num_envs`` NetHack/MiniHack envs stepped by worker processes (see the module docstring).

    Args:
      task: ``NetHackScore-v0`` ... or a ``MiniHack-*`` id.
      num_envs: envs in the batch.
      num_workers: worker processes (default: one per CPU core, less one if ``host_envs``, at most one per env);
        each group's envs (after the host's) are split evenly over them, in order.
      num_groups: envs ``[g * B, (g + 1) * B)`` (``B = num_envs // num_groups``) form group ``g``, which
        :meth:`send` and :meth:`recv` step on its own, so the host can work on one group's results while the
        workers step the next (see :meth:`send`). :meth:`step` steps all groups.
      seed: pool seed; env ``i`` is seeded from ``(seed, i, episode)``.
      obs_keys: observation keys (see the module docstring).
      crop: ``(height, width)`` of the crops (odd numbers).
      env_kwargs: passed to ``gymnasium.make`` in the workers (e.g. ``max_episode_steps``, ``character``).
        Default ``fix_moon_phase=True`` (moon phase and Friday 13th from the seed: reproducible episodes).
      step_timeout: seconds a worker may take for one step before it counts as hung.
      start_timeout: seconds a worker may take to start.
      max_restarts: total worker restarts after which the pool gives up (RuntimeError).
      spin: seconds each side polls shared memory for the other before it sleeps on its socket (default 1 ms on
        x86-64, where polling is safe; 0 elsewhere: wake-ups through the socket only). See
        :mod:`envs.nle_worker`.
      host_envs: envs per group (the first of each) that this process steps itself while the workers step the
        rest (see the module docstring); ``host_envs == num_envs // num_groups`` means no worker processes.
    """

    def __init__(self, task: str, num_envs: int = 8, num_workers: Optional[int] = None, seed: int = 0,
                 obs_keys: Sequence[str] = ("glyphs_crop", "blstats", "message"), crop: Sequence[int] = (9, 9),
                 env_kwargs: Optional[dict] = None, step_timeout: float = 60.0, start_timeout: float = 120.0,
                 max_restarts: int = 100, num_groups: int = 1, spin: Optional[float] = None, host_envs: int = 0):
        _check_task(task)
        if num_envs < 1:
            raise ValueError(f"num_envs: must be >= 1, got {num_envs}. Fix: pass num_envs=8")
        bad = [k for k in obs_keys if k not in W.OBS_KEYS]
        if bad or not obs_keys:
            raise ValueError(f"obs_keys: {bad or 'empty'} not available. Fix: choose from {W.OBS_KEYS}")
        crop = tuple(int(c) for c in crop)
        if len(crop) != 2 or any(c < 1 or c % 2 == 0 for c in crop):
            raise ValueError(f"crop: must be two odd positive sizes, got {crop}. Fix: pass crop=(9, 9)")
        num_groups = int(num_groups)
        if num_groups < 1 or num_envs % num_groups or num_groups > W.MAX_GROUPS:
            raise ValueError(f"num_groups: must be in [1, {W.MAX_GROUPS}] and divide num_envs={num_envs}, got "
                             f"{num_groups}. Fix: pass num_groups=1, or 2 with an even num_envs")
        spin = W.SPIN_DEFAULT if spin is None else float(spin)
        if not 0 <= spin <= 1:
            raise ValueError(f"spin: must be in [0, 1] seconds, got {spin}. Fix: pass spin=None (the default)")
        if spin > 0 and W.SPIN_DEFAULT == 0:
            raise ValueError(f"spin: polling shared memory is only safe on x86-64, this is {W.platform.machine()}. "
                             "Fix: pass spin=0 (or leave it out)")
        self.spin = spin
        group_size = num_envs // num_groups
        host_envs = int(host_envs)
        if not 0 <= host_envs <= group_size:
            raise ValueError(f"host_envs: must be in [0, num_envs // num_groups = {group_size}], got {host_envs}. "
                             "Fix: pass host_envs=0 (every env in a worker process)")
        worker_envs = group_size - host_envs
        if num_workers is None:  # one process per core, the host counting as one if it steps envs
            num_workers = min(worker_envs, max((os.cpu_count() or 1) - (host_envs > 0), 1))
        num_workers = int(num_workers)
        if not (1 if worker_envs else 0) <= num_workers <= worker_envs:
            raise ValueError(f"num_workers: must be in [{1 if worker_envs else 0}, num_envs // num_groups - host_envs "
                             f"= {worker_envs}], got {num_workers}. Fix: pass fewer workers than envs per group")
        self.task, self.num_envs, self.num_workers, self.seed = task, int(num_envs), num_workers, int(seed)
        self.obs_keys, self.crop = tuple(obs_keys), crop
        self.env_kwargs = {"fix_moon_phase": True, **(env_kwargs or {})}
        self.step_timeout, self.start_timeout, self.max_restarts = step_timeout, start_timeout, max_restarts
        self.restarts = 0
        self._spec = W.obs_spec(self.obs_keys, crop)

        lay, size = W.layout(num_envs, self.obs_keys, crop, num_workers)
        shm = shared_memory.SharedMemory(create=True, size=size)
        self._shm_box = [shm]
        self._v = W.views(shm.buf, lay)
        self._v["episode_index"][:] = 0
        self.num_groups, self.group_size = num_groups, group_size
        sizes = [worker_envs // num_workers + (i < worker_envs % num_workers) for i in range(num_workers)]
        starts = host_envs + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        self._workers = [_Worker(i, [(g * group_size + int(a), int(c)) for g in range(num_groups)])
                         for i, (a, c) in enumerate(zip(starts, sizes))]
        self.host_envs = host_envs
        self._local_slots: list = []  # the host's own envs (EnvSlots), closed by the finaliser
        self._local: Optional[W.Worker] = None
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._shm_box, self._local_slots)
        self._last_obs = None
        self._queue: collections.deque = collections.deque()  # groups sent and not yet received, in send order
        self._sent: dict = {}  # group -> workers that got its step command
        self._send_failed: dict = {}  # group -> [(worker, why)] that could not be sent to
        # group -> [(worker, its slice, running return, length, depth)]: episodes cut by a restart, reported at recv
        self._cut: dict = {g: [] for g in range(num_groups)}
        self.num_actions = None
        self.has_success = False
        try:
            for w in self._workers:
                self._launch(w)
            if host_envs:  # built while the workers start, as a worker builds its own
                self._local = W.Worker.build(task, self.env_kwargs, self.obs_keys, self.seed,
                                             [(g * group_size, host_envs) for g in range(num_groups)], self._v,
                                             self._local_slots)
                self._local.reset()
                spec = self._local.spec()
                self.num_actions, self.has_success = spec["num_actions"], spec["has_success"]
            for w in self._workers:
                hello = self._handshake(w)
                self.num_actions, self.has_success = hello["num_actions"], hello["has_success"]
        except BaseException:
            self.close()
            raise

    # -- workers ---------------------------------------------------------------------------------------------
    def _launch(self, w: _Worker) -> None:
        parent, child = socket.socketpair()
        row = self._v["ctl/seq"][w.index]
        row[:] = 0  # a new process: counters restart
        w.seq = 0
        cfg = {"shm": self._shm_box[0].name, "num_envs": self.num_envs, "obs_keys": list(self.obs_keys),
               "crop": list(self.crop), "groups": w.groups, "task": self.task, "num_workers": self.num_workers,
               "worker": w.index, "spin": self.spin, "env_kwargs": self.env_kwargs, "seed": self.seed}
        try:
            w.proc = subprocess.Popen([sys.executable, W.__file__, str(child.fileno()), json.dumps(cfg)],
                                      pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            child.close()
        w.sock = parent
        w.waiter = W.Waiter(row, W.DONE_SEQ, W.HOST_WAITS, parent, self.spin)

    def _handshake(self, w: _Worker) -> dict:
        reply = self._recv(w, self.start_timeout)
        if reply is None or not reply.startswith(b"H"):
            why = (reply[1:].decode(errors="replace") if reply else
                   f"exited with status {w.proc.poll()}" if w.proc.poll() is not None else "did not answer")
            raise WorkerError(f"NLEPool worker {w.index} ({self.task}) failed to start:\n{why}")
        return json.loads(reply[1:])

    def _recv(self, w: _Worker, timeout: float) -> Optional[bytes]:
        """One reply from ``w``, or None if it died or stayed silent for ``timeout`` seconds."""
        try:
            w.sock.settimeout(max(timeout, 1e-3))
            return W.recv_msg(w.sock)
        except (EOFError, OSError):  # OSError includes socket.timeout
            return None

    def _kill(self, w: _Worker) -> None:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()
        if w.proc is not None:
            w.proc.wait()
        if w.sock is not None:
            w.sock.close()
        w.proc = w.sock = None

    def _restart(self, w: _Worker, why: str) -> None:
        """Restarts ``w`` with fresh envs. Every episode it was playing is cut: each group's cut is reported as
        truncated at that group's next :meth:`recv` (the one running now, for the group whose step failed)."""
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"NLEPool: worker {w.index} failed ({why}) and the pool already restarted "
                               f"{self.max_restarts} workers; giving up. Fix: check the env, or raise max_restarts")
        warnings.warn(f"NLEPool: worker {w.index} (envs {w.envs}) {why}; restarting it with fresh envs and "
                      "reporting their episodes as truncated", RuntimeWarning, stacklevel=3)
        v = self._v
        for g in range(self.num_groups):  # keep what the cut episodes reached before the new worker overwrites it
            s = w.slice(g)
            if self._last_obs is not None:
                self._cut[g].append((w, s, v["run_return"][s].copy(), v["run_length"][s].copy(),
                                     v["run_depth"][s].copy()))
            # a group in flight: the new worker never got its step (nothing to wait for) and must not be
            # restarted again for a send that failed on the old one
            if g in self._sent:
                self._sent[g] = [(x, q) for x, q in self._sent[g] if x is not w]
            if g in self._send_failed:
                self._send_failed[g] = [f for f in self._send_failed[g] if f[0] is not w]
            v["episode_index"][s] += 1  # the cut episodes count as played: fresh seeds for the new ones
        self._kill(w)
        self._launch(w)
        self._handshake(w)

    def _send(self, code: int, workers) -> tuple[list, list]:
        """Queues ``code`` for ``workers``; returns ``([(worker, its command's sequence number)], failed)``."""
        sent, failed = [], []
        for w in workers:
            row = self._v["ctl/seq"][w.index]
            seq = w.seq + 1
            self._v["ctl/cmd"][w.index, seq % W.RING] = code
            row[W.CMD_SEQ] = w.seq = seq
            try:
                if self.spin == 0 or row[W.WORKER_WAITS]:
                    w.sock.sendall(W.WAKE)
                elif w.proc.poll() is not None:
                    raise OSError("exited")
                sent.append((w, seq))
            except OSError:
                failed.append((w, "died (could not send)"))
        return sent, failed

    def _wait(self, sent_failed) -> list[tuple[_Worker, str]]:
        sent, failed = sent_failed
        deadline = time.monotonic() + self.step_timeout
        for w, seq in sent:
            try:
                done = w.waiter.wait(seq, max(deadline - time.monotonic(), 1e-3))
            except (EOFError, OSError):
                code = w.proc.wait() if w.proc is not None else None
                failed.append((w, f"died (exit status {code})"))
                continue
            if not done:
                failed.append((w, f"did not answer within step_timeout={self.step_timeout}s"))
            elif self._v["ctl/status"][w.index, seq % W.RING]:
                failed.append((w, "raised an error:\n" + self._error_text(w)))
        return failed

    def _error_text(self, w: _Worker) -> str:
        """The traceback a worker sent for a failed command (wake bytes before it are skipped)."""
        while True:
            reply = self._recv(w, 5.0)
            if reply is None:
                return "(no traceback: the worker went silent)"
            if reply[:1] == b"E":
                return reply[1:].decode(errors="replace")

    # -- host-env interface ----------------------------------------------------------------------------------
    def observation_spec(self) -> dict:
        return {k: (tuple(s), np.dtype(d)) for k, (s, d) in self._spec.items()}

    @property
    def worker_pids(self) -> list[Optional[int]]:
        return [w.proc.pid if w.proc is not None else None for w in self._workers]

    @property
    def shm_name(self) -> Optional[str]:
        return self._shm_box[0].name if self._shm_box else None

    def _obs(self, prefix: str, envs: slice = slice(None)) -> dict:
        return {k: self._v[prefix + k][envs].copy() for k in self.obs_keys}

    def reset(self) -> dict:
        """Starts a new episode in every env (episode counters go on, so seeds are fresh) and returns the batch.
        Steps still in flight (:meth:`send` without :meth:`recv`) are waited for and dropped."""
        self._check_open()
        while self._queue:
            self.recv()
        v = self._v
        if self._last_obs is not None:
            v["episode_index"] += 1
        sent = self._send(W.CMD_RESET, self._workers)
        if self._local is not None:
            self._local.reset()
        for w, why in self._wait(sent):
            self._restart(w, why)
        self._cut = {g: [] for g in range(self.num_groups)}  # every episode starts afresh
        self._last_obs = self._obs("obs/")
        return {k: x.copy() for k, x in self._last_obs.items()}

    def step(self, actions):
        """Steps every env; returns ``(obs, reward, terminated, truncated, info)`` as numpy arrays ``[num_envs]``."""
        actions = self._check_actions(actions, self.num_envs)
        B = self.group_size
        for g in range(self.num_groups):
            self._start(g, actions[g * B:(g + 1) * B])
        out = [self.recv(g) for g in range(self.num_groups)]
        if len(out) == 1:
            return out[0]
        return tuple(_concat([o[i] for o in out]) for i in range(5))

    def send(self, actions, group: int = 0) -> None:
        """Starts a step of group ``group`` (envs ``[group * group_size, (group + 1) * group_size)``) with
        ``actions`` ``[group_size]`` and returns at once (after stepping the group's ``host_envs``, if any);
        :meth:`recv` gets its results. Groups are received in the order they were sent; a group can have one step
        in flight. With two groups, the host computes one group's next actions while the workers step the other,
        and the workers never wait between steps::

            pool.send(policy(obs[0]), 0); pool.send(policy(obs[1]), 1)
            while training:
                for g in (0, 1):
                    obs[g], reward, terminated, truncated, info = pool.recv(g)
                    pool.send(policy(obs[g]), g)
        """
        if not 0 <= group < self.num_groups:
            raise ValueError(f"group: must be in [0, {self.num_groups}), got {group}")
        self._start(group, self._check_actions(actions, self.group_size))

    def _start(self, group: int, actions: np.ndarray) -> None:
        if group in self._queue:
            raise RuntimeError(f"NLEPool.send: group {group} already has a step in flight. Fix: recv({group}) "
                               "before sending it again")
        B = self.group_size
        self._v["action"][group * B:(group + 1) * B] = actions
        restarted = {c[0] for c in self._cut[group]}  # their envs here are fresh: no step, reported as cut
        sent, failed = self._send(group, [w for w in self._workers if w not in restarted])
        self._queue.append(group)
        self._sent[group], self._send_failed[group] = sent, failed
        if self._local is not None:  # the host's own envs, while the workers step theirs
            try:
                self._local.step(group)
            except Exception as e:  # not a worker to restart: the step is withdrawn and the error raised
                self._queue.pop()
                for w, why in self._wait((self._sent.pop(group), self._send_failed.pop(group))):
                    self._restart(w, why)
                raise RuntimeError(f"NLEPool: stepping group {group}'s host envs failed ({e!r}); the step is "
                                   "withdrawn (workers' envs of the group did step). Fix: check the env, or "
                                   "pass host_envs=0 to keep every env in a worker process") from e

    def recv(self, group: Optional[int] = None):
        """Waits for the oldest step in flight (``group``, if given, must be that one) and returns its
        ``(obs, reward, terminated, truncated, info)``, arrays ``[group_size]`` (see :meth:`send`)."""
        self._check_open()
        if not self._queue:
            raise RuntimeError("NLEPool.recv: no step in flight. Fix: send(actions, group) first")
        g = self._queue[0]
        if group is not None and group != g:
            raise ValueError(f"NLEPool.recv: group {group} requested but group {g} was sent first. Fix: receive "
                             "groups in the order they were sent")
        failed = self._wait((self._sent[g], self._send_failed.pop(g)))
        self._queue.popleft()
        del self._sent[g]
        for w, why in failed:
            self._restart(w, why)
        return self._results(g)

    def _results(self, g: int):
        v, B = self._v, self.group_size
        gs = slice(g * B, (g + 1) * B)
        obs = self._obs("obs/", gs)
        ended = v["episode_done"][gs]
        cut, self._cut[g] = self._cut[g], []
        if ended.any() or cut:  # workers write final/* only where an episode ended
            mask = ended.copy()
            for _, s, *_ in cut:
                mask[s.start - gs.start:s.stop - gs.start] = False
            final = {k: np.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), v["final/" + k][gs], x)
                     for k, x in obs.items()}
        else:  # the common step: no episode ended, final_obs is obs (new copies: callers may write to either)
            final = {k: x.copy() for k, x in obs.items()}
        reward = v["reward"][gs].copy()
        terminated, truncated = v["terminated"][gs].copy(), v["truncated"][gs].copy()
        info = {"episode_done": ended.copy()}
        info.update({k: v[k][gs].astype(np.float32) for k in W.STAT_KEYS[:-1]})
        if self.has_success:
            info["episode_success"] = v["episode_success"][gs].astype(np.float32)
        for _, s, ret, length, depth in cut:
            h = slice(s.start - gs.start, s.stop - gs.start)  # the cut envs, within the group
            for k in self.obs_keys:
                final[k][h] = self._last_obs[k][s]
            reward[h], terminated[h], truncated[h] = 0.0, False, True
            info["episode_done"][h] = True
            info["episode_return"][h], info["episode_length"][h], info["episode_depth"][h] = ret, length, depth
            info["episode_score"][h] = self._last_obs["blstats"][s, W.BL_SCORE] if "blstats" in obs else 0
            if self.has_success:
                info["episode_success"][h] = 0.0
        info["final_obs"] = final
        for k, x in obs.items():
            self._last_obs[k][gs] = x
        return obs, reward, terminated, truncated, info

    def _check_actions(self, actions, n: int) -> np.ndarray:
        self._check_open()
        if self._last_obs is None:
            raise RuntimeError("NLEPool.step/send called before reset(). Fix: call reset() first")
        actions = np.asarray(actions).reshape(-1)
        if actions.shape[0] != n:
            raise ValueError(f"actions: expected {n} actions, got shape {np.shape(actions)}")
        if actions.min() < 0 or actions.max() >= self.num_actions:
            raise ValueError(f"actions: must lie in [0, {self.num_actions}), got {actions.min()}..{actions.max()}")
        return actions

    def _check_open(self):
        if not self._shm_box:
            raise RuntimeError("NLEPool is closed")

    def close(self) -> None:
        """Stops the workers, closes the host's envs and frees the shared memory (idempotent)."""
        self._v = {}
        self._local = None  # its envs hold views of the segment: they go (closed by the finaliser) before it does
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"NLEPool({self.task!r}, num_envs={self.num_envs}, num_workers={self.num_workers}, "
                f"obs_keys={self.obs_keys})")


def _concat(parts):
    """Concatenates the groups' results (arrays or dicts of arrays) along the env axis."""
    if isinstance(parts[0], dict):
        return {k: _concat([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """How a NetHack/MiniHack pool steps its envs, and how the host loop drives it (defaults for 2 CPU cores)."""
    num_workers: int = 0
    """Env worker processes (0: one per CPU core, less one if host-envs > 0)."""
    host_envs: int = -1
    """Envs per group stepped by the training process itself while the workers step theirs (NLEPool host_envs):
    on few cores the host then works instead of waiting, and one worker process fewer shares the cores; those envs
    are not isolated in a worker process. -1 (auto), on machines with at most 2 cores unless num-workers is given:
    3/8 of a group (at least 1, at most all but one: 3 of 8, the best of 2, 3, 4 there, since the host also runs the
    policy and the pool's bookkeeping); else 0."""
    obs_keys: tuple[str, ...] = ("glyphs_crop", "blstats", "message")
    """Observation keys the pool produces (from glyphs, glyphs_crop, chars, chars_crop, blstats, message)."""
    crop: int = 9
    """Side of the glyph crop around the agent (odd)."""
    max_episode_steps: int = 0
    """Episode step limit (0: the task's default: 5000 NetHack, task-specific MiniHack)."""
    env_groups: int = 2
    """Split the envs into this many groups and pipeline collection: the policy acts on one group while the
    workers step the other (2: neither the workers nor the learner wait within a rollout; see NLEPool.send)."""
    overlap: bool = False
    """Collect the next rollout while the previous one is learned from (one update of policy lag)."""
    actor_device: int = -1
    """Index in jax.devices() of the device the policy acts on (-1: the learner's). With two accelerators,
    --actor-device 1 acts on the second while the first learns, which is what lets --overlap overlap; the
    rollout moves to the learner in one transfer per update."""

    def __post_init__(self):
        from envs.errors import require
        bad = [k for k in self.obs_keys if k not in W.OBS_KEYS]
        require(not bad and len(self.obs_keys) > 0, "obs_keys", f"unknown keys {bad}",
                f"choose from {' '.join(W.OBS_KEYS)}")
        require(self.crop >= 1 and self.crop % 2 == 1, "crop", f"must be odd and positive, got {self.crop}",
                "pass e.g. --crop 9")
        require(self.max_episode_steps >= 0, "max_episode_steps", f"must be >= 0, got {self.max_episode_steps}",
                "pass 0 for the task's default")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}",
                "pass e.g. --num-workers 0")
        require(self.actor_device >= -1, "actor_device", f"must be -1 (the learner's device) or a device index, got "
                f"{self.actor_device}", "pass --actor-device -1")

    def check(self, num_envs: int) -> None:
        """Checks the settings that depend on the pool's size."""
        from envs.errors import require
        require(self.env_groups >= 1 and num_envs % self.env_groups == 0, "env_groups",
                f"must be >= 1 and divide num_envs={num_envs}, got {self.env_groups}",
                "pass --env-groups 1, or 2 with an even --num-envs")
        per_group = num_envs // self.env_groups
        require(-1 <= self.host_envs <= per_group, "host_envs",
                f"must be -1 (auto) or in [0, num_envs / env_groups = {per_group}], got {self.host_envs}",
                "pass --host-envs -1 (auto) or 0 (every env in a worker process)")
        host = self.resolved_host_envs(num_envs)
        require(0 <= self.num_workers <= per_group - host, "num_workers",
                f"must be in [0, num_envs / env_groups - host_envs = {per_group - host}], got "
                f"{self.num_workers}", "pass e.g. --num-workers 0")

    def resolved_host_envs(self, num_envs: int) -> int:
        """``host_envs`` with -1 (auto) resolved for this machine (at most the envs in a group)."""
        if self.host_envs >= 0:
            return self.host_envs
        auto = (os.cpu_count() or 1) <= 2 and self.num_workers == 0  # an explicit --num-workers means no host envs
        per_group = num_envs // self.env_groups
        return min(max(1, 3 * per_group // 8), per_group - 1) if auto else 0

    def make_pool(self, env_name: str, num_envs: int, seed: int = 0, **pool_kwargs) -> "NLEPool":
        """The pool these settings describe (close it when done); ``pool_kwargs`` go to :class:`NLEPool`."""
        self.check(num_envs)
        env_kwargs = {"max_episode_steps": self.max_episode_steps} if self.max_episode_steps else {}
        return make(env_name, num_envs=num_envs, seed=seed, num_workers=self.num_workers or None,
                    obs_keys=self.obs_keys, crop=(self.crop, self.crop), env_kwargs=env_kwargs,
                    num_groups=self.env_groups, host_envs=self.resolved_host_envs(num_envs), **pool_kwargs)


def make(name: str, num_envs: Optional[int] = None, **kwargs) -> NLEPool:
    """The pool for ``envs.make``: ``num_envs=None`` means one env (still batched ``[1, ...]``)."""
    return NLEPool(name, num_envs=1 if num_envs is None else num_envs, **kwargs)


def random_policy_return(name: str, num_envs: int = 16, seed: int = 100, steps: int = 400,
                         action_seed: int = 0) -> float:
    """The mean return of the episodes a uniformly random policy finishes in ``steps`` batched steps of a
    ``num_envs`` pool of ``name`` (pool seed ``seed``, actions from ``default_rng(action_seed)``): the baseline a
    MiniHack learning curve is read against."""
    pool = make(name, num_envs=num_envs, seed=seed)
    try:
        pool.reset()
        rng = np.random.default_rng(action_seed)
        rets = []
        for _ in range(steps):
            *_, info = pool.step(rng.integers(pool.num_actions, size=num_envs))
            rets += list(info["episode_return"][info["episode_done"]])
    finally:
        pool.close()
    return float(np.mean(rets))
