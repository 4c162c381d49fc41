"""A Llama-family decoder (Llama 2/3, Qwen2, SmolLM2) as pure functions of a params pytree.

Params (every matrix in the checkpoint layout ``[out, in]``; ``L`` layers stacked on the leading axis so one
``jax.lax.scan`` runs them all)::

    embed [V, D]          final_norm [D]        lm_head [V, D] (absent: tied to embed)
    layers: attn_norm [L, D]  wq [L, Hq*dh, D]  wk, wv [L, Hkv*dh, D]  (bq [L, Hq*dh]  bk, bv [L, Hkv*dh]: Qwen2)
            wo [L, D, Hq*dh]  mlp_norm [L, D]   w_gate, w_up [L, F, D]  w_down [L, D, F]

RoPE uses the Hugging Face rotate-half layout (dimension ``i`` pairs with ``i + dh/2``); the GGUF loader un-permutes
llama.cpp's interleaved q/k rows into it. Attention is causal by *position*: every token carries its position, -1
marks padding (never attended), and a query at position ``p`` sees the keys at positions ``0..p`` -- so left and
right padding, a shared prefix cache and incremental decoding are one code path.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int                 # D
    intermediate_size: int           # F, the SwiGLU width
    num_layers: int                  # L
    num_heads: int                   # Hq
    num_kv_heads: int                # Hkv (GQA: Hq % Hkv == 0)
    head_dim: int                    # dh
    rope_theta: float = 10000.0      # RoPE base
    rms_eps: float = 1e-5
    max_position: int = 2048         # the model's context length, tokens
    tie_embeddings: bool = True
    attention_bias: bool = False     # q/k/v biases (Qwen2)
    rope_freq_factors: Optional[tuple] = None   # per-frequency divisors (Llama-3.1 "llama3" RoPE scaling)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies, radians per position, ``[dh/2]`` float32."""
        f = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        if self.rope_freq_factors is not None:
            f = f / np.asarray(self.rope_freq_factors, np.float64)
        return f.astype(np.float32)


class KV(NamedTuple):
    """Keys/values of some tokens in every layer: ``k, v [L, B, S, Hkv, dh]``, ``pos [B, S]`` int32 (-1: empty)."""
    k: jax.Array
    v: jax.Array
    pos: jax.Array


def empty_kv(cfg: LlamaConfig, batch: int, length: int, dtype) -> KV:
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, length), -1, jnp.int32))


def rms_norm(x, w, eps: float):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope(x, pos, inv_freq):
    """Rotate ``x [B, T, H, dh]`` by positions ``pos [B, T]`` (rotate-half layout)."""
    ang = pos.astype(jnp.float32)[..., None] * inv_freq                  # [B, T, dh/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _linear(x, w, b=None):  # x [..., in] @ w[out, in].T
    y = jnp.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b


def _layer(cfg: LlamaConfig, h, lp, pos, mask, past_k, past_v):
    """One decoder block. ``h [B, T, D]``, ``mask [B, T, S+T]``, ``past_k/v [Bp, S, Hkv, dh]`` (Bp: 1 or B)."""
    B, T, _ = h.shape
    Hq, Hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = rms_norm(h, lp["attn_norm"], cfg.rms_eps)
    q = _linear(x, lp["wq"], lp.get("bq")).reshape(B, T, Hkv, Hq // Hkv, dh)
    k = _linear(x, lp["wk"], lp.get("bk")).reshape(B, T, Hkv, dh)
    v = _linear(x, lp["wv"], lp.get("bv")).reshape(B, T, Hkv, dh)
    inv_freq = jnp.asarray(cfg.inv_freq())
    q = rope(q.reshape(B, T, Hq, dh), pos, inv_freq).reshape(B, T, Hkv, Hq // Hkv, dh)
    k = rope(k, pos, inv_freq)
    full = lambda p: jnp.broadcast_to(p, (B,) + p.shape[1:])
    keys = jnp.concatenate([full(past_k), k], axis=1)                     # [B, S+T, Hkv, dh]
    vals = jnp.concatenate([full(past_v), v], axis=1)
    s = jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32) / np.sqrt(dh)
    s = jnp.where(mask[:, None, None], s, jnp.float32(-1e30))
    p = jax.nn.softmax(s, axis=-1).astype(vals.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, vals).reshape(B, T, Hq * dh)
    h = h + _linear(o, lp["wo"])
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_eps)
    h = h + _linear(jax.nn.silu(_linear(x, lp["w_gate"])) * _linear(x, lp["w_up"]), lp["w_down"])
    return h, (k, v)


def forward(params, cfg: LlamaConfig, tokens, positions, past: Optional[KV] = None):
    """Run the decoder over new tokens after an optional KV cache.

    tokens, positions: ``[B, T]`` int32 (position -1 = padding). past: the cache the new tokens attend to (batch 1
    broadcasts), or None. Returns ``(hidden [B, T, D] after the final norm, KV of the new tokens [L, B, T, ...])``.
    """
    B, T = tokens.shape
    if past is None:
        past = empty_kv(cfg, 1, 0, params["embed"].dtype)
    kpos = jnp.concatenate([jnp.broadcast_to(past.pos, (B, past.pos.shape[1])), positions], axis=1)
    mask = (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= positions[:, :, None])     # [B, T, S+T]
    rope_pos = jnp.maximum(positions, 0)
    h = jnp.take(params["embed"], tokens, axis=0)

    def body(h, xs):
        lp, pk, pv = xs
        return _layer(cfg, h, lp, rope_pos, mask, pk, pv)

    h, (k, v) = jax.lax.scan(body, h, (params["layers"], past.k, past.v))
    return rms_norm(h, params["final_norm"], cfg.rms_eps), KV(k, v, positions)


def logits(params, h):
    """Next-token logits, float32 ``[..., V]``, from final hidden states ``[..., D]``."""
    head = params.get("lm_head", params["embed"])
    return jnp.einsum("...d,vd->...v", h, head, preferred_element_type=jnp.float32)
