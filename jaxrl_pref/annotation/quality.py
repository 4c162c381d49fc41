"""Label quality of an annotator against reference labels: AUC (with a bootstrap interval), accuracy at its own
threshold, pairwise agreement asked in both orders (and, for a backend that averages the orders, each order alone),
and a goal-swap control. ``benchmarks/label_quality.py`` runs it over the hand-labelled NetHack/MiniHack messages of
``benchmarks/data/label_reference.jsonl``; its docstring defines the metrics and records the results."""
from __future__ import annotations

import ast
import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from jaxrl_pref.annotation.backends import Prompt, make_backend, task_for_env
from jaxrl_pref.stats import auc, bootstrap_interval

GOAL_ENVS = {"keyroom": "MiniHack-KeyRoom-Fixed-S5-v0", "staircase": "NetHackStaircase-v0",
             "score": "NetHackScore-v0"}
SWAP_GOAL = "The player is in a kitchen and wants to bake a chocolate cake: mix the batter, bake it and frost it."
SWAP_PROGRESS = ("You mix the flour, sugar and eggs into a smooth batter.", "You melt the chocolate.",
                 "The cake rises nicely in the oven.", "You take a golden-brown cake out of the oven.",
                 "You spread the chocolate frosting on the cake.")
SWAP_NEUTRAL = ("The oven is cold.", "You drop the wooden spoon.", "The batter is lumpy.",
                "The kitchen clock ticks.", "You burn your finger.")


def _pref(reply) -> float:
    return 0.5 if reply.label is None else float(reply.label)


def pair_agreement(backend, prompt: Prompt, pairs: Sequence[tuple]) -> dict:
    """``pairs`` are (positive, negative): ``ab``/``ba`` mean P(positive preferred) asked in each order (tie and
    unparsed 1/2), ``pair`` their mean, ``consistent`` the fraction of pairs answered alike in both orders,
    ``unparsed`` the replies that did not parse."""
    ab = _batched(backend.compare, prompt, [(p, n) for p, n in pairs], backend)
    ba = _batched(backend.compare, prompt, [(n, p) for p, n in pairs], backend)
    p_ab = np.array([_pref(r) for r in ab])
    p_ba = 1.0 - np.array([_pref(r) for r in ba])  # P(positive preferred) in the swapped order
    out = {"ab": float(p_ab.mean()), "ba": float(p_ba.mean()), "pair": float((p_ab.mean() + p_ba.mean()) / 2),
           "consistent": float(np.mean(np.isclose(p_ab, p_ba))),
           "unparsed": int(sum(r.label is None for r in list(ab) + list(ba))), "n_pairs": len(pairs)}
    if hasattr(backend, "preferences"):  # a backend that averages both orders: its single orders, before averaging
        first, second = (np.concatenate(x) for x in zip(*(
            backend.preferences(prompt, pairs[i:i + 64]) for i in range(0, len(pairs), 64))))
        out.update({"single_ab": float(first.mean()), "single_ba": float(second.mean()),
                    "single_consistent": float(np.mean((first > 0.5) == (second > 0.5)))})
    return out


def _batched(fn, prompt, items: list, backend) -> list:
    bs = max(int(getattr(backend, "batch_size", 64) or 1), 1)
    out = []
    for i in range(0, len(items), bs):
        out += list(fn(prompt, items[i:i + bs]))
    return out


def swap_goal(prompt: Prompt, goal: str = SWAP_GOAL, progress: Sequence[str] = SWAP_PROGRESS,
              neutral: Sequence[str] = SWAP_NEUTRAL) -> Prompt:
    """``prompt`` with its task replaced: ``description`` (and ``goal``, if it has one) say ``goal``, and the
    ``progress``/``neutral`` examples (if it has them) are ``progress``/``neutral``; system, label and compare
    templates unchanged."""
    s = dict(prompt.sections)
    s["description"] = goal
    if "goal" in s:
        s["goal"] = goal
    if "progress" in s:
        s["progress"] = "\n".join(progress)
    if "neutral" in s:
        s["neutral"] = "\n".join(neutral)
    return dataclasses.replace(prompt, sections=s, version=prompt.version + "-goalswap")


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` -> (name, kwargs); values as Python literals where they parse."""
    name, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"annotator {spec!r}: {item!r} is not key=value")
        try:
            kw[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            kw[k.strip()] = v.strip()
    return name.strip(), kw


def scores(backend, prompt: Prompt, messages: list) -> tuple[np.ndarray, np.ndarray]:
    """(continuous score, label) per message: ``backend.scores`` where it exists, else the label value."""
    replies = _batched(backend.label, prompt, messages, backend)
    lab = np.array([np.nan if r.label is None else float(r.label) for r in replies])
    if hasattr(backend, "scores"):
        s = np.concatenate([np.asarray(backend.scores(prompt, messages[i:i + 256]), np.float64)
                            for i in range(0, len(messages), 256)]) if messages else np.zeros(0)
    else:
        s = np.nan_to_num(lab, nan=0.5)  # an unparsed label ranks between the two answers
    return s, lab


def load_reference(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sample_pairs(rows: list, goal: str, n: int, seed: int = 0) -> list[tuple]:
    """``n`` (positive, negative) message pairs of ``goal``, drawn with a seeded generator (distinct pairs while
    there are enough)."""
    pos = [r["message"] for r in rows if r["labels"][goal]]
    neg = [r["message"] for r in rows if not r["labels"][goal]]
    if not pos or not neg:
        return []
    rng = np.random.default_rng([seed, sorted(GOAL_ENVS).index(goal) if goal in GOAL_ENVS else 0])
    total = len(pos) * len(neg)
    idx = rng.choice(total, size=min(n, total), replace=False)
    return [(pos[i // len(neg)], neg[i % len(neg)]) for i in idx]


def evaluate(backend, rows: list, goals: Sequence[str] = tuple(GOAL_ENVS), pairs: int = 200, resamples: int = 1000,
             seed: int = 0) -> dict:
    """The metrics of the module docstring for one backend over ``rows`` (reference rows), per goal."""
    messages = [r["message"] for r in rows]
    out = {}
    for goal in goals:
        prompt = Prompt.load(task_for_env(GOAL_ENVS[goal]))
        y = np.array([r["labels"][goal] for r in rows], np.int64)
        t = time.perf_counter()
        s, lab = scores(backend, prompt, messages)
        swapped, _ = scores(backend, swap_goal(prompt), messages)
        ok = ~np.isnan(lab)
        res = {"task": prompt.task, "n": len(rows), "positives": int(y.sum()), "auc": auc(s, y),
               "auc_ci": bootstrap_interval(auc, s, y, resamples=resamples, seed=seed),
               "acc": float(((lab[ok] > 0.5) == (y[ok] == 1)).mean()) if ok.any() else float("nan"),
               "unlabelled": int((~ok).sum()), "swap_auc": auc(swapped, y),
               "swap_auc_ci": bootstrap_interval(auc, swapped, y, resamples=resamples, seed=seed)}
        res.update(pair_agreement(backend, prompt, sample_pairs(rows, goal, pairs, seed)))
        res["seconds"] = time.perf_counter() - t
        out[goal] = res
    return out


def table(results: dict) -> str:
    """A markdown table: annotator x goal."""
    head = ("| annotator | goal (pos/n) | AUC [95% CI] | acc | pairs AB / BA / mean | consistent | goal-swap AUC |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for name, per_goal in results.items():
        for goal, r in per_goal.items():
            lo, hi = r["auc_ci"]
            lines.append(f"| {name} | {goal} ({r['positives']}/{r['n']}) | {r['auc']:.3f} [{lo:.3f}, {hi:.3f}] | "
                         f"{r['acc']:.3f} | {r['ab']:.3f} / {r['ba']:.3f} / {r['pair']:.3f} | "
                         f"{r['consistent']:.3f} | {r['swap_auc']:.3f} |")
    single = [(name, goal, r) for name, per_goal in results.items() for goal, r in per_goal.items()
              if "single_ab" in r]
    if single:  # the position bias that averaging over both orders cancels
        lines += ["", "| annotator | goal | one order: P(positive preferred) shown first / shown second | "
                  "same answer in both orders |", "|---|---|---|---|"]
        lines += [f"| {name} | {goal} | {r['single_ab']:.3f} / {r['single_ba']:.3f} | {r['single_consistent']:.3f} |"
                  for name, goal, r in single]
    return "\n".join(lines)


def build(spec: str, openai_url: Optional[str] = None, openai_model: Optional[str] = None):
    name, kw = parse_spec(spec)
    if name == "openai":
        kw.setdefault("base_url", openai_url)
        kw.setdefault("model", openai_model)
    return make_backend(name, **kw)
