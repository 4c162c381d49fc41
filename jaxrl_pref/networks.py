"""Network torsos and actor-critic heads shared by the agents."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_pref import recurrent

ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}


def orthogonal(scale: float = 1.0, column_axis: int = -1):
    """Orthogonal initialiser (Haar-distributed, like ``flax.linen.initializers.orthogonal``) computed with
    Gram-Schmidt in plain JAX ops instead of a LAPACK QR.

    Why: under ``vmap`` (seeds, sweeps) the QR becomes a batched LAPACK custom call whose kernel splits the batch
    over XLA's intra-op thread pool and blocks a pool thread waiting for the pieces. With as many concurrent
    kernels as pool threads (2 on a 2-core machine) every thread waits and the program hangs for good (seen
    with 8 vmapped CartPole seeds in jaxlib 0.10.2: all ``tf_XLAEigen`` threads in ``ParallelBatchMap`` of
    ``lapack_sgeqrf``). Matrix-vector products have no such problem, and initialisation runs once.
    """
    def init(key, shape, dtype=jnp.float32):
        shape = tuple(shape)
        n_cols = shape[column_axis]
        n_rows = int(np.prod(shape)) // n_cols
        tall = n_rows >= n_cols
        rows, cols = (n_rows, n_cols) if tall else (n_cols, n_rows)
        a = jax.random.normal(key, (rows, cols), jnp.float32)

        def column(j, q):
            v = a[:, j]
            for _ in range(2):  # twice is enough (Kahan-Parlett); unfilled columns of q are zero
                v = v - q @ (q.T @ v)
            return q.at[:, j].set(v / jnp.linalg.norm(v))

        q = jax.lax.fori_loop(0, cols, column, jnp.zeros((rows, cols), jnp.float32))
        if not tall:
            q = q.T
        q = q.reshape(tuple(np.delete(np.array(shape), column_axis)) + (n_cols,))
        return (scale * jnp.moveaxis(q, -1, column_axis)).astype(dtype)

    return init


def _dense(features: int, scale: float) -> nn.Dense:
    return nn.Dense(features, kernel_init=orthogonal(scale), bias_init=nn.initializers.zeros)


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
    value_heads: int = 1
    """Critic outputs: 1 gives ``value[...]``; K > 1 gives ``value[..., K]``, one per reward stream."""

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
        return pi, value_head(v, self.value_heads)


def value_head(h, heads: int = 1):
    """The critic's output layer: ``[...]`` for one head, ``[..., heads]`` for several (one per reward stream)."""
    v = _dense(heads, 1.0)(h)
    return v[..., 0] if heads == 1 else v


def distribution(pi, discrete: bool) -> distrax.Distribution:
    """The action distribution for the policy parameters an :class:`ActorCritic` returns."""
    if discrete:
        return distrax.Categorical(logits=pi)
    mean, log_std = pi
    return distrax.MultivariateNormalDiag(mean, jnp.exp(log_std))


class NetHackEncoder(nn.Module):
    """Encoder for NetHack/MiniHack observation dicts.

    Keys used (whichever are present): ``glyphs_crop`` ``[..., H, W]`` int glyph ids around the agent
    (embedding + small CNN), ``blstats`` ``[..., 27]`` bottom-line stats (log-scaled MLP), ``message``
    ``[..., 256]`` uint8 bytes (byte embedding, 1-D conv, max-pool). Returns a feature vector ``[..., features]``.

    ``keys`` selects what is encoded (others in the dict are ignored, e.g. the message carried only for a reward
    model); adding ``"glyphs"`` encodes the full ``[..., 21, 79]`` map too (shared glyph embedding, two stride-2
    convs). The encoder's cost is dominated by the message conv (256 positions): leave ``message`` out of
    ``keys`` for a fast policy.
    """
    num_glyphs: int = 5991
    glyph_dim: int = 16
    channels: int = 32
    features: int = 256
    keys: Sequence[str] = ("glyphs_crop", "blstats", "message")
    crop_conv: bool = True
    """False: the embedded crop goes flat into the output layer, without the two convs. On CPU, XLA (jax 0.10)
    runs convolutions inside PPO's minibatch ``lax.scan`` about 10x slower than outside it, so this is the
    fast choice for CPU training."""

    @nn.compact
    def __call__(self, obs: dict):
        parts = []
        use = lambda k: k in obs and k in self.keys  # noqa: E731
        embed = (nn.Embed(self.num_glyphs, self.glyph_dim, name="glyph_embed")
                 if use("glyphs_crop") or use("glyphs") else None)
        if use("glyphs_crop"):
            g = obs["glyphs_crop"].astype(jnp.int32)
            lead = g.shape[:-2]
            x = embed(g.reshape((-1,) + g.shape[-2:]))
            for i in range(2 if self.crop_conv else 0):
                x = nn.relu(nn.Conv(self.channels, (3, 3), padding="SAME", name=f"glyph_conv{i}")(x))
            parts.append(x.reshape(lead + (-1,)))
        if use("glyphs"):
            g = obs["glyphs"].astype(jnp.int32)
            lead = g.shape[:-2]
            x = embed(g.reshape((-1,) + g.shape[-2:]))
            for i in range(2):
                x = nn.relu(nn.Conv(self.channels, (3, 3), strides=2, padding="SAME", name=f"map_conv{i}")(x))
            parts.append(x.reshape(lead + (-1,)))
        if use("blstats"):
            b = obs["blstats"].astype(jnp.float32)
            b = jnp.sign(b) * jnp.log1p(jnp.abs(b))
            parts.append(nn.relu(_dense(64, np.sqrt(2))(b)))
        if use("message"):
            m = obs["message"].astype(jnp.int32)
            lead = m.shape[:-1]
            x = nn.Embed(256, 16, name="byte_embed")(m.reshape((-1, m.shape[-1])))
            x = nn.relu(nn.Conv(self.channels, (5,), padding="SAME", name="msg_conv")(x))
            x = jnp.max(x, axis=-2)  # a message's features do not depend on where words sit
            parts.append(x.reshape(lead + (-1,)))
        if not parts:
            raise ValueError(f"NetHackEncoder: none of keys={tuple(self.keys)} in obs keys {sorted(obs)}")
        return nn.relu(_dense(self.features, np.sqrt(2))(jnp.concatenate(parts, axis=-1)))


class EncoderActorCritic(nn.Module):
    """Shared encoder (e.g. :class:`NetHackEncoder`) with linear actor and critic heads (discrete actions)."""
    num_actions: int
    encoder: nn.Module
    value_heads: int = 1

    @nn.compact
    def __call__(self, obs):
        h = self.encoder(obs)
        return _dense(self.num_actions, 0.01)(h), value_head(h, self.value_heads)


def _blocks_orthogonal(blocks: int):
    """Initialiser of a fused kernel ``[n, blocks * n]``: each ``[n, n]`` block orthogonal, as flax's recurrent
    cells initialise each gate's kernel."""
    def init(key, shape, dtype=jnp.float32):
        n = shape[0]
        return jnp.concatenate([orthogonal()(k, (n, n), dtype) for k in jax.random.split(key, blocks)], axis=1)
    return init


def _gate_bias(cell: str, h: int, forget: float):
    """Initialiser of the fused input bias ``[G * H]``: zeros, the LSTM's forget gate (second block) ``forget``."""
    def init(key, shape, dtype=jnp.float32):
        b = jnp.zeros(shape, dtype)
        return b.at[h:2 * h].set(forget) if cell == "lstm" else b
    return init


class RecurrentCore(nn.Module):
    """A GRU or LSTM over a sequence: ``(carry, x[T, B, in], start[T, B]) -> (carry_T, h[T, B, features])``, the
    carry zeroed before step ``t`` where ``start[t]``. The input projection of all ``T`` steps is one matmul; the
    time loop (:mod:`jaxrl_pref.recurrent`) holds only the hidden recurrence. ``unroll``: time steps per loop
    iteration (1 measured fastest on CPU; compiled code grows with it)."""
    cell: str = "gru"
    features: int = 128
    unroll: int = 1
    forget_bias: float = 1.0
    """LSTM: initial bias of the forget gate (1 keeps the cell state early in training; on MemoryChain-20 it took
    the LSTM from 28 to 32 of 32 seeds solved at 100k steps)."""

    @nn.compact
    def __call__(self, carry, x, start):
        G, H = recurrent.CELLS[self.cell], self.features
        wi = self.param("wi", nn.initializers.lecun_normal(), (x.shape[-1], G * H))
        bi = self.param("bi", _gate_bias(self.cell, H, self.forget_bias), (G * H,))
        wh = self.param("wh", _blocks_orthogonal(G), (H, G * H))
        bh = self.param("bh", nn.initializers.zeros, (G * H,))
        xw = x @ wi + bi  # every step's input projection at once
        return recurrent.sequence(self.cell)(xw, start, carry, wh, bh, self.unroll)

    def initialize_carry(self, batch_shape):
        return recurrent.zero_carry(self.cell, batch_shape, self.features)


def _trunk(m, carry, obs, start):
    """``m``'s torso (its ``encoder``, else ``MLP(hidden)``) then its GRU/LSTM core: ``(carry, h[T, B, H])``. Called
    inside ``m``'s compact method, so the layers are ``m``'s children ("torso"/"encoder", "core")."""
    if m.encoder is not None:
        x = m.encoder(obs)
    else:
        x = MLP(m.hidden, m.activation, name="torso")(obs.astype(jnp.float32))
    return RecurrentCore(m.cell, m.rnn_hidden, m.unroll, name="core")(carry, x, start)


class _Trunk(nn.Module):
    """One torso + core (:func:`_trunk`) as a module, for ``nn.vmap`` over actor and critic."""
    hidden: Sequence[int]
    activation: str
    cell: str
    rnn_hidden: int
    unroll: int
    encoder: Optional[nn.Module] = None

    @nn.compact
    def __call__(self, carry, obs, start):
        return _trunk(self, carry, obs, start)


class RecurrentActorCritic(nn.Module):
    """Torso -> GRU/LSTM core -> actor and critic heads, over sequences: ``(carry, obs[T, B, ...], start[T, B]) ->
    (carry_T, pi[T, B, ...], value[T, B])`` (``pi`` as :class:`ActorCritic` returns it). ``start[t]`` marks an
    episode start: the carry is zeroed there. Acting is the same call with ``T = 1``.

    Array observations: torso ``MLP(hidden)``, heads ``Dense(hidden[-1])`` + activation then the output layer
    (purejaxrl's ``ActorCriticRNN`` with ``hidden=(128,), activation="relu"``). With ``encoder`` (dict observations,
    e.g. :class:`NetHackEncoder`): the encoder is the torso and the heads are linear (as
    :class:`EncoderActorCritic`, the ONI/Motif NetHack model's encoders -> LSTM -> heads)."""
    num_actions: int
    discrete: bool = True
    hidden: Sequence[int] = (64, 64)
    activation: str = "tanh"
    cell: str = "gru"
    rnn_hidden: int = 128
    encoder: Optional[nn.Module] = None
    unroll: int = 1
    value_heads: int = 1
    critic: str = "shared"
    """What the critic reads. ``shared``: the core's output, the core trained by both losses (purejaxrl's
    ``ActorCriticRNN``). ``detached``: the core's output through a stop-gradient, concatenated with the critic's own
    feed-forward torso of the observation (``MLP(hidden)``, or a copy of the encoder): the value loss trains the
    critic's torso and head, never the core. ``separate``: its own torso and core, ``nn.vmap``-ed with the actor's
    over a stack axis (the carry holds both, ``[*batch, 2, rnn_hidden]``; about twice the compute on CPU).

    Why not ``shared`` by default (agents.ppo.Config.critic): regressing large, constant value targets (Acrobot's
    -1 per step, bootstrapped through time limits: V = -100 everywhere) drives a shared core into saturation
    (|h| -> 1, the same output for every state), and the policy reading it can no longer tell states apart."""

    @nn.compact
    def __call__(self, carry, obs, start):
        act = ACTIVATIONS[self.activation]
        if self.critic == "separate":
            trunks = nn.vmap(_Trunk, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(-2, None, None), out_axes=(-2, 0), axis_size=2)
            encoder = self.encoder.clone(parent=None) if self.encoder is not None else None
            carry, hs = trunks(self.hidden, self.activation, self.cell, self.rnn_hidden, self.unroll, encoder,
                               name="trunks")(carry, obs, start)
            h, c = hs[0], hs[1]
        else:
            carry, h = _trunk(self, carry, obs, start)
            c = h
            if self.critic == "detached":
                own = (self.encoder.clone(parent=self, name="critic_encoder")(obs) if self.encoder is not None else
                       MLP(self.hidden, self.activation, name="critic_torso")(obs.astype(jnp.float32)))
                c = jnp.concatenate([jax.lax.stop_gradient(h), own], -1)
        a = h
        if self.encoder is None:
            a = act(_dense(self.hidden[-1], np.sqrt(2))(h))
            c = act(_dense(self.hidden[-1], np.sqrt(2))(c))
        out = _dense(self.num_actions, 0.01)(a)
        if self.discrete:
            pi = out
        else:
            log_std = self.param("log_std", nn.initializers.zeros, (self.num_actions,))
            pi = (out, jnp.broadcast_to(log_std, out.shape))
        return carry, pi, value_head(c, self.value_heads)

    def initialize_carry(self, batch_shape):
        """Zeros: ``[*batch_shape, rnn_hidden]`` for a GRU, a pair ``(c, h)`` of them for an LSTM (with
        ``critic="separate"``, ``[*batch_shape, 2, rnn_hidden]``: the actor's then the critic's)."""
        shape = tuple(batch_shape) + ((2,) if self.critic == "separate" else ())
        return recurrent.zero_carry(self.cell, shape, self.rnn_hidden)


@dataclasses.dataclass(frozen=True)
class NetHackNetConfig:
    """The policy network on NetHack/MiniHack observation dicts: :class:`NetHackEncoder` → actor-critic heads."""
    encode_keys: tuple[str, ...] = ("glyphs_crop", "blstats")
    """Keys the policy network encodes (a subset of obs-keys; message is carried for reward models either way)."""
    glyph_dim: int = 8
    channels: int = 16
    features: int = 64
    crop_conv: bool = False
    """Two 3x3 convs over the embedded crop (the glyph CNN). Off by default: on CPU, XLA runs convolutions inside
    the PPO minibatch scan ~10x slower than outside; turn on for GPU runs."""

    def __post_init__(self):
        from jaxrl_pref.config import require
        require(len(self.encode_keys) > 0, "encode_keys", "must name at least one observation key",
                "pass e.g. --encode-keys glyphs_crop blstats")
        for name in ("glyph_dim", "channels", "features"):
            require(getattr(self, name) > 0, name, "must be positive", f"pass e.g. --{name.replace('_', '-')} 16")

    def check(self, obs_keys: Sequence[str]) -> None:
        from jaxrl_pref.config import require
        require(set(self.encode_keys) <= set(obs_keys), "encode_keys",
                f"{self.encode_keys} must be a subset of obs-keys {tuple(obs_keys)}",
                "add the keys to --obs-keys or drop them from --encode-keys")

    def network(self, num_actions: int) -> EncoderActorCritic:
        return EncoderActorCritic(num_actions, NetHackEncoder(glyph_dim=self.glyph_dim, channels=self.channels,
                                                              features=self.features, keys=tuple(self.encode_keys),
                                                              crop_conv=self.crop_conv))
