"""Persistent label store (SQLite in WAL mode): every message seen, its annotation, ranking pairs, pending work.

One table of *items*. An item is either a message to label (``kind='label'``, text in ``a``) or a pair of messages
to compare (``kind='pair'``, texts in ``a`` and ``b``), always for one ``task`` (labels depend on the task). Its
``status`` is ``pending`` (not answered yet), ``labeled`` (``label`` holds the answer: 0/1 for messages, the
probability that ``a`` is preferred -- 1, 0 or 0.5 for a tie -- for pairs) or ``unlabeled`` (the backend's replies
never parsed; ``label`` is NULL and the last raw reply and error are kept). Each answer records the backend, model,
prompt version, raw reply and time.

Durability: every write is one transaction with ``synchronous=FULL``, so an answer is on disk before the call
returns. Pending work *is* the pending rows: a process killed mid-batch leaves its in-flight items pending
(asked again after restart, since their answers were never stored) and every stored answer stays (never asked
again). ``seq`` increases with every state change, so readers poll ``changes_since(seq)``.

Concurrency: one writer process (the annotator service) and any number of readers (WAL lets them read while it
writes). Each thread must use its own :class:`LabelStore` (own connection); the service uses one with a lock.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('label', 'pair')),
    a TEXT NOT NULL,
    b TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'labeled', 'unlabeled')),
    label REAL,
    backend TEXT, model TEXT, prompt_version TEXT, raw_reply TEXT, error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    answered REAL,
    seq INTEGER NOT NULL,
    UNIQUE (task, kind, a, b)
);
CREATE INDEX IF NOT EXISTS items_pending ON items (status, id);
CREATE INDEX IF NOT EXISTS items_seq ON items (task, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('seq', 0);
"""


class LabelStore:
    def __init__(self, path, readonly: bool = False, timeout: float = 30.0):
        self.path = str(path)
        if not readonly:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self.db = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
        self.lock = threading.RLock()
        if not readonly:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)

    def close(self):
        self.db.close()

    # -- writes (one transaction each) ----------------------------------------------------------------------------
    def _tx(self, fn):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                seq = self.db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0] + 1
                out = fn(seq)
                self.db.execute("UPDATE meta SET value=? WHERE key='seq'", (seq,))
                self.db.execute("COMMIT")
                return out
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def add(self, task: str, messages: Iterable[str] = (), pairs: Iterable[Sequence[str]] = ()) -> int:
        """Adds unseen messages / pairs as pending work (duplicates of anything stored are ignored).
        Returns how many were new."""
        rows = [("label", m, "") for m in dict.fromkeys(messages)]
        rows += [("pair", a, b) for a, b in dict.fromkeys(tuple(p) for p in pairs)]
        if not rows:
            return 0
        now = time.time()

        def fn(seq):
            before = self.db.total_changes
            self.db.executemany("INSERT OR IGNORE INTO items (task, kind, a, b, created, seq) VALUES (?,?,?,?,?,?)",
                                [(task, k, a, b, now, seq) for k, a, b in rows])
            return self.db.total_changes - before
        return self._tx(fn)

    def record(self, results: Sequence[dict]) -> None:
        """Stores answers. Each result: ``id``, ``label`` (float, or None when the reply did not parse), ``final``
        (a None label is final: the item becomes ``unlabeled``; else it stays pending with ``attempts`` + 1),
        and optionally ``raw_reply``, ``error``, ``backend``, ``model``, ``prompt_version``."""
        now = time.time()

        def fn(seq):
            for r in results:
                if r.get("label") is not None:
                    status = "labeled"
                elif r.get("final", True):
                    status = "unlabeled"
                else:
                    status = "pending"
                self.db.execute(
                    "UPDATE items SET status=?, label=?, backend=?, model=?, prompt_version=?, raw_reply=?, error=?,"
                    " attempts=attempts+1, answered=?, seq=? WHERE id=? AND status='pending'",
                    (status, r.get("label"), r.get("backend"), r.get("model"), r.get("prompt_version"),
                     r.get("raw_reply"), r.get("error"), now if status != "pending" else None,
                     seq if status != "pending" else self._seq_of(r["id"]), r["id"]))
        self._tx(fn)

    def _seq_of(self, item_id):
        row = self.db.execute("SELECT seq FROM items WHERE id=?", (item_id,)).fetchone()
        return row[0] if row else 0

    # -- reads ----------------------------------------------------------------------------------------------------
    def pending(self, limit: int = 100, exclude: Iterable[int] = (), kind: Optional[str] = None) -> list[dict]:
        """Oldest pending items, skipping ids in ``exclude`` (work already in flight)."""
        exclude = set(exclude)
        q = "SELECT id, task, kind, a, b, attempts FROM items WHERE status='pending'"
        args: list = []
        if kind:
            q += " AND kind=?"
            args.append(kind)
        q += " ORDER BY id LIMIT ?"
        args.append(limit + len(exclude))
        with self.lock:
            rows = self.db.execute(q, args).fetchall()
        out = [dict(id=r[0], task=r[1], kind=r[2], a=r[3], b=r[4], attempts=r[5]) for r in rows if r[0] not in exclude]
        return out[:limit]

    def changes_since(self, task: str, seq: int = 0, limit: int = 10_000) -> dict:
        """Answered items of ``task`` with ``seq`` > the given one: ``{"labels": [[text, label], ...],
        "pairs": [[a, b, pref], ...], "seq": newest seq returned}`` (``label`` None = unlabeled)."""
        with self.lock:
            rows = self.db.execute(
                "SELECT kind, a, b, label, seq FROM items WHERE task=? AND seq>? AND status!='pending' "
                "ORDER BY seq LIMIT ?", (task, seq, limit)).fetchall()
        labels = [[a, lab] for k, a, b, lab, s in rows if k == "label"]
        pairs = [[a, b, lab] for k, a, b, lab, s in rows if k == "pair"]
        return {"labels": labels, "pairs": pairs, "seq": max([seq] + [r[4] for r in rows])}

    def get(self, task: str, message: str, b: Optional[str] = None) -> Optional[dict]:
        kind, bb = ("label", "") if b is None else ("pair", b)
        with self.lock:
            r = self.db.execute("SELECT status, label, attempts, raw_reply, backend, model, prompt_version, error "
                                "FROM items WHERE task=? AND kind=? AND a=? AND b=?", (task, kind, message, bb)).fetchone()
        if r is None:
            return None
        return dict(zip(("status", "label", "attempts", "raw_reply", "backend", "model", "prompt_version", "error"), r))

    def counts(self) -> dict:
        """``{"pending": n, "labeled": n, "unlabeled": n}`` over all tasks and kinds."""
        with self.lock:
            rows = self.db.execute("SELECT status, COUNT(*) FROM items GROUP BY status").fetchall()
        out = {"pending": 0, "labeled": 0, "unlabeled": 0}
        out.update(dict(rows))
        return out
