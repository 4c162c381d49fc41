"""ONI at paper scale: a synthetic stream of NetHack-like messages through the real pipeline, up to 1e6 distinct.

    python -m benchmarks.oni_scale                        # to 1e6 distinct messages (minutes on 2 cores)
    python -m benchmarks.oni_scale --messages 100000 --points 10000 100000

The pipeline is the one a run uses: the annotator service (``python -m jaxrl_pref.annotation.server``, a child
process; ``--backend scripted``: instant keyword labels, so the service, the SQLite label store and the client are
what is measured, not a model), and one :class:`agents.oni.ONILoop` per reward model (retrieval, classification,
ranking), each with its own :class:`~jaxrl_pref.annotation.client.AnnotatorClient` writing ahead into the store and
its own message table (initial capacity ``--table-capacity``: it grows), all fed the same rollouts.

Messages come from NetHack-like templates with numbers and names (every new one distinct); a rollout is half empty
messages, ``--new-per-rollout`` new ones, the rest repeats of earlier ones with a heavy tail (message ``j`` of the
``s`` seen so far is drawn as ``j = s * u^4``: a few messages dominate, most recur rarely). Between measurement
points the stream is fed in large rollouts (``--fill-batch`` steps, half of them new messages) through the same
hooks, to reach the next size quickly; at each point (after the service has caught up) it measures, over
``--rollouts`` rollouts of 32 x 16 steps:

* host overhead per rollout: the hook's time (hash, count into the table, new-message detection, write-ahead of the
  new ones into the store, label loading, device update), median per model, and the store write-ahead alone;
* the in-jit lookup of a rollout's 512 messages in the table, and each reward model's jitted step (update + reward);
* the store: file size, and the time of the service's and client's queries (counts, pending work, changes);
* peak memory (this process: the learner side; the service), and the service's labels/s during the fill.

From the second point on, every measurement is also taken on reference hooks frozen at the first point (their
tables stop growing: the same workload from a copy of the stream stopped there, written ahead into a copy of the
store as it was there, answered at once in-process) and on a copy of the first point's device table, in turn with
the real ones, so that load changes on a shared machine hit both alike; the targets compare these pairs.

At the end: the service catches up, and nothing may be lost (every distinct message in every message table and the
store, every label in the retrieval and classification tables, every pair the ranking hooks asked in the store); then
a resumed learner (a new client and hook) reloads every label from the store, timed. Targets: host overhead and
in-jit lookup at the last point within 2x of the first.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from agents import oni
from agents.ppo_host import HostState
from jaxrl_pref.annotation.client import AnnotatorClient, start_server, stop_server
from jaxrl_pref.annotation.store import LabelStore
from jaxrl_pref.config import cli
from envs.messages import encode_messages
from jaxrl_pref.rewards.retrieval import lookup
from jaxrl_pref.rollout import Transition

TASK = "nethack_score"
MONSTERS = ["newt", "jackal", "grid bug", "kobold", "lichen", "fox", "sewer rat", "gnome lord", "hill orc", "giant bat",
            "acid blob", "coyote", "floating eye", "gecko", "yellow mold", "homunculus", "dwarf", "hobbit",
            "soldier ant"]
ITEMS = ["dagger", "scroll", "wand", "ring", "potion", "food ration", "lamp", "key", "arrow", "gem", "amulet"]
NAMES = ["Asidonhopo", "Izchak", "Sam", "Ruggo", "Lord Sato", "Aldo", "Zek", "Nelda", "Perseus", "Orion"]
GODS = ["Anhur", "Mitra", "Crom", "Set", "Quetzalcoatl", "Camaxtli", "Huhetotl"]
TEMPLATES = [
    "You see here {n} gold pieces.",
    "You kill the {mon} named {name} {n}!",
    "The {mon} hits! [HP {n}]",
    "You read: \"{name} was here ({n})\".",
    "{name} says: \"I'll give you {n} zorkmids for the {item}.\"",
    "You hear the footsteps of {n} guards on patrol.",
    "You feel more experienced. Welcome to experience level {n}.",
    "You pick up {n} {item}s named {name}.",
    "There is a staircase down to dungeon level {n} here.",
    "You pray to {god}. You feel that {god} is well-pleased ({n}).",
    "You miss the {mon} with your +{n} {item}.",
    "Really attack {name} the {mon}? [{n}]",
]


def message(k: int) -> str:
    """The ``k``-th distinct message of the stream (a pure function of ``k``: nothing to store)."""
    t, n = k % len(TEMPLATES), k // len(TEMPLATES)
    return TEMPLATES[t].format(n=n, mon=MONSTERS[(k * 7919) % len(MONSTERS)], item=ITEMS[(k * 104729) % len(ITEMS)],
                               name=NAMES[(k * 31) % len(NAMES)], god=GODS[(k * 17) % len(GODS)])


@dataclasses.dataclass(frozen=True)
class Bench:
    messages: int = 1_000_000
    """Distinct (non-empty) messages to reach."""
    points: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    """Distinct-message counts at which to measure (those above --messages are skipped; --messages is one)."""
    models: tuple[str, ...] = oni.REWARD_MODELS
    table_capacity: int = 1024
    """Initial message table capacity of every hook (the tables grow)."""
    num_envs: int = 16
    num_steps: int = 32
    rollouts: int = 60
    """Measured rollouts per point."""
    new_per_rollout: int = 8
    """New distinct messages per measured rollout."""
    fill_batch: int = 8192
    """Steps per rollout while filling between points (half of them new messages)."""
    seed: int = 0
    store: str = ""
    """Label store path (default: a fresh one in a temporary directory)."""
    catch_up_timeout: float = 900.0
    """Seconds to wait at each point for the service to label everything submitted."""


class Timed:
    """An annotator client whose ``submit`` (the store write-ahead) is timed."""

    def __init__(self, client):
        self.client, self.submit_s = client, []

    def submit(self, messages=(), pairs=()):
        t = time.perf_counter()
        self.client.submit(messages, pairs)
        self.submit_s.append(time.perf_counter() - t)

    def __getattr__(self, k):
        return getattr(self.client, k)


class Stream:
    def __init__(self, seed: int):
        self.rng, self.seen = np.random.default_rng(seed), 0

    def rollout(self, steps: int, num_envs: int, new: int) -> np.ndarray:
        """``uint8[steps, num_envs, 256]``: half empty messages, ``new`` new ones, the rest heavy-tailed repeats."""
        n = steps * num_envs
        new = min(new, n // 2)
        reps = n - n // 2 - new
        ks = list(range(self.seen, self.seen + new))
        self.seen += new
        if self.seen:
            ks += list((self.seen * self.rng.random(reps) ** 4).astype(np.int64))
        texts = [message(k) for k in ks] + [""] * (n - len(ks))
        msgs = encode_messages(texts)[self.rng.permutation(n)]
        return msgs.reshape(steps, num_envs, -1)


def traj_of(msgs: np.ndarray) -> Transition:
    T, N = msgs.shape[:2]
    return Transition(None, None, None, None, np.zeros((T, N), np.float32), None, None, {"message": msgs}, {})


def times(fn, reps: int) -> list:
    fn()  # warm-up (compile)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return ts


def median_time(fn, reps: int) -> float:
    return float(np.median(times(fn, reps)))


def rss_mb(pid: str = "self", field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Instant:
    """A client that writes ahead into the label store (what :meth:`AnnotatorClient.submit` does) and answers at once
    (label 1, pairs tied) with no service: the reference learners', whose tables stay at the first point's size."""

    def __init__(self, store: str):
        self.store, self.labels, self.pairs = LabelStore(store), {}, []

    def submit(self, messages=(), pairs=()):
        self.store.add(TASK, messages, pairs)
        self.labels.update(dict.fromkeys(messages, 1.0))
        self.pairs += [(a, b, 0.5) for a, b in pairs]

    def poll(self):
        out, self.labels, self.pairs = (self.labels, self.pairs), {}, []
        return out

    def metrics(self):
        return {}

    def close(self):
        self.store.close()


class Learner:
    """One reward model's hook and state, fed the stream."""

    def __init__(self, model: str, bench: Bench, url: str, store: str):
        self.name = model
        self.cfg = oni.ONIOptions(reward_model=model, table_capacity=bench.table_capacity, max_messages=0)
        self.reward = oni.make_reward(self.cfg)
        self.client = Timed(AnnotatorClient(url, TASK, store=store))
        self.hook = oni.ONILoop(self.cfg, self.reward, self.client, bench.seed)
        self.state = HostState((), self.reward.init(jax.random.PRNGKey(0), None), jax.random.PRNGKey(1), jnp.int32(0))
        self.hook_s: list = []
        self.step = jax.jit(lambda rs, traj, key: self.reward(self.reward.update(rs, traj, key)[0], traj)[0])

    def feed(self, msgs: np.ndarray, timed: bool = False) -> dict:
        t = time.perf_counter()
        self.state, m = self.hook(self.state, traj_of(msgs))
        if timed:
            self.hook_s.append(time.perf_counter() - t)
        return m

    def freeze(self, store: str) -> None:
        """From now on answered by :class:`Instant` (no answers from the service: the table keeps its size)."""
        self.client.close()
        self.client = self.hook.client = Timed(Instant(store))

    def summary(self, traj) -> dict:
        h, sub = np.array(self.hook_s), np.array(self.client.submit_s)
        return {"hook_ms": 1e3 * np.median(h), "hook_min_ms": 1e3 * h.min(),
                "submit_ms": 1e3 * np.median(sub) if len(sub) else 0.0,
                "compute_ms": 1e3 * np.median(h - sub if len(sub) == len(h) else h),
                "step_ms": 1e3 * median_time(lambda: self.step(self.state.reward_state, traj, jax.random.PRNGKey(2)),
                                             5),
                "capacity": self.hook.table.capacity, "in_table": self.hook.table.size}


def store_queries(path: str) -> dict:
    s = LabelStore(path, readonly=True)
    try:
        row = s.db.execute("SELECT seq FROM items WHERE task=? AND status!='pending' ORDER BY seq DESC LIMIT 1 "
                           "OFFSET 1000", (TASK,)).fetchone()
        seq = row[0] if row else 0
        q = {"counts": lambda: s.counts(), "pending(100)": lambda: s.pending(100),
             "changes(newest ~1k answers)": lambda: s.changes_since(TASK, seq)}
        return {k: median_time(f, 5) for k, f in q.items()}
    finally:
        s.close()


def labeled_messages(store: LabelStore) -> int:
    return store.db.execute("SELECT COUNT(*) FROM items WHERE kind='label' AND status='labeled'").fetchone()[0]


def wait_caught_up(learners, store: LabelStore, timeout: float, empty: np.ndarray) -> None:
    """Until the service has answered everything and every hook has loaded every answer."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if store.counts()["pending"] == 0:
            want = labeled_messages(store)
            for ln in learners:
                ln.feed(empty)
            if all(ln.hook.labeled >= want for ln in learners if ln.name != "ranking"):
                return
        time.sleep(0.5)
    print(f"WARNING: not caught up after {timeout:.0f}s: store {store.counts()}, hooks' labels "
          f"{[ln.hook.labeled for ln in learners]}", flush=True)


def main(argv=None) -> int:
    b = cli(Bench, argv, description=__doc__.split("\n\n")[0])
    points = sorted({p for p in b.points if p < b.messages} | {b.messages})
    tmp = tempfile.mkdtemp(prefix="oni_scale_")
    store_path = b.store or f"{tmp}/labels.db"
    proc, url = start_server(store_path, "scripted", log_path=f"{tmp}/annotator.log",
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    store = LabelStore(store_path, readonly=True)
    stream = Stream(b.seed)
    learners = [Learner(m, b, url, store_path) for m in b.models]
    refs = [Learner(m, b, url, store_path) for m in b.models]  # frozen at the first point: same moment, small table
    ref_stream, ref_dev = None, None
    empty = np.zeros((1, 1, 256), np.uint8)
    look = jax.jit(lookup)
    rows = []
    t_start = time.time()
    try:
        labeled0, t_phase = 0, time.time()
        for point in points:
            first = ref_stream is None
            while stream.seen < point - b.rollouts * b.new_per_rollout:  # fill
                new = min(b.fill_batch // 2, point - b.rollouts * b.new_per_rollout - stream.seen)
                msgs = stream.rollout(b.fill_batch // b.num_envs, b.num_envs, new)
                for ln in learners + (refs if first else []):
                    ln.feed(msgs)
            wait_caught_up(learners + (refs if first else []), store, b.catch_up_timeout, empty)
            if first:  # the references write ahead into a copy of the store as it is now
                ref_store = f"{tmp}/labels_at_{point}.db"
                with sqlite3.connect(ref_store) as dst:
                    store.db.backup(dst)
                for ln in refs:
                    ln.freeze(ref_store)
                ref_stream = copy.deepcopy(stream)
            c = store.counts()
            rate = (c["labeled"] + c["unlabeled"] - labeled0) / max(time.time() - t_phase, 1e-9)
            for ln in learners + refs:
                ln.hook_s.clear()
                ln.client.submit_s.clear()
            for _ in range(b.rollouts):  # main and reference hooks in turn: load drifts hit both alike
                msgs = stream.rollout(b.num_steps, b.num_envs, b.new_per_rollout)
                ref_msgs = msgs if first else ref_stream.rollout(b.num_steps, b.num_envs, b.new_per_rollout)
                for ln, ref in zip(learners, refs):
                    ln.feed(msgs, timed=True)
                    if not first:
                        ref.feed(ref_msgs, timed=True)
            traj = traj_of(jnp.asarray(msgs))
            row = {"distinct": stream.seen, "labels_per_s": rate}
            for ln, ref in zip(learners, refs):
                row[ln.name] = ln.summary(traj)
                row["ref_" + ln.name] = row[ln.name] if first else ref.summary(traj)
            dev = learners[0].state.reward_state["model"]["table"]
            if first:
                ref_dev = {"rows": jnp.array(dev["rows"], copy=True)}  # (the hook donates its own)
            ts, ref_ts = paired_times(lambda: look(dev, traj.final_obs["message"]),
                                      lambda: look(ref_dev, traj.final_obs["message"]), 100)
            row["lookup"] = {"lookup_ms": 1e3 * np.median(ts), "lookup_min_ms": 1e3 * min(ts)}
            row["ref_lookup"] = {"lookup_ms": 1e3 * np.median(ref_ts), "lookup_min_ms": 1e3 * min(ref_ts)}
            row["ref_distinct"] = points[0]
            row["store_mb"] = sum(os.path.getsize(p) for p in (store_path, store_path + "-wal")
                                  if os.path.exists(p)) / 1e6
            row["queries_ms"] = {k: 1e3 * v for k, v in store_queries(store_path).items()}
            row["rss_mb"], row["peak_mb"] = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            row["service_peak_mb"] = rss_mb(str(proc.pid), "VmHWM")
            row["elapsed_s"] = time.time() - t_start
            rows.append(row)
            report(row, b.models, first)
            labeled0, t_phase = c["labeled"] + c["unlabeled"], time.time()

        # nothing lost: the service answers everything; every hook holds every message (and label)
        wait_caught_up(learners, store, b.catch_up_timeout, empty)
        c, n_labeled = store.counts(), labeled_messages(store)
        n_msgs = store.db.execute("SELECT COUNT(*) FROM items WHERE kind='label'").fetchone()[0]
        lost = []
        if n_msgs != stream.seen:
            lost.append(f"store holds {n_msgs} messages, the stream had {stream.seen}")
        for ln in learners:
            t = ln.hook.table
            if t.size != stream.seen + 1:  # (+ the empty message)
                lost.append(f"{ln.name}: table holds {t.size} messages, want {stream.seen + 1}")
            if ln.name != "ranking" and ln.hook.labeled != n_labeled:
                lost.append(f"{ln.name}: {ln.hook.labeled} labels loaded, the store has {n_labeled}")
        stored = set(store.db.execute("SELECT a, b FROM items WHERE kind='pair'").fetchall())
        n_pairs = len(stored)
        missing = sum(p not in stored for ln in learners if ln.name == "ranking" for p in ln.hook.asked_pairs)
        if missing:
            lost.append(f"{missing} pairs the ranking hook asked are not in the store")
        print(f"\nend: {stream.seen:,} distinct messages, {n_pairs:,} pairs; store {c}; "
              + ("NOTHING LOST" if not lost else "LOST: " + "; ".join(lost)), flush=True)

        # a resumed learner reloads every label from the store
        fresh = Learner("classification", b, url, store_path)
        t = time.perf_counter()
        while fresh.hook.labeled < n_labeled and time.perf_counter() - t < b.catch_up_timeout:
            fresh.feed(empty)
            time.sleep(0.05)
        dt = time.perf_counter() - t
        print(f"resume: a new client + hook reloaded {fresh.hook.labeled:,} labels from the store in {dt:.1f} s "
              f"(table {fresh.hook.table.capacity:,} slots)", flush=True)
        fresh.client.close()
    finally:
        for ln in learners + refs:
            ln.client.close()
        store.close()
        stop_server(proc)

    if len(rows) > 1:
        z = rows[-1]
        print(f"\nat {z['distinct']:,} vs {z['ref_distinct']:,} distinct messages, measured in turn at the end "
              "(target: within 2x):")

        def line(what, k, x, y):
            r = y[k] / x[k]
            print(f"  {what:52s} {x[k]:7.3f} -> {y[k]:7.3f} ms ({r:.2f}x) {'ok' if r <= 2 else 'OVER'}")
        for m in b.models:
            line(f"host overhead per rollout, {m} (median)", "hook_ms", z["ref_" + m], z[m])
            line(f"  of which not the store write-ahead, {m}", "compute_ms", z["ref_" + m], z[m])
        line(f"in-jit lookup of {b.num_steps * b.num_envs} messages (median)", "lookup_ms", z["ref_lookup"],
             z["lookup"])
    print(f"total {time.time() - t_start:.0f} s", flush=True)
    return 0


def paired_times(fa, fb, reps: int) -> tuple[list, list]:
    """Times ``fa`` and ``fb`` in turn (after a warm-up of each)."""
    jax.block_until_ready(fa())
    jax.block_until_ready(fb())
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            jax.block_until_ready(f())
            ts.append(time.perf_counter() - t)
    return ta, tb


def report(row: dict, models, first: bool) -> None:
    print(f"\n== {row['distinct']:,} distinct messages ({row['elapsed_s']:.0f} s) ==", flush=True)
    ref = "" if first else f" [with a {row['ref_distinct']:,}-message table, in turn]"
    for m in models:
        r, q = row[m], row["ref_" + m]
        print(f"  {m:14s} host overhead per rollout {r['hook_ms']:6.2f} ms (min {r['hook_min_ms']:5.2f}; store "
              f"write-ahead {r['submit_ms']:5.2f} ms, the rest {r['compute_ms']:5.2f} ms)"
              + ("" if first else f" [{q['hook_ms']:6.2f} ms]")
              + f"  jitted reward step {r['step_ms']:6.2f} ms" + ("" if first else f" [{q['step_ms']:6.2f} ms]")
              + f"  table {r['in_table']:,} in {r['capacity']:,} slots")
    lk, rl = row["lookup"], row["ref_lookup"]
    q = ", ".join(f"{k} {v:.2f} ms" for k, v in row["queries_ms"].items())
    print(f"  in-jit lookup (512 messages) {lk['lookup_ms']:.3f} ms (min {lk['lookup_min_ms']:.3f})"
          + ("" if first else f" [{rl['lookup_ms']:.3f} ms (min {rl['lookup_min_ms']:.3f})]")
          + f"; store {row['store_mb']:.1f} MB, queries: {q}")
    print(f"  memory: learner {row['rss_mb']:.0f} MB (peak {row['peak_mb']:.0f} MB), service peak "
          f"{row['service_peak_mb']:.0f} MB; service {row['labels_per_s']:.0f} labels/s during the fill"
          + ("" if first else f"{ref}"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
