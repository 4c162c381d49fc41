"""Collects the messages of the label-quality reference set (``benchmarks/data/label_reference.jsonl``).

    python -m benchmarks.label_reference_collect            # writes/merges benchmarks/data/label_reference.jsonl
    python -m benchmarks.label_reference_collect --dry-run  # prints what it would keep

Messages come from real rollouts through the project's own env code (:class:`envs.nethack.NLEPool`), decoded as
ONI's host hook decodes them (:func:`jaxrl_pref.rewards.retrieval.decode_messages`: text up to the first NUL,
trailing whitespace stripped; no other normalisation: ONI keys a label by that exact text), from the observation
each step ends on (``info["final_obs"]``, what the hook reads). The empty message is left out (never labelled).

Two policies, several seeds each (see :data:`SOURCES`):

* ``random``: uniform over the task's actions;
* ``seek``: a small scripted explorer: with probability ``eps`` a random action, else it walks (by the signs of
  the offsets, walls ignored) towards the nearest visible target of the task (KeyRoom: the key ``(``, then the door
  ``+``, then the stairs ``>``; NetHack: stairs down ``>``, gold ``$``, doors ``+``, tools/weapons ``(``, food ``%``),
  and, on or next to it, acts: picks up (``,``), descends (``>``), applies the key at the door (``a``: MiniHack's
  KeyRoom step then unlocks and opens it itself, so no unlocking message ever reaches the agent) or kicks a door
  (NetHack).
  It reaches messages a uniform policy rarely sees (doors kicked open, items and gold picked up).

Which messages are kept (deterministic): messages already in the output file are always kept (their hand-written
labels are preserved; only their ``sources`` counts are refreshed); of the new ones at most ``--per-template`` with
the same template (:func:`template`: digits, inventory letters and a prompt's choices blanked), and, while fewer
than ``--max-messages`` are kept, one at a time from each *kind* in turn (:data:`KINDS`: stairs, doors, gold, shop,
prayer, prompts, combat, items, status, walls, other; by keywords, for a spread of kinds rather than the random
policies' mix, which is mostly walls and prompts), the most frequent of the kind first (ties in a seeded order).
New messages get ``labels: null``: they are to be labelled by hand (see ``benchmarks/data/README.md``).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "data" / "label_reference.jsonl"

# (env, policy, seeds, batched steps, envs per pool)
SOURCES = [
    ("MiniHack-KeyRoom-Fixed-S5-v0", "random", (0, 1, 2), 1500, 4),
    ("MiniHack-KeyRoom-Fixed-S5-v0", "seek", (0, 1, 2, 3), 1500, 4),
    ("MiniHack-KeyRoom-S5-v0", "seek", (0, 1), 1500, 4),
    ("MiniHack-Room-Monster-5x5-v0", "random", (0, 1), 1000, 4),
    ("MiniHack-LockedDoor-Fixed-v0", "random", (0,), 1000, 4),
    ("MiniHack-Eat-v0", "random", (0,), 1000, 4),
    ("MiniHack-Pray-v0", "random", (0,), 1000, 4),
    ("NetHackStaircase-v0", "random", (0, 1), 1500, 4),
    ("NetHackStaircase-v0", "seek", (0, 1, 2), 1500, 4),
    ("NetHackScore-v0", "random", (0, 1), 1500, 4),
    ("NetHackScore-v0", "seek", (0, 1, 2), 1500, 4),
]

MOVES = {(-1, 0): ord("k"), (1, 0): ord("j"), (0, -1): ord("h"), (0, 1): ord("l"),
         (-1, -1): ord("y"), (-1, 1): ord("u"), (1, -1): ord("b"), (1, 1): ord("n")}
KEYROOM_TARGETS = "(+>"
NETHACK_TARGETS = ">$+(%"


class Seek:
    """The scripted explorer of the module docstring, one state per env (a queue of keys to press)."""

    def __init__(self, keys: list, minihack: bool, rng, eps: float = 0.3):
        self.index = {k: i for i, k in enumerate(keys)}
        self.keys, self.minihack, self.rng, self.eps = keys, minihack, rng, eps
        self.targets = KEYROOM_TARGETS if minihack else NETHACK_TARGETS
        self.queue: dict = collections.defaultdict(list)

    def _random(self) -> int:
        return int(self.rng.integers(len(self.keys)))

    def _press(self, key: int) -> int:
        return self.index[key] if key in self.index else self._random()

    def act(self, i: int, chars: np.ndarray, blstats: np.ndarray, message: str) -> int:
        if self.queue[i]:
            return self._press(self.queue[i].pop(0))
        if self.rng.random() < self.eps or "wall" in message or "stone" in message:
            return self._random()
        if message.startswith(("You see here", "There are several objects here", "There are many objects here")):
            return self._press(ord(","))
        if "staircase down here" in message:
            return self._press(ord(">"))
        x, y = int(blstats[0]), int(blstats[1])
        for t in self.targets:
            ys, xs = np.nonzero(chars == ord(t))
            if not len(ys):
                continue
            d = np.abs(ys - y) + np.abs(xs - x)
            j = int(np.argmin(d))
            dy, dx = int(ys[j]) - y, int(xs[j]) - x
            step = (int(np.sign(dy)), int(np.sign(dx)))
            if t == "+" and abs(dy) == 1 and abs(dx) == 1:  # diagonally next to a door: doors take no diagonals
                return self._press(MOVES[(dy, 0)] if self.rng.random() < 0.5 else MOVES[(0, dx)])
            if t == "+" and abs(dy) + abs(dx) == 1:  # next to a door
                if self.minihack:  # MiniHack's KeyRoom step does the rest
                    return self._press(ord("a"))
                if not self.minihack:
                    self.queue[i] = [MOVES[step]]
                    return self._press(4)  # ^D: kick
            return self._press(MOVES[step])
        # standing on something? (the map shows '@' over it): try the task's at-target actions, else wander
        r = self.rng.random()
        if r < 0.15:
            return self._press(ord(","))
        if r < 0.3:
            return self._press(ord(">"))
        return self._random()


def collect(task: str, policy: str, seed: int, steps: int, num_envs: int) -> collections.Counter:
    import envs.nethack as N
    from envs import nle_worker as W
    from envs.messages import decode_messages

    env = W.make_env(task)
    keys = [int(a) for a in env.unwrapped.actions]
    env.close()
    rng = np.random.default_rng(seed)
    pool = N.make(task, num_envs=num_envs, seed=seed, obs_keys=("message", "chars", "blstats"), num_workers=1)
    seek = Seek(keys, W.is_minihack(task), rng) if policy == "seek" else None
    counts: collections.Counter = collections.Counter()
    try:
        obs = pool.reset()
        texts = decode_messages(obs["message"])
        for _ in range(steps):
            if seek is None:
                actions = rng.integers(pool.num_actions, size=num_envs)
            else:
                actions = np.array([seek.act(i, obs["chars"][i], obs["blstats"][i], texts[i])
                                    for i in range(num_envs)])
            obs, _, terminated, truncated, info = pool.step(actions)
            for t in decode_messages(info["final_obs"]["message"]):
                if t:
                    counts[t] += 1
            texts = decode_messages(obs["message"])
            if seek is not None:
                for i in np.flatnonzero(terminated | truncated):
                    seek.queue[i] = []
    finally:
        pool.close()
    return counts


KINDS = [  # (kind, pattern): a message's kind is the first that matches (for the spread of the selection only)
    ("stairs", r"stair|ladder"),
    ("doors", r"door|passage"),
    ("gold", r"gold|^\$ - |  \$ - "),
    ("shop", r"shop|pay|price|credit"),
    ("prayer", r"pray|god|altar|thou|spell"),
    ("prompts", r"\[[^\]]*\]|direction|\?$"),
    ("combat", r"kill|destroy|\bhit|miss|bite|attack|zapped|touches|thrusts"),
    ("items", r"you see here|^[a-zA-Z] - |pick up|objects? here|you drop|wield|wear"),
    ("status", r"feel|hungry|weak|faint|eat|food|delicious|rotten|corpse|heal|better"),
    ("walls", r"wall|stone|diagonal|path|boulder|in the way|blocks"),
    ("other", r""),
]


def kind(message: str) -> str:
    return next(k for k, pat in KINDS if re.search(pat, message, re.I))


def template(message: str) -> str:
    """Digits -> ``#``, an inventory letter ``x - `` -> ``? - ``, a prompt's choices ``[...]`` -> ``[]``."""
    t = re.sub(r"(^|  )[a-zA-Z$] - ", r"\1? - ", message)
    return re.sub(r"\d+", "#", re.sub(r"\[[^\]]*\]", "[]", t))


def select(found: dict, existing: dict, max_messages: int, per_template: int, seed: int = 0) -> list[str]:
    """The messages kept (see the module docstring): ``found`` {message: {env: count}}, ``existing`` {message: row}."""
    kept = [m for m in existing]
    per_t = collections.Counter(template(m) for m in kept)
    rng = np.random.default_rng(seed)
    by_kind: dict = collections.defaultdict(list)
    for m, src in sorted(found.items()):
        if m not in existing:
            by_kind[kind(m)].append((-sum(src.values()), rng.random(), m))
    queues = {k: sorted(by_kind[k]) for k, _ in KINDS if by_kind[k]}
    while len(kept) < max_messages and any(queues.values()):
        for k in queues:
            while queues[k]:
                _, _, m = queues[k].pop(0)
                if per_t[template(m)] < per_template:
                    per_t[template(m)] += 1
                    kept.append(m)
                    break
            if len(kept) >= max_messages:
                break
    return kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--max-messages", type=int, default=320)
    p.add_argument("--per-template", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the kept messages, write nothing")
    args = p.parse_args(argv)

    found: dict = collections.defaultdict(collections.Counter)
    for task, policy, seeds, steps, num_envs in SOURCES:
        t0 = time.time()
        for seed in seeds:
            for m, n in collect(task, policy, seed, steps, num_envs).items():
                found[m][task] += n
        print(f"{task} {policy} seeds {list(seeds)}: {len(found)} distinct so far ({time.time() - t0:.1f} s)",
              file=sys.stderr)

    existing = {}
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                existing[row["message"]] = row
    kept = select(found, existing, args.max_messages, args.per_template)
    rows = []
    for m in kept:
        src = dict(sorted(found.get(m, {}).items())) or existing[m].get("sources", {})
        rows.append({"message": m, "sources": src, "labels": existing.get(m, {}).get("labels")})
    unlabelled = sum(r["labels"] is None for r in rows)
    print(f"{len(found)} distinct messages found; kept {len(rows)} ({len(existing)} already in {args.out}, "
          f"{unlabelled} to label by hand)", file=sys.stderr)
    if args.dry_run:
        for r in rows:
            print(json.dumps(r))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
