"""Labels/s of the in-process LLM (jaxrl_pref.llm) scoring MiniHack-like messages yes/no under one shared prompt,
with the prefix KV cache on and off, in one run.

    python -m benchmarks.llm_throughput                       # SmolLM2-135M-Instruct (Q4_1 GGUF), float32, CPU

Each label is ``LLM.choice_probs(prefix, [message + end of turn], ["yes", "no"])`` for a distinct message (the
answer memo never hits), in batches of ``--batch``. The prefix (ChatML system + instruction) is ~90 tokens. Cached
and uncached batches alternate, so load changes on a shared machine hit both alike. Reported: labels/s of each,
compile time (a path's first call less the same call repeated: the prefix encoder and one length bucket; the
other buckets compile in untimed warm-up calls), load time, peak RSS (``resource.getrusage``). Targets: >= 40
labels/s cached, compile <= 5 s, RSS <= 1.5 GB.

Measured (this project's 2-core machine, 2026-12-07, ``python -m benchmarks.llm_throughput``, float32, batch 32,
rounds 4, prefix 94 tokens, messages 10-23 tokens with the end-of-turn suffix, batch buckets 1/4/8/16/32), three
runs with nothing else running (load average 1.4-2.0 from the jobs before):

    17:48  prefix cache on 39.0 labels/s, off 4.8; compile 1.26 s / 0.77 s; load 5.3 s; peak RSS 1.18 GB
    17:52  prefix cache on 33.5 labels/s, off 4.3; compile 1.31 s / 0.39 s; load 4.8 s; peak RSS 1.19 GB
    17:55  prefix cache on 33.3 labels/s, off 4.0; compile 1.60 s / 0.26 s; load 6.0 s; peak RSS 1.19 GB

(16:57, with another benchmark on ~1.1 cores: 24.6 cached, 3.0 uncached.) So: compile and memory well inside their
targets, the prefix cache worth ~8x, and the cached rate 33-39 labels/s, **under the 40 asked**. The scoring is
matmul-bound: a batch of 32 prompts of ~16-24 tokens is ~110-160 GFLOP through the 106M non-embedding weights, about
one second at the ~100-130 GFLOP/s two cores give float32 (bfloat16 is no faster on this CPU: 89 vs 87 GFLOP/s in an
isolated matmul). The annotator backend's prompts carry 10 tokens after the message (end of turn, the assistant's
turn, ``\\boxed{``), so NetHack messages of ~12 tokens land in the 24-token bucket: ~21 labels/s through the backend
(``benchmarks/oni_overhead.py --annotator llm``'s last line).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import time

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

from jaxrl_pref.llm import LLM  # noqa: E402
from jaxrl_pref.llm.engine import _len_bucket  # noqa: E402

INSTRUCTION = ("You are helping an agent that plays NetHack, a roguelike dungeon game. You will be shown one message "
               "from the game. Decide whether the message reports progress toward exploring the dungeon, finding "
               "items, gaining gold, or defeating monsters. Messages about walls, closed doors, noises, or "
               "monsters attacking the agent are not progress. Answer with a single word, yes or no, and nothing "
               "else.")
_ITEMS = ["a +0 dagger", "a scroll labeled ZELGO MER", "an uncursed food ration", "a blessed +1 long sword",
          "a potion of healing", "a wand of digging", "a small mimic", "a leather armor", "3 arrows", "a key"]
_MONSTERS = ["newt", "jackal", "grid bug", "kobold", "gnome lord", "sewer rat", "floating eye", "lichen"]
_VERBS = ["hits", "misses", "bites", "kills", "touches"]


def messages(n: int) -> list[str]:
    """``n`` distinct MiniHack-like messages."""
    gen = itertools.chain(
        (f"You see here {i}." for i in _ITEMS),
        (f"The {m} {v} you!" for m in _MONSTERS for v in _VERBS),
        (f"You kill the {m}!" for m in _MONSTERS),
        (f"{g} gold pieces." for g in range(1, 10_000)),
    )
    extra = ["The door opens.", "It's a wall.", "You hear some noises in the distance.", "You find a hidden passage.",
             "Welcome to NetHack!  You are a neutral male gnomish Wizard.", "This door is locked."]
    return (extra + list(itertools.islice(gen, n)))[:n]


def load(model: str = "default", dtype: str = "float32", platform=None):
    """(LLM, seconds it took to load)."""
    t0 = time.perf_counter()
    llm = LLM.load(model, dtype=dtype, platform=platform)
    return llm, time.perf_counter() - t0


def measure(llm: LLM, batch: int = 32, rounds: int = 4) -> dict:
    """Labels/s with and without the prefix cache, compile seconds, peak RSS (and peak device memory off CPU)."""
    # the chat template split at the message: prefix = system + user-turn start, suffix = end of turn + reply start
    chat = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": "\0"}]
    prefix, suffix = llm.chat(chat).split("\0")
    msgs = [m + suffix for m in messages(batch * (2 * rounds + 4))]
    batches = [msgs[i:i + batch] for i in range(0, len(msgs), batch)]
    run = lambda b, cached: llm.choice_probs(prefix, b, ["yes", "no"], use_prefix_cache=cached)
    compile_s = {}
    for cached, b in ((True, batches[0]), (False, batches[1])):   # compile = first call - the same call again
        spent = []
        for _ in range(2):
            llm.clear_caches()
            t = time.perf_counter()
            run(b, cached)
            spent.append(time.perf_counter() - t)
        compile_s[cached] = spent[0] - spent[1]
    # timed batches must not compile: run one batch of each new (path, length bucket) untimed first
    n_pre = len(llm._ids(prefix))
    bucket = lambda b, cached: (cached, _len_bucket(max(len(llm.tokenizer.encode(m)) for m in b)
                                                     + (1 if cached else n_pre)))
    seen = {bucket(batches[0], True), bucket(batches[1], False)}
    times = {True: [], False: []}
    for r in range(rounds):
        for cached in (True, False):
            if bucket(batches[2 + 2 * r + cached], cached) not in seen:
                seen.add(bucket(batches[2 + 2 * r + cached], cached))
                run(batches[2 + 2 * r + cached], cached)
                llm.clear_caches()
                run(batches[0], True)      # the prefix back in its cache, as in steady state
            t = time.perf_counter()
            run(batches[2 + 2 * r + cached], cached)
            times[cached].append(time.perf_counter() - t)
    lens = [len(llm.tokenizer.encode(m)) for m in msgs]
    res = {
        "model": llm.describe(), "batch": batch, "rounds": rounds,
        "prefix_tokens": n_pre, "length_buckets": sorted(seen),
        "message_tokens": [min(lens), max(lens)],
        "labels_per_s_cached": round(batch * rounds / sum(times[True]), 1),
        "labels_per_s_uncached": round(batch * rounds / sum(times[False]), 1),
        "compile_s_cached": round(compile_s[True], 2), "compile_s_uncached": round(compile_s[False], 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
    }
    if llm.devices[0].platform != "cpu":
        stats = llm.devices[0].memory_stats() or {}
        res["peak_device_gb"] = round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2)
    return res


def arguments(doc: str, model: str = "default", dtype: str = "float32", rounds: int = 4) -> argparse.ArgumentParser:
    """The options both LLM benchmarks take (this one and ``llm_accelerator``)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--model", default=model, required=model is None,
                    help="'default' (SmolLM2), a .gguf file or a Hugging Face model directory")
    ap.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16"])
    ap.add_argument("--platform", default=None, help="cpu, gpu or tpu (default: JAX's default devices)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=rounds)
    return ap


def main(argv=None) -> dict:
    a = arguments(__doc__).parse_args(argv)
    llm, load_s = load(a.model, a.dtype, a.platform)
    res = {**measure(llm, a.batch, a.rounds), "load_s": round(load_s, 1)}
    print(f"{res['model']}: {res['labels_per_s_cached']} labels/s with the prefix cache, "
          f"{res['labels_per_s_uncached']} without; compile {res['compile_s_cached']} s / "
          f"{res['compile_s_uncached']} s; load {res['load_s']} s; peak RSS {res['peak_rss_gb']} GB "
          f"(load average {res['loadavg_1m']} on {res['cpus']} CPUs)")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
