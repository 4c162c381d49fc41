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
prompt's example messages (goal swap: below chance). See ``docs/oni.md``, "Label quality", for the reading, and
there the rows of the in-process LLM (``--annotators llm "llm:shots=4"``: SmolLM2-135M is at chance zero-shot and
answers pairs by position only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxrl_pref.annotation.quality import GOAL_ENVS, build, evaluate, load_reference, table

REFERENCE = Path(__file__).resolve().parent / "data" / "label_reference.jsonl"


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
