"""Label quality of the annotators against hand-written labels of real NetHack/MiniHack messages.

    python -m benchmarks.label_quality --annotators embedded scripted bow [--json out.json]
    python -m benchmarks.label_quality --annotators openai --openai-url http://127.0.0.1:8000/v1 --openai-model M
    python -m benchmarks.label_quality --annotators "embedded:margin=0.05" llm "llm:shots=4"

The reference set is ``benchmarks/data/label_reference.jsonl`` (320 distinct messages from rollouts of
MiniHack KeyRoom and four other MiniHack tasks, NetHackStaircase and NetHackScore, each labelled by hand 0/1 for
three goals: see ``benchmarks/data/README.md``). Goals are judged with the prompt of the task the agents train on:
keyroom -> ``minihack`` (MiniHack-KeyRoom-Fixed-S5-v0), staircase -> ``nethack_staircase``, score ->
``nethack_score`` (:func:`jaxrl_pref.annotation.backends.task_for_env`).

An annotator is any :func:`~jaxrl_pref.annotation.backends.make_backend` kind, given as ``name`` or
``name:key=value,key=value`` (values read as Python literals where they parse, else strings), so a backend added
to ``make_backend`` later is measured by its name alone. Per annotator and goal:

* ``auc``: of the annotator's score against the reference labels (Mann-Whitney: the probability that a random
  positive scores above a random negative, ties 1/2), with a percentile bootstrap 95% interval over messages
  (``--resamples``, seeded). The score is the backend's continuous ``scores(prompt, messages)`` where it has one
  (embedded), else its label value (bow: a similarity; scripted, openai: 0/1, so their AUC is balanced accuracy).
* ``acc``: accuracy of its labels at its own threshold (label > 0.5: the retrieval model's default threshold).
* pairwise agreement on ``--pairs`` (positive, negative) pairs per goal (seeded sample): ``compare`` is asked both
  ``(pos, neg)`` (``ab``: mean P(positive preferred), a tie counts 1/2) and ``(neg, pos)`` (``ba``: mean P(positive
  preferred) again); ``pair`` is their mean, ``consistent`` the fraction of pairs whose two answers agree (P_ab =
  1 - P_ba, ties both ways included). Position bias shows as ab far from ba.
* ``swap_auc``: the goal-swap control: the same AUC with the prompt's task replaced by an unrelated one (baking a
  chocolate cake: :func:`swap_goal` replaces the ``description`` and ``goal`` and the embedded backend's
  ``progress``/``neutral`` example messages, and keeps the rest of the prompt: system, label and compare
  templates), scored against the *original* goal's labels. An annotator that reads the goal drops toward 0.5.

Recorded 2026-12-07 on a shared 2-core CPU machine, ``python -m benchmarks.label_quality --annotators embedded
scripted bow --json /tmp/label_quality.json`` (320 messages; 200 pairs per goal; 1000 bootstrap resamples):

| annotator | goal (pos/n) | AUC [95% CI] | acc | pairs AB / BA / mean | consistent | goal-swap AUC |
|---|---|---|---|---|---|---|
| embedded | keyroom (28/320) | 0.568 [0.475, 0.660] | 0.425 | 0.593 / 0.593 / 0.593 | 1.000 | 0.303 |
| embedded | staircase (18/320) | 0.790 [0.685, 0.884] | 0.641 | 0.775 / 0.775 / 0.775 | 1.000 | 0.298 |
| embedded | score (68/320) | 0.733 [0.670, 0.800] | 0.544 | 0.767 / 0.767 / 0.767 | 1.000 | 0.472 |
| scripted | keyroom (28/320) | 0.598 [0.501, 0.699] | 0.738 | 0.580 / 0.580 / 0.580 | 1.000 | 0.549 |
| scripted | staircase (18/320) | 0.733 [0.610, 0.848] | 0.841 | 0.777 / 0.777 / 0.777 | 1.000 | 0.569 |
| scripted | score (68/320) | 0.679 [0.622, 0.737] | 0.647 | 0.755 / 0.755 / 0.755 | 1.000 | 0.577 |
| bow | keyroom (28/320) | 0.749 [0.664, 0.827] | 0.641 | 0.713 / 0.713 / 0.713 | 1.000 | 0.510 |
| bow | staircase (18/320) | 0.680 [0.540, 0.804] | 0.634 | 0.690 / 0.690 / 0.690 | 1.000 | 0.514 |
| bow | score (68/320) | 0.484 [0.416, 0.552] | 0.659 | 0.482 / 0.482 / 0.482 | 1.000 | 0.427 |

In short: no annotator is a good judge (AUC 0.48-0.79; every accuracy is below labelling everything 0:
0.912 / 0.944 / 0.788); the three are order-consistent by construction; the embedded backend reads only its
prompt's example messages (goal swap: below chance). See ``docs/oni.md``, "Label quality", for the reading.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from jaxrl_pref.annotation.backends import Prompt, make_backend, task_for_env

REFERENCE = Path(__file__).resolve().parent / "data" / "label_reference.jsonl"
GOAL_ENVS = {"keyroom": "MiniHack-KeyRoom-Fixed-S5-v0", "staircase": "NetHackStaircase-v0",
             "score": "NetHackScore-v0"}
SWAP_GOAL = "The player is in a kitchen and wants to bake a chocolate cake: mix the batter, bake it and frost it."
SWAP_PROGRESS = ("You mix the flour, sugar and eggs into a smooth batter.", "You melt the chocolate.",
                 "The cake rises nicely in the oven.", "You take a golden-brown cake out of the oven.",
                 "You spread the chocolate frosting on the cake.")
SWAP_NEUTRAL = ("The oven is cold.", "You drop the wooden spoon.", "The batter is lumpy.",
                "The kitchen clock ticks.", "You burn your finger.")


# -- metrics --------------------------------------------------------------------------------------------------
def auc(scores, labels) -> float:
    """Mann-Whitney AUC: P(score of a random positive > that of a random negative), ties 1/2; NaN without both
    classes."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    d = pos[:, None] - neg[None, :]
    return float((d > 0).mean() + 0.5 * (d == 0).mean())


def bootstrap_interval(stat, *arrays, level: float = 0.95, resamples: int = 1000, seed: int = 0) -> tuple:
    """Percentile bootstrap interval of ``stat(*arrays)`` resampling the arrays' rows together (seeded); resamples
    where ``stat`` is NaN (e.g. AUC without a positive) are skipped. (``benchmarks.recurrent_parity.bootstrap_ci``
    bootstraps a mean only; this takes any statistic of paired arrays.)"""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        v = stat(*(a[idx] for a in arrays))
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


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


# -- prompts and backends ---------------------------------------------------------------------------------------
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


def load_reference(path=REFERENCE) -> list[dict]:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--annotators", nargs="+", default=["embedded", "scripted", "bow"],
                   help="make_backend kinds, each as name or name:key=value,key=value")
    p.add_argument("--goals", nargs="+", default=list(GOAL_ENVS), choices=list(GOAL_ENVS))
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--pairs", type=int, default=200, help="(positive, negative) pairs per goal")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the AUC intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="only the first N reference messages (0: all)")
    p.add_argument("--openai-url", default=None)
    p.add_argument("--openai-model", default=None)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    rows = load_reference(args.reference)
    if args.limit:
        rows = rows[:args.limit]
    results = {}
    for spec in args.annotators:
        t = time.perf_counter()
        backend = build(spec, args.openai_url, args.openai_model)
        results[spec] = evaluate(backend, rows, args.goals, args.pairs, args.resamples, args.seed)
        print(f"{spec}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "messages": len(rows),
                                         "pairs": args.pairs, "resamples": args.resamples, "seed": args.seed,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
