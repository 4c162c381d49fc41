"""Worker side of the NetHack/MiniHack env pool (:class:`envs.nethack.NLEPool`), plus what both sides share.

This file is deliberately standalone (numpy, gymnasium and nle/minihack only; no ``envs``/``jax`` imports): the pool
starts each worker as ``python nle_worker.py FD CONFIG_JSON``, so a worker starts in well under a second, never
imports JAX, and is never forked from a process that already runs JAX threads.

Protocol. Commands and their completion go through a control block in the shared segment (one 64-byte row of
counters per worker, :func:`layout`): the host writes the command code into the worker's ring ``ctl/cmd`` and
bumps ``CMD_SEQ``; the worker runs it, writes its status and bumps ``DONE_SEQ``. Commands queue up (the ring holds
:data:`RING`), so the host can hand a worker the next group while it still steps the current one. Codes: a group
index ``g`` (step the worker's envs of group ``g`` with the actions in shared memory) or :data:`CMD_RESET`. The
pool stops a worker by shutting its socket down.

How a side waits for the other (:class:`Waiter`), by ``spin`` (seconds):

* ``spin > 0`` (x86-64, the default there): poll the counter, yielding the core between polls, for up to ``spin``
  seconds; only then sleep on the socket, after raising a flag in the control block that tells the other side to
  send one wake byte ``b"W"``. On a VM a socket wake-up across cores costs ~60 us each way (an IPI to a halted
  vCPU); a shared-memory poll sees the other side within ~1 us, and a step of a few envs takes ~100 us.
* ``spin == 0`` (other CPUs: their memory model does not order the plain stores to shared memory that polling
  relies on): every command and every completion is also announced with one ``b"W"`` on the socket, and each side
  sleeps until it arrives -- the socket's system calls order memory.

The socket (one stream socket per worker; :func:`send_msg` / :func:`recv_msg`) also carries the start-up
handshake ``b"H" + JSON``, the traceback ``b"E" + text`` of a command that failed (after its ``W``, if any), and
end-of-file when either side is gone -- a sleeping side notices a dead peer at once.

All data -- actions, observations, final observations, rewards, flags, episode statistics, the running statistics of
unfinished episodes and each env's episode counter -- lives in one shared-memory segment laid out by :func:`layout`;
a worker writes only its own slices ``[start, start + count)`` (one per group) of every array.
"""
from __future__ import annotations

import json
import os
import platform
import select
import socket
import sys
import time
import traceback

import numpy as np

if __name__ == "__main__":  # run as a script: do not let envs/*.py shadow top-level modules
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

DUNGEON_SHAPE = (21, 79)
NUM_BLSTATS = 27
MESSAGE_LEN = 256
BL_X, BL_Y, BL_SCORE, BL_DEPTH = 0, 1, 9, 12  # nle.nethack.NLE_BL_* indices
PAD_GLYPH = 5976  # nle.nethack.MAX_GLYPH: "outside the map" in glyph crops
PAD_CHAR = ord(" ")
STATUS_ABORTED, STATUS_SUCCESS = -1, 2  # NLE StepStatus.ABORTED (time limit) and TASK_SUCCESSFUL

OBS_KEYS = ("glyphs", "glyphs_crop", "chars", "chars_crop", "blstats", "message")
STAT_KEYS = ("episode_return", "episode_length", "episode_depth", "episode_score", "episode_success")


WITH_PAYLOAD = b"HE"  # message codes followed by a length and a payload
WAKE = b"W"

# the control block: one row of int64 counters per worker (a row is 64 bytes: no false sharing between workers)
CMD_SEQ, DONE_SEQ, WORKER_WAITS, HOST_WAITS = 0, 1, 2, 3
RING = 64  # commands a worker can have queued (ctl/cmd and ctl/status are rings indexed by sequence % RING)
CMD_RESET = 255  # the command code besides group indices (0 ... MAX_GROUPS - 1)
MAX_GROUPS = RING // 2
# polling shared memory is safe where plain stores are seen in program order (x86's TSO)
SPIN_DEFAULT = 1e-3 if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") else 0.0


def send_msg(sock, code: bytes, payload: bytes = b"") -> None:
    """Sends one message (``code``: one byte; ``payload``: any bytes for the codes in :data:`WITH_PAYLOAD`, none
    for the others)."""
    if code in WITH_PAYLOAD:
        sock.sendall(code + len(payload).to_bytes(4, "little") + payload)
    else:
        assert not payload, (code, payload)
        sock.sendall(code)


def _recv_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the peer closed the socket")
        data += chunk
    return data


def recv_msg(sock) -> bytes:
    """One message as ``code + payload``; EOFError when the peer is gone (socket timeouts propagate)."""
    code = _recv_exact(sock, 1)
    if code in WITH_PAYLOAD:
        return code + _recv_exact(sock, int.from_bytes(_recv_exact(sock, 4), "little"))
    return code


class PeerGone(EOFError):
    """The other side closed its socket (it exited or was killed)."""


class Waiter:
    """Waits for counter ``row[index]`` to reach a target, as the module docstring describes: by polling for up
    to ``spin`` seconds, then asleep on ``sock`` with flag ``row[flag]`` raised (``spin == 0``: asleep at once,
    until the peer's ``b"W"`` for this command)."""

    def __init__(self, row: np.ndarray, index: int, flag: int, sock, spin: float):
        self.row, self.index, self.flag, self.sock, self.spin = row, index, flag, sock, float(spin)

    def wait(self, target: int, timeout: float | None = None) -> bool:
        """True once the counter reached ``target``; False after ``timeout`` seconds; :class:`PeerGone` if the
        peer's socket closed. Stops early, returning True, when an error message (``b"E"``) is waiting."""
        row, i = self.row, self.index
        if self.spin > 0:
            if row[i] >= target:
                return True
            end = time.perf_counter() + self.spin
            while True:
                os.sched_yield()  # a peer on this core runs now; else this only costs a system call
                if row[i] >= target:
                    return True
                if time.perf_counter() > end:
                    break
        deadline = None if timeout is None else time.monotonic() + timeout
        row[self.flag] = 1
        try:
            while True:
                if self.spin > 0 and row[i] >= target:
                    return True
                # polling: a 2 ms cap bounds the rare lost wake-up (flag and counter are plain stores)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                cap = 2e-3 if self.spin > 0 else 0.25
                ready, _, _ = select.select([self.sock], [], [], cap if left is None else min(cap, left))
                if not ready:
                    continue
                head = self.sock.recv(1, socket.MSG_PEEK)
                if not head:
                    raise PeerGone("the peer closed the socket")
                if head != WAKE:  # an error message: the caller reads it
                    return True
                self.sock.recv(1)
                if self.spin == 0:  # one wake byte per command
                    return True
        finally:
            row[self.flag] = 0


def notify(row: np.ndarray, flag: int, sock, spin: float) -> None:
    """Tells the peer a counter moved: with ``spin == 0`` always (one ``b"W"`` per command), else only if it
    sleeps (its flag is up)."""
    if spin == 0 or row[flag]:
        sock.sendall(WAKE)


def obs_spec(keys, crop=(9, 9)) -> dict:
    """``{key: (shape, dtype name)}`` for one env's observation."""
    shapes = {"glyphs": (DUNGEON_SHAPE, "int16"), "glyphs_crop": (tuple(crop), "int16"),
              "chars": (DUNGEON_SHAPE, "uint8"), "chars_crop": (tuple(crop), "uint8"),
              "blstats": ((NUM_BLSTATS,), "int32"), "message": ((MESSAGE_LEN,), "uint8")}
    return {k: shapes[k] for k in keys}


def layout(num_envs: int, keys, crop=(9, 9), num_workers: int = 1) -> tuple[list[tuple[str, tuple, str, int]], int]:
    """The shared segment's arrays as ``[(name, shape, dtype, byte offset)]`` and its total size."""
    n, w = int(num_envs), int(num_workers)
    arrays = [("ctl/seq", (w, 8), "int64"), ("ctl/cmd", (w, RING), "uint8"), ("ctl/status", (w, RING), "uint8"),
              ("action", (n,), "int32"), ("reward", (n,), "float32"), ("terminated", (n,), "bool"),
              ("truncated", (n,), "bool"), ("episode_done", (n,), "bool"),
              ("episode_return", (n,), "float32"), ("episode_length", (n,), "int32"),
              ("episode_depth", (n,), "int32"), ("episode_score", (n,), "int32"),
              ("episode_success", (n,), "bool"),
              ("run_return", (n,), "float32"), ("run_length", (n,), "int32"), ("run_depth", (n,), "int32"),
              ("episode_index", (n,), "int64")]
    for k, (shape, dtype) in obs_spec(keys, crop).items():
        arrays += [("obs/" + k, (n,) + shape, dtype), ("final/" + k, (n,) + shape, dtype)]
    out, offset = [], 0
    for name, shape, dtype in arrays:
        out.append((name, shape, dtype, offset))
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        offset += -(-size // 64) * 64  # 64-byte aligned, so neighbouring arrays never share a cache line
    return out, max(offset, 64)


def views(buf, lay) -> dict[str, np.ndarray]:
    return {name: np.ndarray(shape, dtype, buffer=buf, offset=off) for name, shape, dtype, off in lay}


def episode_seeds(seed: int, env_index: int, episode: int) -> tuple[int, int]:
    """NetHack (core, disp) RNG seeds of episode ``episode`` of env ``env_index`` in a pool seeded with ``seed``."""
    core, disp = np.random.SeedSequence([int(seed), int(env_index), int(episode)]).generate_state(2, np.uint32)
    return int(core), int(disp)


def is_minihack(task: str) -> bool:
    return task.startswith("MiniHack-")


def make_env(task: str, env_kwargs: dict | None = None, keys=OBS_KEYS):
    """One gymnasium NetHack/MiniHack env producing what observation ``keys`` need (NLE copies every key it
    produces on every step, so unneeded ones cost time)."""
    import gymnasium as gym
    import nle  # noqa: F401 -- registers NetHack*-v0
    if is_minihack(task):
        import minihack  # noqa: F401 -- registers MiniHack-*
    raw = ("glyphs", "blstats", "message") + (("chars",) if any(k.startswith("chars") for k in keys) else ())
    kwargs = {"observation_keys": raw}
    kwargs.update(env_kwargs or {})
    return gym.make(task, disable_env_checker=True, **kwargs)


class FastStep:
    """``NLE.step`` without the gym layer, for the tasks whose step it knows; same results, bit for bit.

    NLE's own ``step`` spends more time in Python than NetHack spends in C (on NetHackScore about 22 us of numpy
    scalar arithmetic, observation copies, a dict and an enum per step, against 24 us in the game): it copies every
    observation array to compute a score difference, and does the time penalty on numpy scalars. This replays
    ``nle.env.base.NLE.step`` (and ``minihack.MiniHack.step``) line for line on plain ints read from the game's
    (reused) observation buffers, and calls the task's own ``_is_episode_end``, ``_perform_known_steps`` and
    ``_quit_game`` where they do something. Rewards are computed here for the task families whose ``_reward_fn``
    it knows (score, staircase, gold, eat, MiniHack); any other ``_reward_fn`` gets the copied previous observation
    and is called as NLE calls it. :meth:`supports` refuses an env whose step machinery differs from NLE's (for
    example ``NetHackChallenge``'s abort rule) -- :class:`EnvSlot` then steps it through gym.
    ``tests/test_nethack.py`` checks observations, rewards and flags against gym's step, task by task.

    ``quit=False`` (what the pool's :class:`EnvSlot` uses) skips NLE's ``_quit_game`` where an episode ends by
    the task's rule or the step limit while the game still runs: NLE plays the game to its end there (several more
    game steps through the quit prompts, the tombstone and the score files; on MiniHack-Room about 0.7 ms, half a
    reset) only for the env to be reset right after, which NLE supports mid-game (``nle_end`` frees the running
    game). Reward, flags and status are unchanged; the observation returned is the one the episode ended on, not
    the one the quit sequence left behind in NLE's buffers (for a truncated episode, the state to bootstrap from).
    After such a step the env must be reset before it is stepped again.
    """

    REWARDS = {}  # _reward_fn -> kind, filled by _known()

    @classmethod
    def _known(cls):
        if not cls.REWARDS:
            from nle.env import base, tasks
            cls.BASE = base.NLE
            cls.REWARDS.update({tasks.NetHackScore._reward_fn: "score", tasks.NetHackStaircase._reward_fn: "stairs",
                                tasks.NetHackGold._reward_fn: "gold", tasks.NetHackEat._reward_fn: "eat"})
            cls.PENALTY = tasks.NetHackScore._get_time_penalty
            cls.STEPS = {base.NLE.step: False}
            try:
                import minihack
                cls.REWARDS[minihack.MiniHack._reward_fn] = "minihack"
                cls.STEPS[minihack.MiniHack.step] = True
            except ImportError:
                pass
        return cls

    @staticmethod
    def _wrappers(env) -> list | None:
        """The gym wrappers around the NLE env if all are ones this replays (``TimeLimit``, which
        ``max_episode_steps`` in ``gymnasium.make`` adds; ``OrderEnforcing``, a no-op after reset), else None."""
        from gymnasium.wrappers import OrderEnforcing, TimeLimit
        out = []
        while env is not env.unwrapped:
            if type(env) not in (TimeLimit, OrderEnforcing):
                return None
            out.append(env)
            env = env.env
        return out

    @classmethod
    def supports(cls, env) -> bool:
        u, k = env.unwrapped, cls._known()
        t = type(u)
        return (cls._wrappers(env) is not None and t.step in k.STEPS and t._check_abort is k.BASE._check_abort
                and t._get_end_status is k.BASE._get_end_status and t._get_time_penalty is k.PENALTY
                and t._perform_known_steps is k.BASE._perform_known_steps
                and not getattr(u, "remove_alignment_blstats", False) and not u.nethack._copy
                and u.penalty_mode in ("constant", "exp", "square", "linear", "always"))

    def __init__(self, env, quit: bool = True):
        from nle import nethack
        k = self._known()
        self.quit = quit
        self.u = u = env.unwrapped
        self.minihack = k.STEPS[type(u).step]
        self.kind = self.REWARDS.get(type(u)._reward_fn, "other")
        self.rm = getattr(u, "reward_manager", None)
        self.copy_prev = self.kind == "other" or self.rm is not None
        self.actions = [int(a) for a in u.actions]
        from gymnasium.wrappers import TimeLimit
        self.limits = [w for w in self._wrappers(env) if type(w) is TimeLimit]
        self.TIME, self.SCORE, self.GOLD = nethack.NLE_BL_TIME, nethack.NLE_BL_SCORE, nethack.NLE_BL_GOLD
        keys = u._observation_keys
        self.ib, self.ii, self.ip = u._blstats_index, u._internal_index, u._program_state_index
        self.index = {k: keys.index(k) for k in ("glyphs", "chars", "blstats", "message") if k in keys}
        # the game itself and NLE's observation buffers, which it rewrites in place on every step (supports()
        # admits no env that copies them): calling the game directly skips two Python frames per step
        self.game = u.nethack._pynethack
        self.buffers = u.nethack._obs
        self.sources = {k: self.buffers[i] for k, i in self.index.items()}  # key -> buffer, for EnvSlot
        self.blstats, self.internal, self.program = (self.buffers[i] for i in (self.ib, self.ii, self.ip))
        # NLE's own _is_episode_end (NetHack tasks) always says "running": no call needed
        self.episode_end = None if type(u)._is_episode_end is k.BASE._is_episode_end else u._is_episode_end

    def _penalty(self, old_time: int, new_time: int) -> float:
        """``NetHackScore._get_time_penalty`` on ints (it updates ``_frozen_steps`` the same way)."""
        u = self.u
        u._frozen_steps = u._frozen_steps + 1 if old_time == new_time else 0
        mode, f, penalty = u.penalty_mode, u._frozen_steps, 0
        if mode == "constant":
            if f > 0:
                penalty += u.penalty_step
        elif mode == "exp":
            penalty += 2 ** f * u.penalty_step
        elif mode == "square":
            penalty += f ** 2 * u.penalty_step
        elif mode == "linear":
            penalty += f * u.penalty_step
        else:  # "always" (supports() admits no other mode)
            penalty += u.penalty_step
        return penalty + (new_time - old_time) * u.penalty_time

    def step(self, action: int):
        """One step; returns ``(observation buffers by key, reward, done, truncated, end_status as int)``, with
        the meanings of ``NLE.step``'s returns."""
        _, reward, done, truncated, status = self.step_blstats(action)
        return dict(self.sources), reward, done, truncated, status

    def step_blstats(self, action: int):
        """:meth:`step` for the pool's workers: returns ``(blstats as a list of ints, reward, done, truncated,
        end_status)``; the observation is in :attr:`sources` (NLE's buffers, by key). The blstats are those of the
        observation the episode ended on even where the quit sequence (``quit=True``) then ran."""
        u, game = self.u, self.game
        last = u.last_observation
        bl_old = last[self.ib].tolist()
        hunger_old = int(last[self.ii][7]) if self.kind == "eat" else 0
        prev = tuple(a.copy() for a in last) if self.copy_prev else None
        if self.minihack:
            u._previous_obs, u._previous_action = prev, action
        game.step(self.actions[action])  # NLE's Nethack.step without its two Python frames
        observation, done = self.buffers, game.done()
        truncated = u._steps >= u._max_episode_steps
        if self.program[0] == 1 or not u._allow_all_modes:
            internal = self.internal
            if not done and (internal[1] or internal[2] or internal[3]):  # otherwise the loop would just break
                observation, done = u._perform_known_steps(observation, done, exceptions=True)
        u._steps += 1
        u.last_observation = observation
        if u._steps >= u._max_episode_steps:
            status = -1
        else:
            status = 0 if self.episode_end is None else int(self.episode_end(observation))
        status = 1 if done else status  # StepStatus(done or end_status)
        bl = self.blstats.tolist()
        reward = self._reward(bl_old, bl, hunger_old, prev, action, observation, status)
        if status and not done:
            if self.quit:
                u._quit_game(observation, done)
            done = True
        for w in self.limits:  # gymnasium's TimeLimit.step
            w._elapsed_steps += 1
            truncated = truncated or w._elapsed_steps >= w._max_episode_steps
        return bl, reward, done, truncated, status

    def _reward(self, bl_old, bl, hunger_old, prev, action, observation, status) -> float:
        u, kind = self.u, self.kind
        if kind == "other":
            return float(u._reward_fn(prev, action, observation, u.StepStatus(status)))
        if kind == "stairs" or kind == "minihack":
            if kind == "minihack" and self.rm is not None:
                r = self.rm.collect_reward()
            elif status == 2:  # TASK_SUCCESSFUL
                r = 1 if kind == "stairs" else u.reward_win
            elif status == 0 or kind == "stairs":
                r = 0
            else:  # death or aborted
                r = u.reward_lose
            return float(r + self._penalty(bl_old[self.TIME], bl[self.TIME]))
        if kind == "score":  # the score difference is 0 outside a normal game; the penalty always counts
            r = bl[self.SCORE] - bl_old[self.SCORE] if self.game.in_normal_game() else 0.0
            return float(r + self._penalty(bl_old[self.TIME], bl[self.TIME]))
        if not self.game.in_normal_game():  # gold and eat return before the penalty
            return 0.0
        if kind == "gold":
            r = bl[self.GOLD] - bl_old[self.GOLD]
        else:  # eat
            r = max(0, int(self.internal[7]) - hunger_old)
        return float(r + self._penalty(bl_old[self.TIME], bl[self.TIME]))


class EnvSlot:
    """One env of a worker: steps it and writes its observations into index ``i`` of the shared arrays ``v``
    (``obs/*``: the next observation to act on; ``final/*``: the observation an episode ended on, written only
    then), its step's reward and flags, and its running episode statistics; resets it when an episode ends."""

    def __init__(self, env, i: int, v: dict, keys, seed: int):
        self.env, self.i, self.v, self.keys, self.seed = env, i, v, tuple(keys), seed
        self.base = env.unwrapped
        self.fast = FastStep(env, quit=False) if FastStep.supports(env) else None  # reset after every end
        self.ret, self.length, self.depth = 0.0, 0, 0
        # per prefix: [(source key, destination)] copied whole, and [(source key, board middle, board, h, w,
        # destination)] cropped. A crop's source is copied into the middle of a board padded by half the crop on
        # each side, so the window around the agent at (x, y) is board[y:y + h, x:x + w]: no bounds arithmetic
        self.whole, self.crops = {}, {}
        boards = {}
        for k in keys:
            if k.endswith("_crop"):
                h, w = v["obs/" + k].shape[1:]
                pad = PAD_GLYPH if k == "glyphs_crop" else PAD_CHAR
                board = np.full((DUNGEON_SHAPE[0] + h - 1, DUNGEON_SHAPE[1] + w - 1), pad, v["obs/" + k].dtype)
                boards[k] = (board[h // 2:h // 2 + DUNGEON_SHAPE[0], w // 2:w // 2 + DUNGEON_SHAPE[1]], board, h, w)
        for p in ("obs/", "final/"):
            self.whole[p] = [(k, v[p + k][i]) for k in keys if not k.endswith("_crop")]
            self.crops[p] = [(k[:-5],) + boards[k] + (v[p + k][i],) for k in keys if k.endswith("_crop")]
        # the per-step arrays, of which this env writes cell i one value at a time
        self.flags = tuple(v[k] for k in ("reward", "terminated", "truncated", "episode_done"))
        self.running = tuple(v[k] for k in ("run_return", "run_length", "run_depth"))

    def write(self, obs, x: int, y: int, prefix: str):
        """Writes observation ``obs`` (key -> array; the agent at ``x, y``) into the ``prefix`` arrays."""
        for src, dst in self.whole[prefix]:
            dst[...] = obs[src]
        for src, middle, board, h, w, dst in self.crops[prefix]:
            middle[...] = obs[src]
            dst[...] = board[y:y + h, x:x + w]

    def _publish_running(self):
        ret, length, depth = self.running
        i = self.i
        ret[i], length[i], depth[i] = self.ret, self.length, self.depth

    def reset(self):
        v, i = self.v, self.i
        self.base.seed(*episode_seeds(self.seed, i, v["episode_index"][i]), reseed=False)
        obs, _ = self.env.reset()
        bl = obs["blstats"]
        self.write(obs, int(bl[BL_X]), int(bl[BL_Y]), "obs/")
        self.ret, self.length, self.depth = 0.0, 0, int(bl[BL_DEPTH])
        self._publish_running()

    def step(self, action: int) -> None:
        """Steps once and writes the results at index ``i``: ``obs/*`` (or ``final/*`` if the episode ended),
        reward, flags and running statistics. On an episode's end also writes its ``episode_*`` statistics and
        resets the env (``obs/*`` then holds the next episode's first observation)."""
        if self.fast is not None:
            bl, reward, done, truncated, status = self.fast.step_blstats(action)
            obs = self.fast.sources
        else:
            obs, reward, done, truncated, info = self.env.step(action)
            status = int(info.get("end_status", 0))
            bl = obs["blstats"].tolist()
        truncated = bool(truncated) or status == STATUS_ABORTED
        terminated = bool(done) and not truncated
        ended = terminated or truncated
        self.write(obs, bl[BL_X], bl[BL_Y], "final/" if ended else "obs/")
        self.ret += reward
        self.length += 1
        if bl[BL_DEPTH] > self.depth:
            self.depth = bl[BL_DEPTH]
        r, te, tr, en = self.flags
        i = self.i
        r[i], te[i], tr[i], en[i] = reward, terminated, truncated, ended
        if ended:
            v = self.v
            v["episode_return"][i] = self.ret
            v["episode_length"][i] = self.length
            v["episode_depth"][i] = self.depth
            v["episode_score"][i] = bl[BL_SCORE]
            v["episode_success"][i] = status == STATUS_SUCCESS
            v["episode_index"][i] += 1
            self.reset()
        else:
            self._publish_running()


class Worker:
    """A worker's envs: group ``g`` is the slots in ``groups[g] = (start, slots)``, i.e. the pool's envs
    ``[start, start + len(slots))``, stepped in order."""

    def __init__(self, groups: list, v: dict):
        self.v = v
        self.groups = [(slice(start, start + len(slots)), slots) for start, slots in groups]
        self.slots = [s for _, slots in groups for s in slots]

    @classmethod
    def build(cls, task: str, env_kwargs: dict, keys, seed: int, groups, v: dict, made: list) -> "Worker":
        """New envs of ``task`` for the pool's envs ``[start, start + count)`` of each ``(start, count)`` in
        ``groups``, written into the shared arrays ``v``. Each slot is appended to ``made`` as soon as it exists,
        so the caller can close what was built (:func:`close_envs`) if a later env fails to start."""
        out = []
        for start, count in groups:
            group = []
            for j in range(count):
                group.append(EnvSlot(make_env(task, env_kwargs, keys), start + j, v, keys, seed))
                made.append(group[-1])
            out.append((start, group))
        return cls(out, v)

    def spec(self) -> dict:
        """What the host needs to know about the task: its number of actions and whether it defines success."""
        env = self.slots[0].env
        return {"num_actions": int(env.action_space.n), "has_success": has_success(env)}

    def reset(self):
        for s in self.slots:
            s.reset()

    def step(self, group: int):
        sl, slots = self.groups[group]
        for s, a in zip(slots, self.v["action"][sl].tolist()):
            s.step(a)


def close_envs(slots: list) -> None:
    """Closes (and removes from ``slots``) every slot's env, going on past any that fails to close: what is left
    is being torn down either way."""
    while slots:
        try:
            slots.pop().env.close()
        except Exception:
            pass


def has_success(env) -> bool:
    """Whether the task defines success (NLE's StepStatus has TASK_SUCCESSFUL: Staircase*, Oracle, MiniHack)."""
    return hasattr(type(env.unwrapped).StepStatus, "TASK_SUCCESSFUL")


def _attach(name: str):
    """Attaches to the host's segment without registering it with a resource tracker: the host owns (and unlinks)
    it; a tracker here would unlink it when this worker dies."""
    from multiprocessing import resource_tracker, shared_memory
    resource_tracker.register = lambda *a, **k: None
    resource_tracker.unregister = lambda *a, **k: None
    return shared_memory.SharedMemory(name=name, create=False)


def main(fd: int, cfg: dict) -> int:
    sock = socket.socket(fileno=fd)
    shm, v, slots = None, None, []
    try:
        try:
            shm = _attach(cfg["shm"])
            lay, _ = layout(cfg["num_envs"], cfg["obs_keys"], cfg["crop"], cfg["num_workers"])
            v = views(shm.buf, lay)
            worker = Worker.build(cfg["task"], cfg["env_kwargs"], cfg["obs_keys"], cfg["seed"], cfg["groups"], v,
                                  slots)
            worker.reset()
            hello = {**worker.spec(), "pid": os.getpid()}
            send_msg(sock, b"H", json.dumps(hello).encode())
        except Exception:
            send_msg(sock, b"E", traceback.format_exc().encode())
            return 1
        index, spin = cfg["worker"], float(cfg["spin"])
        row, cmds, status = v["ctl/seq"][index], v["ctl/cmd"][index], v["ctl/status"][index]
        waiter = Waiter(row, CMD_SEQ, WORKER_WAITS, sock, spin)
        seq = int(row[DONE_SEQ])
        while True:
            seq += 1
            waiter.wait(seq)
            code = int(cmds[seq % RING])
            error = None
            try:
                if code == CMD_RESET:
                    worker.reset()
                elif code < MAX_GROUPS:
                    worker.step(code)
                else:
                    raise ValueError(f"unknown command {code}")
            except Exception:
                error = traceback.format_exc().encode()
            status[seq % RING] = error is not None
            row[DONE_SEQ] = seq
            notify(row, HOST_WAITS, sock, spin)
            if error is not None:
                send_msg(sock, b"E", error)
    except (EOFError, OSError):  # the host closed the socket (the pool's close) or went away
        return 0
    finally:
        close_envs(slots)
        del v  # views must go before the buffer can be closed
        if shm is not None:
            try:
                shm.close()
            except BufferError:
                pass
        sock.close()


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]), json.loads(sys.argv[2])))
