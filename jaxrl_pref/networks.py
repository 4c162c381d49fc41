"""Network torsos and actor-critic heads shared by the agents."""
from __future__ import annotations

from typing import Sequence

import distrax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}


def _dense(features: int, scale: float) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.orthogonal(scale), bias_init=nn.initializers.zeros)


class MLP(nn.Module):
    """Orthogonally initialised MLP torso."""
    hidden: Sequence[int] = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        for h in self.hidden:
            x = act(_dense(h, np.sqrt(2))(x))
        return x


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs. Returns (policy parameters, value).

    Discrete: policy parameters are logits ``[..., num_actions]``. Continuous: ``(mean, log_std)`` of a
    diagonal Gaussian with a state-independent, learned log-std.
    """
    num_actions: int
    discrete: bool = True
    hidden: Sequence[int] = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, obs):
        x = obs.astype(jnp.float32)
        h = MLP(self.hidden, self.activation, name="actor_torso")(x)
        out = _dense(self.num_actions, 0.01)(h)
        if self.discrete:
            pi = out
        else:
            log_std = self.param("log_std", nn.initializers.zeros, (self.num_actions,))
            pi = (out, jnp.broadcast_to(log_std, out.shape))
        v = MLP(self.hidden, self.activation, name="critic_torso")(x)
        value = _dense(1, 1.0)(v)[..., 0]
        return pi, value


def distribution(pi, discrete: bool) -> distrax.Distribution:
    """The action distribution for the policy parameters an :class:`ActorCritic` returns."""
    if discrete:
        return distrax.Categorical(logits=pi)
    mean, log_std = pi
    return distrax.MultivariateNormalDiag(mean, jnp.exp(log_std))
