"""Worker side of the NetHack/MiniHack env pool (:class:`envs.nethack.NLEPool`), plus what both sides share.

This file is deliberately standalone (numpy, gymnasium and nle/minihack only; no ``envs``/``jax`` imports): the pool
starts each worker as ``python nle_worker.py FD CONFIG_JSON``, so a worker starts in well under a second, never
imports JAX, and is never forked from a process that already runs JAX threads.

Protocol (one stream socket per worker; :func:`send_msg` / :func:`recv_msg`): a message is one command byte,
followed -- for the commands that carry data -- by a 4-byte little-endian length and the payload. A step costs one
byte each way: a blocking socket read is far cheaper than a ``select``-based wait (``multiprocessing.connection``
builds a selector on every wait), which matters at tens of thousands of steps per second.

* host -> worker: ``b"S"`` step every env of the worker with the actions in shared memory, ``b"R"`` reset them,
  ``b"C"`` close.
* worker -> host: ``b"K"`` done, ``b"H" + JSON`` the start-up handshake, ``b"E" + traceback`` on an error.

All data -- actions, observations, final observations, rewards, flags, episode statistics, the running statistics of
unfinished episodes and each env's episode counter -- lives in one shared-memory segment laid out by :func:`layout`;
a worker writes only its own slice ``[start, start + count)`` of every array.
"""
from __future__ import annotations

import json
import os
import sys
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


def send_msg(sock, code: bytes, payload: bytes = b"") -> None:
    """Sends one message (``code``: one byte; ``payload`` only for the codes in :data:`WITH_PAYLOAD`)."""
    sock.sendall(code + len(payload).to_bytes(4, "little") + payload if code in WITH_PAYLOAD else code)


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


def obs_spec(keys, crop=(9, 9)) -> dict:
    """``{key: (shape, dtype name)}`` for one env's observation."""
    shapes = {"glyphs": (DUNGEON_SHAPE, "int16"), "glyphs_crop": (tuple(crop), "int16"),
              "chars": (DUNGEON_SHAPE, "uint8"), "chars_crop": (tuple(crop), "uint8"),
              "blstats": ((NUM_BLSTATS,), "int32"), "message": ((MESSAGE_LEN,), "uint8")}
    return {k: shapes[k] for k in keys}


def layout(num_envs: int, keys, crop=(9, 9)) -> tuple[list[tuple[str, tuple, str, int]], int]:
    """The shared segment's arrays as ``[(name, shape, dtype, byte offset)]`` and its total size."""
    n = int(num_envs)
    arrays = [("action", (n,), "int32"), ("reward", (n,), "float32"), ("terminated", (n,), "bool"),
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


class EnvSlot:
    """One env of a worker: steps it and writes its observations into index ``i`` of the shared arrays ``v``
    (``obs/*``: the next observation to act on; ``final/*``: the observation an episode ended on, written only
    then). Running episode statistics are kept here and published by :class:`Worker` in one write per array."""

    def __init__(self, env, i: int, v: dict, keys, seed: int):
        self.env, self.i, self.v, self.keys, self.seed = env, i, v, tuple(keys), seed
        self.base = env.unwrapped
        self.ret, self.length, self.depth = 0.0, 0, 0
        # per key: (source key, destination view) -- views made once, not per step
        self.out = {p: [(k[:-5] if k.endswith("_crop") else k, k.endswith("_crop"), v[p + k][i]) for k in keys]
                    for p in ("obs/", "final/")}
        # crops: the map is copied into the middle of a board padded by half the crop on each side, so the
        # window around the agent at (x, y) is board[y:y + h, x:x + w] -- no bounds arithmetic per step
        self.boards = {}
        for k in keys:
            if k.endswith("_crop"):
                h, w = v["obs/" + k].shape[1:]
                pad = PAD_GLYPH if k == "glyphs_crop" else PAD_CHAR
                self.boards[k[:-5]] = (np.full((DUNGEON_SHAPE[0] + h - 1, DUNGEON_SHAPE[1] + w - 1), pad,
                                               v["obs/" + k].dtype), h, w)

    def write(self, obs, prefix: str):
        bl = obs["blstats"]
        x, y = int(bl[BL_X]), int(bl[BL_Y])
        filled = set()
        for src, is_crop, dst in self.out[prefix]:
            if is_crop:
                board, h, w = self.boards[src]
                if src not in filled:
                    board[h // 2:h // 2 + DUNGEON_SHAPE[0], w // 2:w // 2 + DUNGEON_SHAPE[1]] = obs[src]
                    filled.add(src)
                dst[...] = board[y:y + h, x:x + w]
            else:
                dst[...] = obs[src]

    def reset(self):
        v, i = self.v, self.i
        self.base.seed(*episode_seeds(self.seed, i, v["episode_index"][i]), reseed=False)
        obs, _ = self.env.reset()
        self.write(obs, "obs/")
        self.ret, self.length, self.depth = 0.0, 0, int(obs["blstats"][BL_DEPTH])

    def step(self, action: int):
        """Steps once, writes ``obs/*`` (or ``final/*`` if the episode ended); returns (reward, terminated, truncated). On an episode's end also
        writes its ``episode_*`` statistics (the caller then resets)."""
        obs, reward, done, truncated, info = self.env.step(action)
        status = int(info.get("end_status", 0))
        truncated = bool(truncated) or status == STATUS_ABORTED
        terminated = bool(done) and not truncated
        self.write(obs, "final/" if terminated or truncated else "obs/")
        bl = obs["blstats"]
        self.ret += reward
        self.length += 1
        self.depth = max(self.depth, int(bl[BL_DEPTH]))
        if terminated or truncated:
            v, i = self.v, self.i
            v["episode_return"][i] = self.ret
            v["episode_length"][i] = self.length
            v["episode_depth"][i] = self.depth
            v["episode_score"][i] = bl[BL_SCORE]
            v["episode_success"][i] = status == STATUS_SUCCESS
            v["episode_index"][i] += 1
        return reward, terminated, truncated


class Worker:
    """The envs ``[start, start + count)`` of a pool, stepped in order; array-wide results written at once."""

    def __init__(self, slots: list, v: dict, start: int, keys):
        self.slots, self.v, self.keys = slots, v, tuple(keys)
        self.sl = slice(start, start + len(slots))

    def _publish_running(self):
        v, sl, slots = self.v, self.sl, self.slots
        v["run_return"][sl] = [s.ret for s in slots]
        v["run_length"][sl] = [s.length for s in slots]
        v["run_depth"][sl] = [s.depth for s in slots]

    def reset(self):
        for s in self.slots:
            s.reset()
        self._publish_running()

    def step(self):
        v, sl = self.v, self.sl
        out = [s.step(a) for s, a in zip(self.slots, v["action"][sl].tolist())]
        rew, term, trunc = zip(*out)
        done = [a or b for a, b in zip(term, trunc)]
        v["reward"][sl], v["terminated"][sl], v["truncated"][sl], v["episode_done"][sl] = rew, term, trunc, done
        for s, d in zip(self.slots, done):
            if d:
                s.reset()
        self._publish_running()


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
    import socket
    sock = socket.socket(fileno=fd)
    shm, v, slots = None, None, []
    try:
        try:
            shm = _attach(cfg["shm"])
            lay, _ = layout(cfg["num_envs"], cfg["obs_keys"], cfg["crop"])
            v = views(shm.buf, lay)
            start, count = cfg["start"], cfg["count"]
            slots = [EnvSlot(make_env(cfg["task"], cfg["env_kwargs"], cfg["obs_keys"]), start + j, v,
                             cfg["obs_keys"], cfg["seed"]) for j in range(count)]
            worker = Worker(slots, v, start, cfg["obs_keys"])
            worker.reset()
            env = slots[0].env
            hello = {"num_actions": int(env.action_space.n), "has_success": has_success(env), "pid": os.getpid()}
            send_msg(sock, b"H", json.dumps(hello).encode())
        except Exception:
            send_msg(sock, b"E", traceback.format_exc().encode())
            return 1
        while True:
            cmd = recv_msg(sock)
            try:
                if cmd == b"S":
                    worker.step()
                elif cmd == b"R":
                    worker.reset()
                elif cmd == b"C":
                    break
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                sock.sendall(b"K")
            except Exception:
                send_msg(sock, b"E", traceback.format_exc().encode())
        for s in slots:
            s.env.close()
        return 0
    except (EOFError, OSError):  # the host went away: nothing left to do
        return 0
    finally:
        del v  # views must go before the buffer can be closed
        if shm is not None:
            try:
                shm.close()
            except BufferError:
                pass
        sock.close()


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]), json.loads(sys.argv[2])))
