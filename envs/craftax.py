"""Craftax (Matthews et al., 2024) through :func:`envs.make`: the JAX open-ended survival/crafting benchmark.

==================================  ===============================================================================
name                                what
==================================  ===============================================================================
``Craftax-Classic-Symbolic-v1``     Crafter in JAX: 64x64 world, 22 achievements, flat float32 observation (1345)
``Craftax-Classic-Pixels-v1``       the same game, a 63x63x3 image (flattened to 11907 floats by ``envs.make``)
``Craftax-Symbolic-v1``             full Craftax: 9 floors, 67 achievements, flat float32 observation (8268)
``Craftax-Pixels-v1``               full Craftax, a 130x110x3 image (flattened by ``envs.make``)
==================================  ===============================================================================

Optional package: ``pip install -e ".[craftax]"`` (craftax>=1.6). Importing :mod:`envs` (and this module) does not
import craftax; :func:`envs.check_name` only looks whether it is installed, and building an env without it raises a
``ModuleNotFoundError`` that names the extra.

Episodes, reward. Craftax's reward: +1 per achievement unlocked the first time in the episode (full Craftax: 1, 3, 5 or
8 by difficulty), plus 0.1 per unit of health gained (minus 0.1 per unit lost). Craftax's own ``done`` merges death
with the time limit ``params.max_timesteps`` (10 000 Classic, 100 000 full); here ``terminated`` is death (health <= 0,
Classic: also lava; full: also beating the final boss) and ``truncated`` is the time limit alone (``state.timestep >=
params.max_timesteps``), so the value of a time-limited episode's last state is bootstrapped. ``envs.make`` keyword
arguments override fields of Craftax's ``EnvParams`` (``max_timesteps``, ``day_length``...).

Cheap auto-reset ("optimistic" reset, the idea of Craftax's baselines). Generating a world costs far more than a step
(about 0.4 s to generate 256 Classic worlds on 2 CPU cores), so a batch of ``num_envs=N`` envs does not build a world
for every env each step as :class:`envs.wrappers.AutoReset` would under ``vmap``. On a step where some envs
finished it generates ``max(1, N // reset_ratio)`` fresh worlds and hands them out in order to the finished envs;
when more envs finish in the same step than there are fresh worlds, several start in copies of one world (and then
diverge with their own actions and random keys). On steps where no env finished nothing is generated (a
``lax.cond``; under ``vmap`` over seeds both branches run, so each step pays for the ``N // reset_ratio`` worlds).
``reset_ratio`` (default 16, Craftax's) is a keyword of ``envs.make``: ``envs.make("Craftax-Symbolic-v1",
num_envs=1024, reset_ratio=16)``; ``reset_ratio=1`` gives every finished env a world of its own. ``reset`` builds
all N worlds. The state carries no pool: it is Craftax's state plus the episode's return (a pytree).

Logged per finished episode (every ``episode_*`` info key is averaged over the episodes that finished, see
:func:`jaxrl_pref.rollout.episode_metrics`): ``episode_achievement_<name>`` (1 if the achievement was unlocked in the
episode, so its mean is the success rate; e.g. ``episode_achievement_collect_wood``) and ``episode_score``, the
episode's return as a percentage of the maximum return (Classic: 22, one per achievement; full Craftax: 226, the
weighted sum), the measure of the Craftax paper's scoreboard. Crafter's score (geometric mean of the success rates)
can be computed from the success rates. ``episode_success`` is not reported.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import spaces

from envs.wrappers import AutoReset, any_in_batch, raw_keys, where_done

CRAFTAX_FIX = 'pip install -e ".[craftax]" (or: pip install "craftax>=1.6")'

# name -> (classic, symbolic)
NAMES = {
    "Craftax-Classic-Symbolic-v1": (True, True),
    "Craftax-Classic-Pixels-v1": (True, False),
    "Craftax-Symbolic-v1": (False, True),
    "Craftax-Pixels-v1": (False, False),
}
DEFAULT_RESET_RATIO = 16


def _missing(name: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"env_name: {name} comes from the optional package craftax, which is not installed. "
                               f"Fix: {CRAFTAX_FIX}")


def check_installed(name: str) -> None:
    """Raises the missing-package error unless craftax is importable; imports nothing."""
    if "craftax" in sys.modules:
        if sys.modules["craftax"] is None:  # an import made to fail (tests)
            raise _missing(name)
        return
    if importlib.util.find_spec("craftax") is None:
        raise _missing(name)


def require_craftax(name: str):
    try:
        import craftax
    except ImportError as e:
        raise _missing(name) from e
    return craftax


@struct.dataclass
class CraftaxState:
    env: Any                    # Craftax's EnvState
    episode_return: jax.Array   # float32: Craftax reward summed over the episode so far (for episode_score)


class Craftax:
    """A gymnax-style base env (``reset_env``/``step_env``/``is_truncated``, gymnax spaces) over a Craftax env.

    ``step_env`` reports ``terminated`` without the time limit and, on the step an episode ends (terminated or
    truncated), the episode's achievements and score in ``info`` (0 on other steps). :meth:`make_auto_reset` is the
    batched optimistic auto-reset that :func:`envs.make` uses in place of :class:`~envs.wrappers.AutoReset`.
    """

    def __init__(self, name: str, craftax_env, achievement_names: list[str], achievement_rewards,
                 reset_ratio: int = DEFAULT_RESET_RATIO):
        if int(reset_ratio) < 1:
            raise ValueError(f"reset_ratio: must be >= 1 (envs per freshly generated world), got {reset_ratio}. "
                             f"Fix: pass e.g. reset_ratio={DEFAULT_RESET_RATIO}")
        self._name, self._cenv = name, craftax_env
        self.achievement_names = list(achievement_names)
        self.achievement_rewards = jnp.asarray(achievement_rewards, jnp.float32)
        self.max_return = float(sum(float(r) for r in achievement_rewards))
        self.reset_ratio = int(reset_ratio)

    @property
    def name(self) -> str:
        return self._name

    @property
    def craftax_env(self):
        return self._cenv

    @property
    def default_params(self):
        return self._cenv.default_params

    @property
    def num_actions(self) -> int:
        return int(self._cenv.num_actions)

    def action_space(self, params=None):
        return spaces.Discrete(self.num_actions)

    def observation_space(self, params):
        space = self._cenv.observation_space(params)
        return spaces.Box(0.0, 1.0, tuple(space.shape), jnp.float32)

    def get_obs(self, state: CraftaxState):
        return jnp.asarray(self._cenv.get_obs(state.env), jnp.float32)

    def reset_env(self, key, params):
        obs, s = self._cenv.reset_env(key, params)
        return jnp.asarray(obs, jnp.float32), CraftaxState(s, jnp.float32(0.0))

    def _terminated(self, s, params):
        # Craftax's game-over test without its time limit: death (and lava / the final boss)
        return jnp.asarray(self._cenv.is_terminal(s, params.replace(max_timesteps=jnp.iinfo(jnp.int32).max)), bool)

    def is_truncated(self, state: CraftaxState, params):
        return state.env.timestep >= params.max_timesteps

    def step_env(self, key, state: CraftaxState, action, params):
        obs, s, reward, _, _ = self._cenv.step_env(key, state.env, jnp.asarray(action, jnp.int32), params)
        reward = jnp.asarray(reward, jnp.float32)
        terminated = self._terminated(s, params)
        done = terminated | (s.timestep >= params.max_timesteps)
        ret = state.episode_return + reward
        ach = jnp.where(done, s.achievements.astype(jnp.float32), 0.0)
        info = {f"episode_achievement_{n}": ach[i] for i, n in enumerate(self.achievement_names)}
        info["episode_score"] = jnp.where(done, 100.0 * ret / self.max_return, 0.0)
        return jnp.asarray(obs, jnp.float32), CraftaxState(s, ret), reward, terminated, info

    def make_auto_reset(self, env=None, num_envs: int | None = None):
        """The batched optimistic auto-reset around ``env`` (this env, or a base-env wrapper around it)."""
        return CraftaxAutoReset(self if env is None else env, num_envs, self.reset_ratio)


class CraftaxAutoReset(AutoReset):
    """:class:`~envs.wrappers.AutoReset`'s interface (6-value step, ``terminated``/``truncated`` split, batch of
    ``num_envs`` or one env) with the optimistic reset described in the module docstring: on a step where envs
    finished, ``num_resets = max(1, num_envs // reset_ratio)`` fresh worlds are generated and the k-th finished env
    (in env order) gets world ``k mod num_resets``. One env (``num_envs=None``) regenerates its own world when it
    finishes (under a ``vmap`` of it every env builds a world every step: prefer ``num_envs=N``)."""

    def __init__(self, env, num_envs: int | None = None, reset_ratio: int = DEFAULT_RESET_RATIO):
        super().__init__(env, num_envs)
        self.reset_ratio = int(reset_ratio)
        self.num_resets = 1 if num_envs is None else max(1, num_envs // self.reset_ratio)

    def _reset_done(self, key, done, obs_st, state_st, params):
        """The finished envs get fresh worlds from a small pool generated on this step (none when nobody finished)."""
        if self.num_envs is None:
            def fresh(_):
                obs_re, state_re = self._env.reset_env(raw_keys(key), params)
                return where_done(done, obs_re, obs_st), where_done(done, state_re, state_st)
        else:
            def fresh(_):
                keys = raw_keys(jax.random.split(key, self.num_resets))
                obs_re, state_re = jax.vmap(self._env.reset_env, in_axes=(0, None))(keys, params)
                slot = (jnp.cumsum(done) - 1) % self.num_resets  # rank of each finished env among the finished
                take = lambda x: jnp.take(x, slot, axis=0)  # noqa: E731
                obs_re, state_re = take(obs_re), jax.tree.map(take, state_re)
                return where_done(done, obs_re, obs_st), where_done(done, state_re, state_st)

        return jax.lax.cond(any_in_batch(done), fresh, lambda _: (obs_st, state_st), None)


def _factory(name: str):
    classic, symbolic = NAMES[name]

    def factory(reset_ratio: int = DEFAULT_RESET_RATIO, **kwargs):
        require_craftax(name)
        from craftax.craftax_env import make_craftax_env_from_params
        if classic:
            from craftax.craftax_classic.constants import Achievement
            rewards = [1.0] * len(Achievement)
        else:
            import numpy as np
            from craftax.craftax.constants import ACHIEVEMENT_REWARD_MAP, Achievement
            rewards = np.asarray(ACHIEVEMENT_REWARD_MAP, np.float32).tolist()
        names = [a.name.lower() for a in sorted(Achievement, key=lambda a: a.value)]
        cenv = make_craftax_env_from_params(classic=classic, symbolic=symbolic, auto_reset=False)
        from envs.sparse import _override
        params = _override(cenv.default_params, kwargs, name)
        return Craftax(name, cenv, names, rewards, reset_ratio), params
    return factory


def register_all(register) -> None:
    """Registers the four ids, captioned (one table per game, :mod:`envs.captions`), with the Craftax prompt; without
    craftax installed, checking an id says so (imports nothing) and building one names the extra."""
    from envs import captions
    for name, (classic, _) in NAMES.items():
        register(name, _factory(name), family="craftax", requires=check_installed, task="craftax",
                 captions=captions.CRAFTAX_CLASSIC if classic else captions.CRAFTAX)
