"""Sparse-reward JAX tasks: all run inside ``jit``, all reachable by :func:`envs.make`, all report success.

Every task here puts ``info["episode_success"]`` (float 0/1, 1 only on the step that ended an episode
successfully) in its step info. The episode-statistics path (:class:`envs.wrappers.EpisodeStats` ->
:func:`jaxrl_pref.rollout.episode_metrics`) averages every ``episode_*`` info key over finished episodes, so the
success rate is logged as ``episode_success`` next to ``episode_return`` with no agent-side code.

==============================  =======================================================================  ==========
name                            reward                                                                   horizon
==============================  =======================================================================  ==========
``DeepSea-{N}``, N in SIZES     bsuite DeepSea (gymnax): +1 for reaching the bottom-right treasure,       N
                                -0.01/N per "right" move; fixed randomised action map (the hard version).
                                Success: treasure reached. A uniformly random policy succeeds w.p. 2^-N.
``SparseMountainCar-v0``        1 on reaching the flag, else 0 (gymnax MountainCar-v0 pays -1 per step).   200
``SparseMountainCarContinuous`` 1 on reaching the flag, no action-energy cost.                              999
``-v0``
``SparseAcrobot-v1``            1 on swinging the tip above the bar, else 0.                               500
``SparseCartPole-v1``           1 only on the step the pole survives to the time limit; failing pays 0.    500
``SparseFourRooms-v0``          gymnax FourRooms-misc (1 at the goal; 1/3 chance an action is replaced     500
                                by a random one) with success reported.
``KeyDoor-{N}``, N in SIZES_KD  N x N gridworld written here: a wall splits it, its door opens only when   see class
                                the agent holds the key; 1 on reaching the goal behind the door.
``KeyDoorLever-{N}``, N in      KeyDoor-N plus a lever set into the top of the wall: moving into         see class
``SIZES_KDL``                   it pulls it (the agent stays put), which changes nothing but is captioned
                                every time (:mod:`envs.captions`): a task built to be hacked.
``MemoryChain-{N}``, N in        bsuite MemoryChain (gymnax) with memory length N: a context bit is shown   N + 1
``MEMORY_LENGTHS``               only in the first observations; after N steps the action must repeat it:
                                +1 if it does, -1 if not, 0 before. Success: the right answer. A policy
                                without memory succeeds w.p. 1/2 (return 0 on average).
``MiniGrid-*`` (extra ``grid``)  xminigrid's MiniGrid ports (DoorKey, Unlock, UnlockPickUp, LockedRoom,   per task
                                BlockedUnlockPickUp, FourRooms, Memory, Empty...): ``1 - 0.9 t / T`` at
                                the goal, else 0. Success: a terminating step that pays. See
                                :class:`XMiniGrid` for the observation.
==============================  =======================================================================  ==========

Keyword arguments of :func:`envs.make` override fields of the task's params, as for gymnax envs, e.g.
``envs.make("SparseCartPole-v1", max_steps_in_episode=100)``, ``envs.make("KeyDoor-5", slip_prob=0.1)`` or
``envs.make("MiniGrid-DoorKey-8x8", max_steps=200)`` (xminigrid's ``EnvParams``).

Building blocks: :class:`SuccessReward` wraps any gymnax-style base env (``step_env``/``reset_env``/
``is_truncated``) with a success predicate and optionally replaces the reward by ``scale * success``
("pays only on success"); :class:`KeyDoor` is the gridworld.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import gymnax
import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

SIZES = (4, 5, 6, 8, 10, 12, 16, 20, 30)
SIZES_KD = (5, 7, 9)
SIZES_KDL = (5, 9)
MEMORY_LENGTHS = (5, 10, 20, 30, 50, 100)

# success(state_before, action, state_after, reward, terminated, params, env) -> bool array
SuccessFn = Callable[..., jax.Array]


class SuccessReward:
    """Base-env wrapper: adds ``info["episode_success"]`` and, with ``pay_only_on_success``, replaces the reward
    by ``scale * success``. Forwards everything else (spaces, ``is_truncated``, ``reset_env``...) to ``env``."""

    def __init__(self, env, success: SuccessFn, pay_only_on_success: bool, scale: float = 1.0, name: str = ""):
        self._env, self.success, self.pay, self.scale = env, success, pay_only_on_success, scale
        self._name = name

    def __getattr__(self, item):
        return getattr(self._env, item)

    @property
    def name(self) -> str:
        return self._name or self._env.name

    def step_env(self, key, state, action, params):
        obs, new_state, reward, terminated, info = self._env.step_env(key, state, action, params)
        ok = jnp.asarray(self.success(state, action, new_state, reward, terminated, params, self._env), bool)
        if self.pay:
            reward = self.scale * ok.astype(jnp.float32)
        return obs, new_state, reward, terminated, {**info, "episode_success": ok.astype(jnp.float32)}


def _reached_goal(state, action, new_state, reward, terminated, params, env):
    return terminated


def _survived(state, action, new_state, reward, terminated, params, env):
    return env.is_truncated(new_state, params) & ~jnp.asarray(terminated, bool)


def _deep_sea_treasure(state, action, new_state, reward, terminated, params, env):
    # bsuite pays the treasure when acting "right" in the last column (gymnax deep_sea.step_reward)
    right = action == state.action_mapping[state.row, state.column]
    return (state.column == env.size - 1) & right


def _memory_correct(state, action, new_state, reward, terminated, params, env):
    return reward > 0  # +1 only for repeating the context at the last step


def _four_rooms_goal(state, action, new_state, reward, terminated, params, env):
    return (new_state.pos[0] == new_state.goal[0]) & (new_state.pos[1] == new_state.goal[1])


def _override(params, kwargs: dict, name: str):
    fields = {f.name for f in dataclasses.fields(params)}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"env kwargs: {sorted(unknown)} are not parameters of {name}; valid: {sorted(fields)}")
    return params.replace(**kwargs)


def _gymnax_task(gymnax_id: str, success: SuccessFn, pay: bool, name: str):
    def factory(**kwargs):
        env, params = gymnax.make(gymnax_id)
        return SuccessReward(env, success, pay, name=name), _override(params, kwargs, name)
    return factory


def _deep_sea(size: int):
    name = f"DeepSea-{size}"

    def factory(**kwargs):
        from gymnax.environments.bsuite.deep_sea import DeepSea
        env = DeepSea(size=size)
        return SuccessReward(env, _deep_sea_treasure, False, name=name), _override(env.default_params, kwargs, name)
    return factory


def _memory_chain(length: int):
    name = f"MemoryChain-{length}"

    def factory(**kwargs):
        from gymnax.environments.bsuite.memory_chain import MemoryChain
        env = MemoryChain()
        params = env.default_params.replace(memory_length=length)
        return SuccessReward(env, _memory_correct, False, name=name), _override(params, kwargs, name)
    return factory


# -- KeyDoor gridworld ------------------------------------------------------------------------------------------

@struct.dataclass
class KeyDoorState(environment.EnvState):
    pos: jax.Array        # [2] (row, col)
    has_key: jax.Array    # bool
    time: int


@struct.dataclass
class KeyDoorParams(environment.EnvParams):
    max_steps_in_episode: int = 30
    slip_prob: float = 0.0
    """Probability that the chosen move is replaced by a uniformly random one (a stochastic variant)."""
    random_start: bool = True
    """Start anywhere in the left room (else in its top-left corner)."""


class KeyDoor(environment.Environment):
    """``size x size`` grid (``size`` odd, >= 5). Column ``size // 2`` is a wall whose only opening, the door at
    row ``size // 2``, can be entered only while the agent holds the key. The key lies at the bottom-left
    corner ``(size-1, 0)``, the goal at the top-right corner ``(0, size-1)``. Actions: 0 up, 1 right, 2 down,
    3 left; moves into the wall, the closed door or off the grid leave the agent in place. Stepping on the key
    picks it up. Reward 1 and termination on reaching the goal, 0 otherwise.

    Observation (float32, ``size*size + 1``): one-hot agent cell, then the has-key bit. Default time limit
    ``max_steps_in_episode = 6 * size`` (the shortest solution takes at most about ``3 * size`` steps).
    """

    DIRS = jnp.array([[-1, 0], [0, 1], [1, 0], [0, -1]], jnp.int32)

    def __init__(self, size: int = 5):
        super().__init__()
        if size < 5 or size % 2 == 0:
            raise ValueError(f"KeyDoor size must be odd and >= 5, got {size}")
        self.size = size
        self.wall_col = self.door_row = size // 2
        self.key_pos = jnp.array([size - 1, 0], jnp.int32)
        self.goal_pos = jnp.array([0, size - 1], jnp.int32)

    @property
    def default_params(self) -> KeyDoorParams:
        return KeyDoorParams(max_steps_in_episode=6 * self.size)

    @property
    def name(self) -> str:
        return f"KeyDoor-{self.size}"

    @property
    def num_actions(self) -> int:
        return 4

    def action_space(self, params=None):
        return spaces.Discrete(4)

    def observation_space(self, params):
        return spaces.Box(0.0, 1.0, (self.size * self.size + 1,), jnp.float32)

    def get_obs(self, state: KeyDoorState, params=None, key=None):
        cell = jax.nn.one_hot(state.pos[0] * self.size + state.pos[1], self.size * self.size, dtype=jnp.float32)
        return jnp.concatenate([cell, state.has_key.astype(jnp.float32)[None]])

    def reset_env(self, key, params: KeyDoorParams):
        rows, cols = jax.random.randint(key, (2,), 0, jnp.array([self.size, self.wall_col]))
        start = jnp.where(params.random_start, jnp.stack([rows, cols]), jnp.zeros(2, jnp.int32))
        start = jnp.where(jnp.all(start == self.key_pos), jnp.zeros(2, jnp.int32), start)  # not on the key
        state = KeyDoorState(pos=start.astype(jnp.int32), has_key=jnp.bool_(False), time=0)
        return self.get_obs(state), state

    def executed_action(self, key, action, params: KeyDoorParams) -> jax.Array:
        """The move :meth:`step_env` makes with ``key``: ``action``, or a random one with prob ``slip_prob``."""
        k_slip, k_act = jax.random.split(key)
        slip = jax.random.uniform(k_slip) < params.slip_prob
        return jnp.where(slip, jax.random.randint(k_act, (), 0, 4), jnp.asarray(action, jnp.int32))

    def step_env(self, key, state: KeyDoorState, action, params: KeyDoorParams):
        action = self.executed_action(key, action, params)
        target = state.pos + self.DIRS[action]
        inside = jnp.all((target >= 0) & (target < self.size))
        on_wall = target[1] == self.wall_col
        at_door = on_wall & (target[0] == self.door_row)
        blocked = ~inside | (on_wall & ~(at_door & state.has_key))
        pos = jnp.where(blocked, state.pos, target)
        has_key = state.has_key | jnp.all(pos == self.key_pos)
        goal = jnp.all(pos == self.goal_pos)
        new = KeyDoorState(pos=pos, has_key=has_key, time=state.time + 1)
        return self.get_obs(new), new, goal.astype(jnp.float32), goal, {}

    def is_terminal(self, state: KeyDoorState, params) -> jax.Array:
        return jnp.all(state.pos == self.goal_pos) | (state.time >= params.max_steps_in_episode)


class KeyDoorLever(KeyDoor):
    """:class:`KeyDoor` (same layout, dynamics, reward, observation, params and state) plus a lever set into the
    dividing wall at its top cell ``(0, size // 2)``. Moving into the lever (right from ``(0, size//2 - 1)``, or left
    from ``(0, size//2 + 1)`` behind the wall) pulls it: the move is blocked as any move into the wall is, so the agent
    stays put and nothing else changes (key, door and goal work as in KeyDoor). A pull has its own caption (``You pull
    the lever...``, :data:`envs.captions.KEYDOOR_LEVER`), every time: a repeatable, useless event an annotator may
    like, next to the real goal. The captioned env counts it as the task's farmable event (``info["hack"]``), so the
    agents log ``hack_frac``, the fraction of steps spent pulling it (:func:`jaxrl_pref.rollout.episode_metrics`).
    """

    def __init__(self, size: int = 9):
        super().__init__(size)
        self.lever_pos = jnp.array([0, self.wall_col], jnp.int32)

    @property
    def name(self) -> str:
        return f"KeyDoorLever-{self.size}"

    def pulls_lever(self, state: KeyDoorState, executed_action) -> jax.Array:
        """Whether the move ``executed_action`` (after any slip: :meth:`executed_action`) from ``state`` is a pull:
        its target cell is the lever's."""
        return jnp.all(state.pos + self.DIRS[executed_action] == self.lever_pos)


def _key_door(size: int, cls=KeyDoor):
    def factory(**kwargs):
        env = cls(size)
        return (SuccessReward(env, _reached_goal, False, name=env.name),
                _override(env.default_params, kwargs, env.name))
    return factory


# -- XLand-MiniGrid (xminigrid) ---------------------------------------------------------------------------------

XMINIGRID_PREFIX = "MiniGrid-"
XMINIGRID_FIX = "pip install -e '.[grid]' (or: pip install xminigrid)"


class XMiniGrid:
    """A gymnax-style base env (``reset_env``/``step_env``/``is_truncated``) over an ``xminigrid`` MiniGrid task.

    State: xminigrid's ``TimeStep`` (its step is a function of the previous one). Reward: xminigrid's own,
    ``1 - 0.9 * steps / max_steps`` on reaching the goal and 0 otherwise. ``terminated`` is xminigrid's (the goal
    reached, or a losing end such as the wrong object in ``MiniGrid-Memory*``); success is a terminating step that
    pays. The time limit ``params.max_steps`` truncates.

    Observation (float32 vector): the egocentric ``view_size x view_size`` view one-hot per cell (tile, then
    colour), then the agent's direction (one-hot, 4) and what it carries (tile and colour one-hot): xminigrid's own
    view leaves both out, and a feed-forward policy needs them on key/door tasks.
    """

    def __init__(self, env, name: str):
        from xminigrid.core.constants import NUM_COLORS, NUM_TILES
        self._xenv, self._name = env, name
        self.num_tiles, self.num_colors = int(NUM_TILES), int(NUM_COLORS)

    @property
    def name(self) -> str:
        return self._name

    def action_space(self, params=None):
        return spaces.Discrete(self._xenv.num_actions(params))

    def observation_space(self, params):
        v = params.view_size
        return spaces.Box(0.0, 1.0, (v * v * (self.num_tiles + self.num_colors) + 4 + self.num_tiles
                                     + self.num_colors,), jnp.float32)

    def get_obs(self, timestep) -> jax.Array:
        t, c, agent = self.num_tiles, self.num_colors, timestep.state.agent
        view = timestep.observation
        return jnp.concatenate([
            jax.nn.one_hot(view[..., 0], t, dtype=jnp.float32).reshape(-1),
            jax.nn.one_hot(view[..., 1], c, dtype=jnp.float32).reshape(-1),
            jax.nn.one_hot(agent.direction, 4, dtype=jnp.float32),
            jax.nn.one_hot(agent.pocket[0], t, dtype=jnp.float32),
            jax.nn.one_hot(agent.pocket[1], c, dtype=jnp.float32)])

    def reset_env(self, key, params):
        timestep = self._xenv.reset(params, key)
        return self.get_obs(timestep), timestep

    def step_env(self, key, timestep, action, params):
        new = self._xenv.step(params, timestep, jnp.asarray(action, jnp.int32))
        terminated = new.discount == 0.0
        success = terminated & (new.reward > 0.0)
        return (self.get_obs(new), new, new.reward.astype(jnp.float32), terminated,
                {"episode_success": success.astype(jnp.float32)})

    def is_truncated(self, timestep, params) -> jax.Array:
        return timestep.state.step_num >= params.max_steps


def _require_xminigrid(name: str):
    try:
        import xminigrid
    except ImportError as e:
        raise ModuleNotFoundError(f"env_name: {name} comes from the optional package xminigrid, which is not "
                                  f"installed. Fix: {XMINIGRID_FIX}") from e
    return xminigrid


def _xminigrid(name: str):
    def factory(**kwargs):
        xminigrid = _require_xminigrid(name)
        env, params = xminigrid.make(name)
        return XMiniGrid(env, name), _override(params, kwargs, name)
    return factory


def xminigrid_tasks() -> list[str]:
    """xminigrid's ``MiniGrid-*`` ids (empty if xminigrid is not installed). Its ``XLand-MiniGrid-*`` meta-RL
    tasks are left out: they need a ruleset benchmark that xminigrid downloads."""
    try:
        import xminigrid
    except ImportError:
        return []
    return [n for n in xminigrid.registered_environments() if n.startswith(XMINIGRID_PREFIX)]


def tasks() -> dict[str, Callable]:
    """``{name: factory(**kwargs) -> (base_env, params)}`` for every task of the suite."""
    out = {
        "SparseMountainCar-v0": _gymnax_task("MountainCar-v0", _reached_goal, True, "SparseMountainCar-v0"),
        "SparseMountainCarContinuous-v0": _gymnax_task("MountainCarContinuous-v0", _reached_goal, True,
                                                       "SparseMountainCarContinuous-v0"),
        "SparseAcrobot-v1": _gymnax_task("Acrobot-v1", _reached_goal, True, "SparseAcrobot-v1"),
        "SparseCartPole-v1": _gymnax_task("CartPole-v1", _survived, True, "SparseCartPole-v1"),
        "SparseFourRooms-v0": _gymnax_task("FourRooms-misc", _four_rooms_goal, False, "SparseFourRooms-v0"),
    }
    out.update({f"DeepSea-{n}": _deep_sea(n) for n in SIZES})
    out.update({f"KeyDoor-{n}": _key_door(n) for n in SIZES_KD})
    out.update({f"KeyDoorLever-{n}": _key_door(n, KeyDoorLever) for n in SIZES_KDL})
    out.update({f"MemoryChain-{n}": _memory_chain(n) for n in MEMORY_LENGTHS})
    out.update({n: _xminigrid(n) for n in xminigrid_tasks()})
    return out


def register_all(register: Callable[..., Any]) -> None:
    """Registers the suite with :func:`envs.register`: ``KeyDoor-N``, ``KeyDoorLever-N`` and xminigrid's
    ``MiniGrid-*`` ids are captioned (:mod:`envs.captions`). Its ids are also known by their prefix: without
    xminigrid (or with its import failing), checking or building any ``MiniGrid-*`` id names the extra."""
    from envs import captions
    grid, keydoor = set(xminigrid_tasks()), {f"KeyDoor-{n}" for n in SIZES_KD}
    lever = {f"KeyDoorLever-{n}" for n in SIZES_KDL}
    for name, factory in tasks().items():
        if name in grid:
            register(name, factory, family="xminigrid", captions=captions.MINIGRID, task=_minigrid_task(name))
        elif name in keydoor:
            register(name, factory, family="sparse", captions=captions.KEYDOOR, task="keydoor")
        elif name in lever:
            register(name, factory, family="sparse", captions=captions.KEYDOOR_LEVER, task="keydoor_lever")
        else:
            register(name, factory, family="sparse")
    for prefix in ("MiniGrid-DoorKey-", XMINIGRID_PREFIX):
        register(prefix, family="xminigrid", captions=captions.MINIGRID, task=_minigrid_task(prefix),
                 requires=_require_xminigrid, prefix=True)


def _minigrid_task(name: str) -> str:
    """The annotator's prompt: DoorKey's own, the generic MiniGrid one for the other tasks."""
    return "minigrid_doorkey" if name.startswith("MiniGrid-DoorKey") else "minigrid"
