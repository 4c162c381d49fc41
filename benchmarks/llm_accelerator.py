"""The in-process LLM's labels/s on a GPU/TPU: a 1-8B Hugging Face safetensors model in bfloat16 over the local
devices (replicated, or sharded along the output dim when the weights pass 2 GB), the measurement of
``benchmarks/llm_throughput.py`` (yes/no labels of distinct MiniHack-like messages under one ~90-token prompt, prefix
cache on and off), plus greedy generation tokens/s.

    python -m benchmarks.llm_accelerator --model /path/to/Llama-3.2-1B-Instruct        # or Qwen2.5-7B-Instruct, ...
    python -m benchmarks.llm_accelerator --model DIR --batch 32 --rounds 8 --gen-batch 8 --gen-tokens 64

Prints one summary line and one JSON line (labels/s cached and uncached, compile s, load s, peak device memory,
peak RSS, generation tokens/s). Not run on this project's CPU machine; sized to finish in a few minutes on one GPU.
"""
from __future__ import annotations

import json
import time

from benchmarks.llm_throughput import arguments, load, measure, messages


def generation(llm, batch: int, tokens: int) -> dict:
    """Greedy generation tokens/s (batch ``batch``, ``tokens`` new tokens each; the first call compiles)."""
    prompts = [llm.chat([{"role": "user", "content": f"Describe this NetHack message: {m}"}])
               for m in messages(batch)]
    t = time.perf_counter()
    llm.complete(prompts, max_new_tokens=tokens)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = llm.complete(prompts, max_new_tokens=tokens)
    dt = time.perf_counter() - t
    n = sum(len(c.token_ids) for c in out)
    return {"gen_tokens_per_s": round(n / dt, 1), "gen_compile_s": round(first - dt, 2), "gen_tokens": n,
            "gen_sample": out[0].text[:120]}


def main(argv=None) -> dict:
    ap = arguments(__doc__, model=None, dtype="bfloat16", rounds=8)
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=64)
    a = ap.parse_args(argv)
    llm, load_s = load(a.model, a.dtype, a.platform)
    res = {**measure(llm, a.batch, a.rounds), "load_s": round(load_s, 1), **generation(llm, a.gen_batch, a.gen_tokens)}
    print(f"{res['model']}: {res['labels_per_s_cached']} labels/s with the prefix cache, "
          f"{res['labels_per_s_uncached']} without; compile {res['compile_s_cached']} s; load {res['load_s']} s; "
          f"peak device memory {res.get('peak_device_gb', '?')} GB; generation {res['gen_tokens_per_s']} tokens/s")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
