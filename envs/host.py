"""Host envs: envs stepped outside jit (NetHack/MiniHack process pools), driven by :mod:`jaxrl_pref.loop`.

A host env is any object with::

    num_envs: int; num_actions: int
    observation_spec() -> {key: (shape, dtype)}          # per-env shapes
    reset() -> obs                                       # dict of numpy arrays [N, ...]
    step(actions) -> (obs, reward, terminated, truncated, info)
        # numpy [N]; info: "final_obs" (dict like obs: the true last observation where an episode ended),
        # "episode_done", "episode_return", "episode_length" and any other "episode_*" statistics, [N] each
    close()
    # optional, for pipelined collection (NLEPool): num_groups: int, send(actions, group), recv(group) -> as step
    # for the group's envs [group * N / num_groups, (group + 1) * N / num_groups)

:func:`host_spec` gives its :class:`envs.EnvSpec` (what agents build networks from); :class:`JaxHostEnv` puts a
batched JAX env behind this interface (to test the host loop against the in-jit one).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import envs


def host_spec(env) -> envs.EnvSpec:
    spec = env.observation_spec()
    return envs.EnvSpec({k: tuple(s) for k, (s, _) in spec.items()}, True, int(env.num_actions),
                        obs_dtype={k: np.dtype(d).name for k, (_, d) in spec.items()})


class JaxHostEnv:
    """A batched JAX env (``envs.make(name, num_envs=N)``) behind the host-env interface: numpy in, numpy out.

    For testing the host loop against the in-jit loop, and for running JAX envs next to host-only ones.
    """

    def __init__(self, name: str, num_envs: int, seed: int = 0, **kwargs):
        self.env, self.params = envs.make(name, num_envs=num_envs, **kwargs)
        spec = envs.spec(self.env, self.params)
        if not spec.discrete:
            raise ValueError(f"JaxHostEnv: {name} has continuous actions; the host loop supports discrete ones")
        self.num_envs, self.num_actions, self._spec = num_envs, spec.num_actions, spec
        self._key = jax.random.PRNGKey(seed)
        self._step = jax.jit(self.env.step)
        self._reset = jax.jit(self.env.reset)  # compiled once: callers (SQIRL) reset every iteration
        self._state = None

    def observation_spec(self):
        return {"obs": (tuple(self._spec.obs_shape), np.float32)}

    def reset(self):
        self._key, k = jax.random.split(self._key)
        obs, self._state = self._reset(k, self.params)
        return {"obs": np.asarray(obs)}

    def step(self, actions):
        self._key, k = jax.random.split(self._key)
        obs, self._state, r, te, tr, info = self._step(k, self._state, jnp.asarray(actions), self.params)
        info = jax.tree.map(np.asarray, info)
        info["final_obs"] = {"obs": info["final_obs"]}
        return {"obs": np.asarray(obs)}, np.asarray(r), np.asarray(te), np.asarray(tr), info

    def close(self):
        pass
