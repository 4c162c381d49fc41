"""Recurrent cores (GRU, LSTM) over whole sequences, written for speed, and the policy state a rollout carries.

A core runs ``(carry, xw[T, B, G*H], start[T, B]) -> (carry_T, h[T, B, H])``: ``xw`` is the input projection of all
``T`` steps, computed by the caller in ONE matmul outside the time loop (:class:`jaxrl_pref.networks.RecurrentCore`);
the ``lax.scan`` holds only the hidden recurrence (one ``[B, H] @ [H, G*H]`` matmul and a fused elementwise block per
step). ``start[t]`` marks an episode start: the carry entering step ``t`` is zeroed there.

The backward pass is written by hand (``jax.custom_vjp``): a reverse scan with one ``[B, G*H] @ [G*H, H]`` matmul per
step, and the weight gradient ``sum_t h_t^T dgates_t`` as ONE matmul after the loop. Autodiff of the scan would
instead add a ``[H, G*H]`` outer product into an accumulator at every step, which on CPU costs more than the rest of
the step.

Gate layout, fused along the last axis of the kernels ``wi [in, G*H]``, ``wh [H, G*H]`` and biases ``[G*H]``:

* GRU (``G = 3``, flax's ``GRUCell`` equations): ``r, z, n``;
  ``r = s(xr + hr)``, ``z = s(xz + hz)``, ``n = tanh(xn + r * hn)``, ``h' = (1 - z) * n + z * h``
  where ``[hr, hz, hn] = h @ wh + bh``.
* LSTM (``G = 4``, flax's ``LSTMCell`` equations, carry ``(c, h)``): ``i, f, g, o``;
  ``c' = s(f) * c + s(i) * tanh(g)``, ``h' = s(o) * tanh(c')``.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

CELLS = {"gru": 3, "lstm": 4}  # cell name -> gates G (kernels are [., G * H])


@struct.dataclass
class RecurrentState:
    """The policy state entering a step, for a batch of envs: the core's ``carry`` as the previous step left it
    (before any reset) and ``start`` ``[B]`` (the step's observation begins an episode, so the carry is reset
    before use). A rollout stores one per step (:attr:`jaxrl_pref.rollout.Transition.policy_state`)."""
    carry: Any
    start: jax.Array


def zero_carry(cell: str, batch_shape, features: int, dtype=jnp.float32):
    """The initial carry: zeros ``[*batch_shape, H]`` (GRU) or a pair of them, ``(c, h)`` (LSTM)."""
    z = jnp.zeros(tuple(batch_shape) + (features,), dtype)
    return (z, z) if cell == "lstm" else z


def output(cell: str, carry):
    """The hidden output ``h`` held in ``carry``."""
    return carry[1] if cell == "lstm" else carry


def _sigmoid(x):
    return jax.nn.sigmoid(x)


def _reset(start_t, x):
    return jnp.where(start_t[:, None], jnp.zeros_like(x), x)


def _scan(step, carry, xs, unroll: int, reverse: bool = False):
    T = jax.tree.leaves(xs)[0].shape[0]
    return jax.lax.scan(step, carry, xs, reverse=reverse, unroll=max(1, min(unroll, T)))


# -- GRU ----------------------------------------------------------------------------------------------------------

def _gru_step(wh, bh, h, xw_t, start_t):
    H = h.shape[-1]
    h = _reset(start_t, h)
    hw = h @ wh + bh
    r = _sigmoid(xw_t[..., :H] + hw[..., :H])
    z = _sigmoid(xw_t[..., H:2 * H] + hw[..., H:2 * H])
    hn = hw[..., 2 * H:]
    n = jnp.tanh(xw_t[..., 2 * H:] + r * hn)
    return (1.0 - z) * n + z * h, (h, r, z, n, hn)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def gru_sequence(xw, start, h0, wh, bh, unroll: int = 1):
    """GRU over ``T`` steps: returns ``(h_T, hs[T, B, H])``. ``xw = x @ wi + bi``, ``[T, B, 3H]``."""
    if xw.shape[0] == 1:  # acting: no loop
        h, _ = _gru_step(wh, bh, h0, xw[0], start[0])
        return h, h[None]

    def step(h, inp):
        h, _ = _gru_step(wh, bh, h, *inp)
        return h, h
    return _scan(step, h0, (xw, start), unroll)


def _gru_fwd(xw, start, h0, wh, bh, unroll):
    def step(h, inp):
        h, res = _gru_step(wh, bh, h, *inp)
        return h, (h, res)
    hT, (hs, res) = _scan(step, h0, (xw, start), unroll)
    return (hT, hs), (res, start, wh)


def _gru_bwd(unroll, saved, cts):
    # per step: the gates' gradients from the stored activations, one [B, 3H] @ [3H, H] matmul for dh; the weight
    # gradient sum_t h_t^T dgates_t after the loop
    (h_in, r, z, n, hn), start, wh = saved
    d_hT, d_hs = cts
    whT = wh.T

    def step(dh, inp):
        g_out, h, r, z, n, hn, s = inp
        g = dh + g_out
        dn_pre = g * (1.0 - z) * (1.0 - n * n)
        dz_pre = g * (h - n) * z * (1.0 - z)
        dr_pre = dn_pre * hn * r * (1.0 - r)
        dhw = jnp.concatenate([dr_pre, dz_pre, dn_pre * r], axis=-1)
        dh_in = g * z + dhw @ whT
        dxw = jnp.concatenate([dr_pre, dz_pre, dn_pre], axis=-1)
        return _reset(s, dh_in), (dxw, dhw)

    dh0, (dxw, dhw) = _scan(step, d_hT, (d_hs, h_in, r, z, n, hn, start), unroll, reverse=True)
    flat = dhw.reshape(-1, dhw.shape[-1])
    return dxw, None, dh0, h_in.reshape(-1, h_in.shape[-1]).T @ flat, flat.sum(0)


gru_sequence.defvjp(_gru_fwd, _gru_bwd)


# -- LSTM ---------------------------------------------------------------------------------------------------------

def _lstm_step(wh, bh, carry, xw_t, start_t):
    c, h = carry
    H = h.shape[-1]
    c, h = _reset(start_t, c), _reset(start_t, h)
    pre = xw_t + (h @ wh + bh)
    i = _sigmoid(pre[..., :H])
    f = _sigmoid(pre[..., H:2 * H])
    g = jnp.tanh(pre[..., 2 * H:3 * H])
    o = _sigmoid(pre[..., 3 * H:])
    c_new = f * c + i * g
    tc = jnp.tanh(c_new)
    return (c_new, o * tc), (c, h, i, f, g, o, tc)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def lstm_sequence(xw, start, carry0, wh, bh, unroll: int = 1):
    """LSTM over ``T`` steps: returns ``((c_T, h_T), hs[T, B, H])``. ``xw = x @ wi + bi``, ``[T, B, 4H]``."""
    if xw.shape[0] == 1:
        carry, _ = _lstm_step(wh, bh, carry0, xw[0], start[0])
        return carry, carry[1][None]

    def step(carry, inp):
        carry, _ = _lstm_step(wh, bh, carry, *inp)
        return carry, carry[1]
    return _scan(step, carry0, (xw, start), unroll)


def _lstm_fwd(xw, start, carry0, wh, bh, unroll):
    def step(carry, inp):
        carry, res = _lstm_step(wh, bh, carry, *inp)
        return carry, (carry[1], res)
    carryT, (hs, res) = _scan(step, carry0, (xw, start), unroll)
    return (carryT, hs), (res, start, wh)


def _lstm_bwd(unroll, saved, cts):
    (c_in, h_in, i, f, g, o, tc), start, wh = saved
    (d_cT, d_hT), d_hs = cts
    whT = wh.T

    def step(carry, inp):
        dc, dh = carry
        g_out, c, i, f, g, o, tc, s = inp
        gh = dh + g_out
        dc = dc + gh * o * (1.0 - tc * tc)
        dpre = jnp.concatenate([dc * g * i * (1.0 - i), dc * c * f * (1.0 - f), dc * i * (1.0 - g * g),
                                gh * tc * o * (1.0 - o)], axis=-1)
        return (_reset(s, dc * f), _reset(s, dpre @ whT)), dpre

    (dc0, dh0), dpre = _scan(step, (d_cT, d_hT), (d_hs, c_in, i, f, g, o, tc, start), unroll, reverse=True)
    flat = dpre.reshape(-1, dpre.shape[-1])
    return dpre, None, (dc0, dh0), h_in.reshape(-1, h_in.shape[-1]).T @ flat, flat.sum(0)


lstm_sequence.defvjp(_lstm_fwd, _lstm_bwd)


def sequence(cell: str):
    """The sequence function of ``cell``: :func:`gru_sequence` or :func:`lstm_sequence`."""
    return {"gru": gru_sequence, "lstm": lstm_sequence}[cell]
