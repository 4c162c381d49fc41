"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) and the chat template (Jinja, rendered as transformers does).

Built either from a ``tokenizer.json`` or from a GGUF file's vocabulary and merges. Special tokens (GGUF token types
CONTROL and USER_DEFINED, or ``added_tokens`` marked special) are matched in text, so ``"<|im_start|>"`` encodes
to its id. ``encode`` never adds BOS; the engine prepends it for models that want one (:attr:`Tokenizer.add_bos`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the split regex before byte-level BPE
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _USER_DEFINED = 3, 4   # GGUF token types that are special


class Tokenizer:
    """Text <-> token ids, plus the model's chat template.

    Attributes: ``bos_id`` (or None), ``add_bos`` (the model expects BOS first), ``stop_ids`` (ids that end a
    generation: EOS and the chat end-of-turn tokens), ``chat_template`` (Jinja source, or None).
    """

    def __init__(self, hf, bos_id: Optional[int], stop_ids: Sequence[int], add_bos: bool,
                 chat_template: Optional[str], bos_token: str = "", eos_token: str = ""):
        self.hf, self.bos_id, self.add_bos = hf, bos_id, add_bos
        self.stop_ids = tuple(sorted({int(i) for i in stop_ids}))
        self.chat_template, self.bos_token, self.eos_token = chat_template, bos_token, eos_token
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings in it become their ids; no BOS added)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_str(self, i: int) -> str:
        """The text of one token (a partial UTF-8 character decodes to U+FFFD)."""
        return self.hf.decode([int(i)], skip_special_tokens=False)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{role, content}, ...]) with the model's Jinja chat template."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template: build the prompt text yourself")
        if self._template is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise jinja2.exceptions.TemplateError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)


def from_gguf_fields(tokens: Sequence[str], merges: Sequence[str], types: Optional[Sequence[int]], pre: str,
                     bos_id: Optional[int], eos_id: Optional[int], add_bos: bool,
                     chat_template: Optional[str], extra_stop_ids: Sequence[int] = ()) -> Tokenizer:
    """A byte-level BPE tokenizer from a GGUF file's ``tokenizer.ggml.*`` fields (model ``gpt2``)."""
    from tokenizers import AddedToken, Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    hf = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, ignore_merges=False))
    regex = {"llama-bpe": _LLAMA3_RE, "llama3": _LLAMA3_RE, "qwen2": _QWEN2_RE}.get(pre)
    if regex is not None:
        split = [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:   # gpt2, smollm and others: GPT-2's regex; smollm (and starcoder) also split digits one by one
        split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre in ("smollm", "starcoder", "refact"):
            split.insert(0, pre_tokenizers.Digits(individual_digits=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(split)
    hf.decoder = decoders.ByteLevel()
    special = [i for i, t in enumerate(types or ()) if t in (_CONTROL, _USER_DEFINED)]
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    stops = [i for i in (eos_id, *extra_stop_ids) if i is not None]
    stops += [vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>") if t in vocab]
    tok = lambda i: tokens[i] if i is not None and 0 <= i < len(tokens) else ""
    return Tokenizer(hf, bos_id, stops, add_bos, chat_template, tok(bos_id), tok(eos_id))


def _token_text(t) -> str:
    return t.get("content", "") if isinstance(t, dict) else (t or "")


def from_hf_dir(d: Path, extra_stop_ids: Sequence[int] = ()) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory: ``tokenizer.json`` (+ ``tokenizer_config.json``)."""
    from tokenizers import Tokenizer as HFTokenizer
    path = d / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{d} has no tokenizer.json: copy it from the model's Hugging Face repository")
    hf = HFTokenizer.from_file(str(path))
    hf.no_padding()
    hf.no_truncation()
    tc = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
    template = tc.get("chat_template")
    if isinstance(template, list):   # [{name, template}, ...]: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    bos, eos = _token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))
    bos_id = hf.token_to_id(bos) if bos else None
    # does the tokenizer's own post-processor put BOS first? (Llama 3's does; Qwen2's and SmolLM2's do not)
    with_special = hf.encode("a", add_special_tokens=True).ids
    plain = hf.encode("a", add_special_tokens=False).ids
    add_bos = bool(tc.get("add_bos_token", len(with_special) > len(plain) and with_special[0] != plain[0]))
    if add_bos and bos_id is None:
        bos_id = with_special[0]
    stops = list(extra_stop_ids) + ([hf.token_to_id(eos)] if eos and hf.token_to_id(eos) is not None else [])
    stops += [i for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")
              if (i := hf.token_to_id(t)) is not None]
    return Tokenizer(hf, bos_id, stops, add_bos, template, bos, eos)
