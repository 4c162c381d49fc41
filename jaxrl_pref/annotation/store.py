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

Write-ahead: the learner's client adds its messages here (pending) before it reports them submitted, so a crash of
the learner or of the service loses none; the service finds them among the pending rows.

Concurrency: several processes may write (learners adding work, one or more annotator services answering it; WAL lets
readers read meanwhile). Services *claim* work before asking the backend (:meth:`LabelStore.claim`): a claim is a
lease (``claimed_by``, ``lease_until``) that other services respect until it expires, so two services on one store
never ask for the same item at once; a claim whose owner process is dead (same host) is taken back at once
(:meth:`release_dead`). Each thread must use its own :class:`LabelStore` (own connection); the service uses one with
a lock. :meth:`close` checkpoints the WAL, so a clean close of the last connection leaves no ``-wal``/``-shm``
files.

Per item, ``attempts`` counts every time it was sent to the backend (transport errors included) and ``error``
holds the last error (a transport error, or why a reply did not parse); ``parse_failures`` counts replies that did not
parse (the service gives up after ``parse_retries`` + 1 of them).
"""
from __future__ import annotations

import os
import socket
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
# columns added after the first version (stores written by it gain them on open)
COLUMNS = {"parse_failures": "INTEGER NOT NULL DEFAULT 0", "claimed_by": "TEXT", "lease_until": "REAL"}
# how many items are in each status, kept by triggers (a GROUP BY over a million rows costs ~0.2 s, and the service
# reports these counts on every poll); an older store gains them (one count) the first time it is opened
STATUS_COUNTS = (
    "CREATE TABLE IF NOT EXISTS status_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS items_count_insert AFTER INSERT ON items BEGIN "
    "UPDATE status_counts SET n = n + 1 WHERE status = NEW.status; END",
    "CREATE TRIGGER IF NOT EXISTS items_count_update AFTER UPDATE OF status ON items WHEN OLD.status != NEW.status "
    "BEGIN UPDATE status_counts SET n = n - 1 WHERE status = OLD.status; "
    "UPDATE status_counts SET n = n + 1 WHERE status = NEW.status; END",
    "CREATE TRIGGER IF NOT EXISTS items_count_delete AFTER DELETE ON items BEGIN "
    "UPDATE status_counts SET n = n - 1 WHERE status = OLD.status; END",
    "CREATE INDEX IF NOT EXISTS items_claimed ON items (claimed_by) WHERE claimed_by IS NOT NULL",
)
STATUSES = ("pending", "labeled", "unlabeled")
NOT_ASKED = "pending, not sent to the backend yet (the run ended first, or no annotator service was running)"
ITEM_FIELDS = ("id", "task", "kind", "a", "b", "attempts", "parse_failures")
ITEM_COLS = ", ".join(ITEM_FIELDS)


def _item(row) -> dict:
    return dict(zip(ITEM_FIELDS, row))


def owner_id() -> str:
    """Who claims work: ``host:pid`` (a claim of a dead pid on this host is taken back at once)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_dead(owner: str) -> bool:
    """Whether ``owner`` (``host:pid[:anything]``) is a process of this host that no longer exists."""
    host, pid = (owner.split(":") + [""])[:2]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine: only the lease expiry frees its claims
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
REQUIRED_COLUMNS = ("task", "kind", "a", "b", "status", "label", "seq")  # of items (older stores gain the others)


def _writable(path: Path) -> bool:
    """Whether this process may write ``path``, and it is not marked read-only for everyone (``chmod a-w``: refused
    for root too, who could write it anyway, so the answer does not depend on who runs)."""
    try:
        return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)
    except OSError:
        return False


def check_usable(path, flag: str = "--label-store") -> Optional[tuple[str, str]]:
    """Why a label store cannot be used at ``path``, found without creating or changing anything: ``(problem, fix)``
    (``flag``: the option that names the path, for the fix), or None when it can be (an existing label store, an
    empty file, or a new file that can be created there). Checked: a directory; an existing file that is not a
    SQLite database (its 16-byte header) or is damaged, or one holding another program's ``items`` table; a
    read-only file; a directory it (and its ``-wal`` / ``-shm`` files) cannot be written in."""
    p = Path(path)
    other = f"pass another {flag} (a file that does not exist yet is created)"
    if p.is_dir():
        return f"{p} is a directory", f"name a file in it, e.g. {flag} {p / 'labels.db'}"
    if p.exists() or p.is_symlink():
        if not p.is_file():
            return f"{p} is not a regular file", other
        try:
            with open(p, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as e:
            return f"{p} cannot be read ({e.strerror})", f"make it readable and writable (chmod u+rw {p}), or {other}"
        if head and head != SQLITE_HEADER:
            return f"{p} is not a SQLite database (it begins with {head[:12]!r}, not {SQLITE_HEADER!r})", other
        if head and not Path(str(p) + "-wal").exists():  # (a store in use is read by its own connections only)
            problem = _schema_problem(p)
            if problem:
                return f"{p} {problem}", f"{other}; or restore the store from a copy"
        if not _writable(p):
            return f"{p} is read-only", f"make it writable (chmod u+w {p}), or {other}"
        try:  # a read-only file system, an immutable file: refused here, not in the middle of the run
            os.close(os.open(p, os.O_RDWR))
        except OSError as e:
            return f"{p} cannot be opened for writing ({e.strerror})", other
        parent = p.parent
        if not _writable(parent):
            return (f"the directory of {p}, {parent}, is not writable (the store keeps its -wal and -shm files "
                    "next to it)", f"make {parent} writable, or {other}")
        return None
    parent = p.parent
    while not parent.exists() and parent != parent.parent:  # the store's directories are created: the first one
        parent = parent.parent                               # that exists must take them
    if not parent.is_dir():
        return f"{parent} is not a directory, so {p} cannot be created", other
    if not _writable(parent):
        return f"{p} cannot be created: {parent} is not writable", f"make {parent} writable, or {other}"
    return None


def _schema_problem(path: Path) -> Optional[str]:
    """Why the SQLite file ``path`` is not a label store (damaged, another program's ``items`` table), or None. Opened
    immutable (no lock, no -wal/-shm files made): for files no connection has open."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            db.execute("SELECT name FROM sqlite_master").fetchall()
            have = {r[1] for r in db.execute("PRAGMA table_info(items)")}
        finally:
            db.close()
    except sqlite3.Error as e:
        return f"is a damaged SQLite database ({e})"
    missing = [c for c in REQUIRED_COLUMNS if c not in have]
    if have and missing:
        return f"is a SQLite database but not a label store (its items table has no {', '.join(missing)} column)"
    return None


class LabelStore:
    def __init__(self, path, readonly: bool = False, timeout: float = 30.0):
        self.path = str(path)
        if not readonly:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        if readonly:  # a read-write connection that refuses writes: it can still clean up the WAL when it closes last
            try:
                self.db = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=timeout,
                                          isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA query_only=ON")
            except sqlite3.OperationalError:
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout,
                                          isolation_level=None, check_same_thread=False)
            return
        self.db = sqlite3.connect(f"file:{self.path}", uri=True, timeout=timeout, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self):
        def fn():
            have = {r[1] for r in self.db.execute("PRAGMA table_info(items)")}
            for name, decl in COLUMNS.items():
                if name not in have:
                    self.db.execute(f"ALTER TABLE items ADD COLUMN {name} {decl}")
                    if name == "parse_failures":  # the first version counted only replies in attempts
                        self.db.execute("UPDATE items SET parse_failures=attempts WHERE status='pending'")
            counted = self.db.execute("SELECT name FROM sqlite_master WHERE name='status_counts'").fetchone()
            for stmt in STATUS_COUNTS:  # (in this transaction: no row slips between the count and the triggers)
                self.db.execute(stmt)
            if counted is None:
                n = dict(self.db.execute("SELECT status, COUNT(*) FROM items GROUP BY status").fetchall())
                self.db.executemany("INSERT INTO status_counts VALUES (?, ?)", [(k, n.get(k, 0)) for k in STATUSES])
        self._write(fn)

    def close(self):
        """Checkpoints the WAL into the database and closes (the last connection to close removes the WAL files)."""
        with self.lock:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # another connection is mid-transaction: it checkpoints when it closes
            self.db.close()

    # -- writes (one transaction each) ----------------------------------------------------------------------------
    def _tx(self, fn):
        """One transaction that may change answers: ``fn(seq)`` with the next ``seq``, which becomes the store's."""
        def body():
            seq = self.db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0] + 1
            out = fn(seq)
            self.db.execute("UPDATE meta SET value=? WHERE key='seq'", (seq,))
            return out
        return self._write(body)

    def _write(self, fn):
        """One transaction; ``seq`` is left alone (claims, errors: no answer changes)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = fn()
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

        def fn(seq):  # (rowcount: rows inserted, not counting the triggers' updates)
            return self.db.executemany(
                "INSERT OR IGNORE INTO items (task, kind, a, b, created, seq) VALUES (?,?,?,?,?,?)",
                [(task, k, a, b, now, seq) for k, a, b in rows]).rowcount
        return self._tx(fn)

    def record(self, results: Sequence[dict]) -> None:
        """Stores answers. Each result: ``id``, ``label`` (float, or None when the reply did not parse), ``final``
        (a None label is final: the item becomes ``unlabeled``; else it stays pending with ``parse_failures`` + 1),
        and optionally ``raw_reply``, ``error``, ``backend``, ``model``, ``prompt_version``, ``tries`` (requests it
        took, failed ones included; default 1: added to ``attempts``). Each answer releases the item's claim. An
        item that is no longer pending (another service answered it first) is left as it is: the first answer wins."""
        now = time.time()

        def fn(seq):
            rows = []
            for r in results:
                if r.get("label") is not None:
                    status = "labeled"
                elif r.get("final", True):
                    status = "unlabeled"
                else:
                    status = "pending"
                rows.append((status, r.get("label"), r.get("backend"), r.get("model"), r.get("prompt_version"),
                             r.get("raw_reply"), r.get("error"), r.get("tries", 1), int(r.get("label") is None),
                             now if status != "pending" else None, status, seq, r["id"]))
            # (an item still pending keeps its seq: no answer changed)
            self.db.executemany(
                "UPDATE items SET status=?, label=?, backend=?, model=?, prompt_version=?, raw_reply=?, error=?,"
                " attempts=attempts+?, parse_failures=parse_failures+?, answered=?,"
                " seq=CASE WHEN ?='pending' THEN seq ELSE ? END, claimed_by=NULL, lease_until=NULL"
                " WHERE id=? AND status='pending'", rows)
        self._tx(fn)

    # -- work claims (several services on one store) -----------------------------------------------------------------
    def claim(self, owner: str, limit: int, lease: float, now: Optional[float] = None) -> list[dict]:
        """Claims up to ``limit`` of the oldest pending items that nobody holds (no claim, or its lease has expired),
        all of one task and kind (one backend batch), for ``lease`` seconds. Returns them (see :meth:`pending`)."""
        now = time.time() if now is None else now
        free = "status='pending' AND (lease_until IS NULL OR lease_until<?)"

        def fn():
            first = self.db.execute(f"SELECT task, kind FROM items WHERE {free} ORDER BY id LIMIT 1", (now,)).fetchone()
            if first is None:
                return []
            rows = self.db.execute(f"SELECT {ITEM_COLS} FROM items WHERE {free} "
                                   "AND task=? AND kind=? ORDER BY id LIMIT ?", (now, *first, limit)).fetchall()
            self.db.executemany("UPDATE items SET claimed_by=?, lease_until=? WHERE id=?",
                                [(owner, now + lease, r[0]) for r in rows])
            return [_item(r) for r in rows]
        return self._write(fn)

    def note_error(self, ids: Sequence[int], error: str, tries: int = 1, retry_at: Optional[float] = None) -> None:
        """The backend failed on these items ``tries`` times: counts the attempts, keeps ``error`` as the item's last
        error, and keeps the claim until ``retry_at`` (then any service may try again). Answers are untouched."""
        self._write(lambda: self.db.executemany(
            "UPDATE items SET attempts=attempts+?, error=?, lease_until=? WHERE id=? AND status='pending'",
            [(tries, error, retry_at, i) for i in ids]))

    def release(self, owner: str, ids: Optional[Sequence[int]] = None) -> int:
        """Drops ``owner``'s claims (all of them, or those on ``ids``). Returns how many were dropped."""
        def fn():
            before = self.db.total_changes
            if ids is None:
                self.db.execute("UPDATE items SET claimed_by=NULL, lease_until=NULL WHERE claimed_by=?", (owner,))
            else:
                self.db.executemany("UPDATE items SET claimed_by=NULL, lease_until=NULL WHERE claimed_by=? AND id=?",
                                    [(owner, i) for i in ids])
            return self.db.total_changes - before
        return self._write(fn)

    def release_dead(self) -> int:
        """Drops the claims of owners that are dead processes on this host (e.g. a killed service). Returns how many."""
        with self.lock:
            owners = [r[0] for r in self.db.execute(
                "SELECT DISTINCT claimed_by FROM items INDEXED BY items_claimed WHERE claimed_by IS NOT NULL "
                "AND status='pending'")]
        return sum(self.release(o) for o in owners if _owner_dead(o))

    # -- reads ----------------------------------------------------------------------------------------------------
    def pending(self, limit: int = 100, exclude: Iterable[int] = (), kind: Optional[str] = None) -> list[dict]:
        """Oldest pending items, skipping ids in ``exclude`` (work already in flight)."""
        exclude = set(exclude)
        q = f"SELECT {ITEM_COLS} FROM items WHERE status='pending'"
        args: list = []
        if kind:
            q += " AND kind=?"
            args.append(kind)
        q += " ORDER BY id LIMIT ?"
        args.append(limit + len(exclude))
        with self.lock:
            rows = self.db.execute(q, args).fetchall()
        out = [_item(r) for r in rows if r[0] not in exclude]
        return out[:limit]

    def changes_since(self, task: str, seq: int = 0, limit: int = 10_000) -> dict:
        """Answered items of ``task`` with ``seq`` > the given one: ``{"labels": [[text, label], ...],
        "pairs": [[a, b, pref], ...], "seq": newest seq returned}`` (``label`` None = unlabeled), about ``limit`` of
        them (a page never ends inside one transaction's answers, so paging by ``seq`` misses none)."""
        q = "SELECT kind, a, b, label, seq FROM items WHERE task=? AND status!='pending' AND seq"
        with self.lock:
            rows = self.db.execute(q + ">? ORDER BY seq LIMIT ?", (task, seq, limit)).fetchall()
            if len(rows) == limit:  # the answers of one transaction share a seq: a page ends with all of them,
                last = rows[-1][4]  # else the next page (seq > last) would skip the rest
                rows = [r for r in rows if r[4] != last] + self.db.execute(q + "=?", (task, last)).fetchall()
        labels = [[a, lab] for k, a, b, lab, s in rows if k == "label"]
        pairs = [[a, b, lab] for k, a, b, lab, s in rows if k == "pair"]
        return {"labels": labels, "pairs": pairs, "seq": max([seq] + [r[4] for r in rows])}

    def get(self, task: str, message: str, b: Optional[str] = None) -> Optional[dict]:
        kind, bb = ("label", "") if b is None else ("pair", b)
        with self.lock:
            r = self.db.execute("SELECT status, label, attempts, raw_reply, backend, model, prompt_version, error, "
                                "parse_failures, claimed_by FROM items WHERE task=? AND kind=? AND a=? AND b=?",
                                (task, kind, message, bb)).fetchone()
        if r is None:
            return None
        return dict(zip(("status", "label", "attempts", "raw_reply", "backend", "model", "prompt_version", "error",
                         "parse_failures", "claimed_by"), r))

    def counts(self) -> dict:
        """``{"pending": n, "labeled": n, "unlabeled": n}`` over all tasks and kinds (kept by triggers: O(1))."""
        with self.lock:
            try:
                rows = self.db.execute("SELECT status, n FROM status_counts").fetchall()
            except sqlite3.OperationalError:  # a store never opened read-write since it gained them
                rows = []
            if len(rows) < len(STATUSES):
                rows = self.db.execute("SELECT status, COUNT(*) FROM items GROUP BY status").fetchall()
        out = dict.fromkeys(STATUSES, 0)
        out.update(dict(rows))
        return out

    def summary(self, task: str, items: Optional[Iterable[tuple]] = None) -> dict:
        """Where the items of ``task`` stand (all of them, or those in ``items``: ``(kind, a, b)`` keys, ``b`` = ""
        for messages): ``{"total", "labeled", "unlabeled", "pending", "missing", "reasons": {why: n}}``, ``why``
        saying for each item not labelled why not (its last error, or that it was never sent)."""
        with self.lock:
            rows = self.db.execute("SELECT kind, a, b, status, error FROM items WHERE task=?", (task,)).fetchall()
        want = None if items is None else set(items)
        out = {"total": 0, "labeled": 0, "unlabeled": 0, "pending": 0, "missing": 0, "reasons": {}}
        seen = set()
        for kind, a, b, status, error in rows:
            if want is not None:
                if (kind, a, b) not in want:
                    continue
                seen.add((kind, a, b))
            out["total"] += 1
            out[status] += 1
            if status == "labeled":
                continue
            if status == "unlabeled":
                why = f"unlabelled, the replies never parsed: {error or 'no answer'}"
            elif error:
                why = f"pending, last error: {error}"
            else:
                why = NOT_ASKED
            out["reasons"][why] = out["reasons"].get(why, 0) + 1
        if want is not None:
            out["missing"] = len(want - seen)
            out["total"] += out["missing"]
            if out["missing"]:
                out["reasons"]["never reached the label store"] = out["missing"]
        return out
