"""The learner's side of the annotator: a client that never waits for the service, and the service's supervisor.

``AnnotatorClient.submit(messages)`` first makes the messages durable -- it adds them to the label store as pending
rows (write-ahead: one SQLite transaction) -- and only then returns, so a crash of the service or of the learner
loses none: the service labels the store's pending rows whenever it runs (after a restart, or in a resumed run).
Without a store path (a service elsewhere, ``--annotator-url`` without ``--label-store``) they wait in an in-memory
outbox that a background thread sends (``POST /submit``). ``poll()`` only drains an inbox that the background thread
fills from the service (``GET /changes``; ``seq`` of the last answer seen is the cursor, so none are skipped, and a
new client -- a resumed run -- gets every answer again).

With ``wait > 0`` (``--label-wait``), ``poll()`` first waits, for at most that many seconds, until everything this
client submitted has an answer: with a deterministic annotator which labels the learner has at each exchange then
no longer depends on the machine's speed (reproducible runs; tests without clock races). A wait that runs out is
said on the console and the learner goes on with what has arrived.

The service's troubles are said on the console (stderr), at most once per ``warn_every`` seconds each: the service
cannot be reached, or its backend fails (with the last error). :meth:`AnnotatorClient.summary` says at the end of a
run how many of the messages it submitted stayed unlabelled and why.

:func:`start_server` starts ``python -m jaxrl_pref.annotation.server``; with ``supervise=True`` it returns a
:class:`Supervisor` that restarts the service with backoff whenever it dies (on the same port, so its URL stays
valid), says so on stderr and in the service's log, and counts restarts; a client for that URL finds the supervisor
(and the store path) by itself.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Optional, Sequence

from jaxrl_pref.annotation.store import LabelStore
from jaxrl_pref.annotation.throttle import Throttle

_SUPERVISED: dict = {}  # url -> Supervisor started in this process (found by AnnotatorClient(url, ...))
_STORES: dict = {}  # url -> label store path of a service this process did not start (see remember_store)


def remember_store(url: str, store: str) -> None:
    """Tells clients created later for ``url`` (a service started elsewhere) where its label store is, so they
    write ahead into it."""
    _STORES[url.rstrip("/")] = str(store)


def _stderr(msg: str) -> None:
    print(f"annotator: {msg}", file=sys.stderr, flush=True)


class AnnotatorClient:
    """``url``: the service; ``task``: the prompt task. ``store``: the label store's path for write-ahead (default:
    the store of the supervised service at ``url`` if this process started one, else one given to
    :func:`remember_store`); ``supervisor``: likewise (its restarts are counted in :meth:`metrics`)."""

    def __init__(self, url: str, task: str, poll_interval: float = 0.5, timeout: float = 5.0,
                 max_batch: int = 5000, *, store: Optional[str] = None, supervisor: Optional["Supervisor"] = None,
                 warn_every: float = 30.0, wait: float = 0.0):
        self.url, self.task = url.rstrip("/"), task
        self.wait = float(wait)
        if self.wait < 0:
            raise ValueError(f"wait must be >= 0 seconds, got {wait}")
        self.poll_interval, self.timeout, self.max_batch = poll_interval, timeout, max_batch
        self.supervisor = supervisor if supervisor is not None else _SUPERVISED.get(self.url)
        if store is None:
            store = self.supervisor.store if self.supervisor is not None else _STORES.get(self.url)
        self.store = LabelStore(store) if store else None
        self._submitted: set = set()  # (kind, a, b) of everything submitted through this client
        self._unanswered: set = set()  # those of them no answer has arrived for yet (kept when wait > 0)
        self._have: set = set()  # keys answers arrived for (kept when wait > 0: an answer that came before its
        # submit -- another learner's, on a shared store -- is not waited for again)
        self.waited = 0.0  # seconds poll() spent waiting for answers (wait > 0)
        self._out_msgs: dict = {}
        self._out_pairs: dict = {}
        self._in_labels: dict = {}
        self._in_pairs: list = []
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)  # notified when answers arrive
        self._waiting = False
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._new_work = False
        self.seq = 0
        self.connected = False
        self.errors = 0
        self.backend_errors = 0  # over every run of the service this client talked to
        self._service_errors = 0  # the service's own count (restarts from 0 when it does)
        self.server_metrics: dict = {}
        self._warn_unreachable = Throttle(warn_every)
        self._warn_backend = Throttle(warn_every)
        self._warn_wait = Throttle(warn_every)
        self._thread = threading.Thread(target=self._loop, name="annotator-client", daemon=True)
        self._thread.start()

    # -- learner side (never waits for the service) -------------------------------------------------------------------
    def submit(self, messages: Sequence[str] = (), pairs: Sequence[Sequence[str]] = ()) -> None:
        """Messages (and pairs) to label. Returns once they are durable in the label store (when the client has
        one); they are labelled whenever a service runs on that store."""
        with self._lock:
            msgs = [m for m in dict.fromkeys(messages) if ("label", m, "") not in self._submitted]
            prs = [p for p in dict.fromkeys(tuple(p) for p in pairs) if ("pair", *p) not in self._submitted]
        if not msgs and not prs:
            return
        durable = False
        if self.store is not None:
            try:
                self.store.add(self.task, msgs, prs)  # one transaction, on disk when it returns
                durable = True
            except Exception as e:  # e.g. the store stayed locked past its timeout: keep them in memory, say so
                _stderr(f"WARNING: could not write {len(msgs) + len(prs)} message(s) to the label store "
                        f"{self.store.path} ({type(e).__name__}: {e}); they wait in memory for the service")
        with self._lock:
            keys = [("label", m, "") for m in msgs] + [("pair", *p) for p in prs]
            self._submitted.update(keys)
            if self.wait > 0:
                self._unanswered.update(k for k in keys if k not in self._have)
            if durable:
                self._new_work = True
            else:
                self._out_msgs.update(dict.fromkeys(msgs))
                self._out_pairs.update(dict.fromkeys(prs))
        self._kick.set()

    def poll(self) -> tuple[dict, list]:
        """New answers since the last poll: ``({message: label or None}, [(a, b, pref or None), ...])``. With
        ``wait > 0``, once everything submitted so far is answered or ``wait`` seconds have passed."""
        if self.wait > 0:
            self._wait_for_answers()
        with self._lock:
            labels, pairs = self._in_labels, self._in_pairs
            self._in_labels, self._in_pairs = {}, []
        return labels, pairs

    def _wait_for_answers(self) -> None:
        start = time.monotonic()
        deadline = start + self.wait
        with self._answered:
            if not self._unanswered:
                return
            self._waiting = True
            self._kick.set()  # ask the service now, then every 50 ms while this waits (see _loop)
            while self._unanswered and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._answered.wait(min(left, 0.05))
            self._waiting = False
            left_over = len(self._unanswered)
        self.waited += time.monotonic() - start
        n = self._warn_wait.hit() if left_over else 0
        if n:
            _stderr(f"WARNING: waited --label-wait {self.wait:g} s and {left_over} submitted item(s) still have no "
                    f"answer ({n} such wait(s) since the last warning); training goes on with the labels that "
                    "arrived, the rest come later")

    @property
    def outbox(self) -> int:
        """Submissions held only in memory (not yet in any store): 0 whenever the client writes ahead."""
        with self._lock:
            return len(self._out_msgs) + len(self._out_pairs)

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts if self.supervisor is not None else 0

    def metrics(self) -> dict:
        """Client state plus the service's last reported metrics (prefixed ``annotator/``)."""
        out = {}
        for k, v in self.server_metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out["annotator/" + k] = float(v)
        out.update({"annotator/connected": float(self.connected), "annotator/client_outbox": float(self.outbox),
                    "annotator/client_errors": float(self.errors), "annotator/restarts": float(self.restarts),
                    "annotator/backend_errors": float(self.backend_errors)})
        if self.wait > 0:
            out["annotator/waited_s"] = float(self.waited)
        return out

    def summary(self) -> dict:
        """Where everything this client submitted stands: ``{"total", "labeled", "unlabeled", "pending",
        "missing", "reasons": {why: n}, "restarts", "text"}`` (``text``: a few lines for the end of a run). From the
        label store when the client has one, else from the service (``GET /summary``: all items of the task). Call
        it before :meth:`close`."""
        with self._lock:
            keys = set(self._submitted)
            in_memory = len(self._out_msgs) + len(self._out_pairs)
        if self.store is not None:
            out = self.store.summary(self.task, keys)
        else:
            try:
                out = self._http("GET", f"/summary?task={urllib.request.quote(self.task)}")
            except (OSError, http.client.HTTPException, ValueError) as e:
                out = {"total": len(keys), "labeled": 0, "unlabeled": 0, "pending": 0, "missing": len(keys),
                       "reasons": {f"the annotator service could not be asked ({e})": len(keys)}}
            if in_memory:
                out["reasons"]["never delivered: still in the client's memory (the service did not take them)"] = \
                    in_memory
        out["restarts"] = self.restarts
        lines = [f"annotator summary ({self.task}): {out['total']} item(s) submitted, {out['labeled']} labelled, "
                 f"{out['unlabeled']} unlabelled, {out['pending']} pending"
                 + (f", {out['missing']} missing" if out["missing"] else "")
                 + f"; service restarts: {out['restarts']}"]
        lines += [f"  {n} not labelled: {why}" for why, n in sorted(out["reasons"].items(), key=lambda kv: -kv[1])]
        m = self.server_metrics
        if m.get("backend"):  # who labelled, and how fast (the service's last report)
            lines.append(f"  labelled by {m['backend']}: {m.get('labeled_this_run', 0):.0f} this service run, "
                         f"{m.get('labels_per_s_run', 0.0):.1f} labels/s over its uptime")
        out["text"] = "\n".join(lines)
        return out

    def close(self):
        self._stop.set()
        self._kick.set()
        self._thread.join(timeout=self.timeout + 1)
        if self.store is not None:
            self.store.close()
            self.store = None

    # -- background thread -------------------------------------------------------------------------------------------
    def _base(self) -> str:
        return self.supervisor.url if self.supervisor is not None else self.url

    def _http(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self._base() + path, data, {"Content-Type": "application/json"}, method=method)
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())

    def _sync(self):
        with self._lock:
            msgs = list(self._out_msgs)[:self.max_batch]
            pairs = list(self._out_pairs)[:self.max_batch]
            wake, self._new_work = self._new_work, False
        if msgs or pairs or wake:  # (an empty submit wakes the service for the rows written ahead)
            try:
                self._http("POST", "/submit", {"task": self.task, "messages": msgs, "pairs": [list(p) for p in pairs]})
            except BaseException:
                with self._lock:
                    self._new_work |= wake
                raise
            with self._lock:  # only what was sent is removed; submissions made meanwhile stay
                for m in msgs:
                    self._out_msgs.pop(m, None)
                for p in pairs:
                    self._out_pairs.pop(p, None)
        while True:
            ch = self._http("GET", f"/changes?task={urllib.request.quote(self.task)}&since={self.seq}")
            with self._lock:
                for m, lab in ch["labels"]:
                    self._in_labels[m] = lab
                self._in_pairs.extend((a, b, p) for a, b, p in ch["pairs"])
                if self.wait > 0:
                    got = [("label", m, "") for m, _ in ch["labels"]] + [("pair", a, b) for a, b, _ in ch["pairs"]]
                    self._have.update(got)
                    self._unanswered.difference_update(got)
                    self._answered.notify_all()
            more = ch["seq"] > self.seq and (ch["labels"] or ch["pairs"])
            self.seq = ch["seq"]
            if not more or len(ch["labels"]) + len(ch["pairs"]) < 10_000:
                break
        self.server_metrics = m = self._http("GET", "/metrics")
        self._note_backend_errors(int(m.get("backend_errors", 0)), m.get("last_error"), int(m.get("queue_depth", 0)))

    def _note_backend_errors(self, count: int, last_error, waiting: int) -> None:
        new = count - self._service_errors if count >= self._service_errors else count  # (a restart resets it)
        self._service_errors = count
        self.backend_errors += new
        n = self._warn_backend.hit(new) if new else 0
        if n:
            _stderr(f"WARNING: the annotator's backend failed {n} time(s) since the last warning "
                    f"({self.backend_errors} in all); {waiting} item(s) wait in the store; last error: {last_error}")

    def _loop(self):
        delay = self.poll_interval
        while not self._stop.is_set():
            try:
                self._sync()
                self.connected, delay = True, self.poll_interval
            except urllib.error.HTTPError as e:  # the service answered but refused: say why
                self.connected = False
                self.errors += 1
                delay = min(delay * 2, 5.0)
                if self._warn_unreachable.hit():
                    try:
                        detail = e.read(300).decode("utf-8", "replace")
                    except OSError:
                        detail = ""
                    _stderr(f"WARNING: the annotator service at {self._base()} refused a request: HTTP {e.code} "
                            f"{detail}")
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as e:
                # (HTTPException: a service killed mid-reply leaves an IncompleteRead, which is not an OSError)
                self.connected = False
                self.errors += 1
                delay = min(delay * 2, 5.0)  # back off while the service is down
                n = self._warn_unreachable.hit()
                if n and self.supervisor is None:  # (a supervised service's deaths are said by the supervisor)
                    _stderr(f"WARNING: cannot reach the annotator service at {self._base()} ({n} failure(s) since "
                            f"the last warning): {getattr(e, 'reason', e)}; messages are kept "
                            + ("in the label store" if self.store is not None else "in memory")
                            + " until it answers")
            self._kick.wait(0.05 if self._waiting and self.connected else delay)
            self._kick.clear()


# -- the service process -------------------------------------------------------------------------------------------
def _launch(args: Sequence[str], store_path: Path, log_path: Path, port: int, timeout: float, env: Optional[dict]):
    """Starts the service on ``port`` (0: a free one) and waits until it answers. Returns ``(process, url)``."""
    port_file = store_path.with_name(f"{store_path.name}.port.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    cmd = [sys.executable, "-m", "jaxrl_pref.annotation.server", "--store", str(store_path), "--port", str(port),
           "--port-file", str(port_file), "--parent-pid", str(os.getpid()), *args]
    with open(log_path, "ab") as log:
        start = log.tell()  # what this start writes to the log (it is appended to across restarts and runs)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(_exit_reason(proc.returncode, log_path, start))
            if port_file.exists():
                url = f"http://127.0.0.1:{int(port_file.read_text())}"
                try:
                    urllib.request.urlopen(url + "/health", timeout=2).read()
                    return proc, url
                except OSError:
                    pass
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        raise RuntimeError(f"annotator did not start within {timeout}s; see {log_path}")
    finally:
        port_file.unlink(missing_ok=True)


def _exit_reason(rc: int, log_path: Path, start: int = 0) -> str:
    """One line for a service that exited at start: its own ``error: ...`` line (a bad option, an unusable store, an
    LLM server that does not answer), else the last line it wrote (a crash's exception; the traceback stays in the
    log)."""
    with open(log_path, "rb") as f:
        f.seek(start)
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    said = [ln[len("error: "):] for ln in lines if ln.startswith("error: ")]
    if said:
        return f"the annotator service exited with status {rc}: {said[-1]} (log: {log_path})"
    return (f"the annotator service exited with status {rc}" + (f": {lines[-1]}" if lines else "")
            + f" (the full output is in {log_path})")


def _status(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


class Supervisor:
    """Owns the annotator service process: when it dies (for any reason but :meth:`stop`), restarts it after
    ``backoff`` seconds (doubling up to ``max_backoff`` while restarts keep failing or the service keeps dying within
    ``healthy_after`` s), on the same port when it can (else a new one: ``url`` follows). Each death and restart is
    said on stderr and in the service's log, and counted in ``restarts``. The restarted service labels the store's
    pending rows, the work its predecessor left included. ``stop_server(supervisor)`` stops both."""

    def __init__(self, args: Sequence[str], store: str, log_path: str, timeout: float = 120.0,
                 env: Optional[dict] = None, backoff: float = 0.5, max_backoff: float = 30.0,
                 healthy_after: float = 60.0):
        self.args, self.store, self.log_path = list(args), str(store), Path(log_path)
        self.timeout, self.env = timeout, env
        self.backoff, self.max_backoff, self.healthy_after = backoff, max_backoff, healthy_after
        self.restarts = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.proc, self.url = _launch(self.args, Path(self.store), self.log_path, 0, timeout, env)
        self.port = int(self.url.rsplit(":", 1)[1])
        self._started = time.time()
        _SUPERVISED[self.url] = self
        self._thread = threading.Thread(target=self._watch, name="annotator-supervisor", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self):
        return self.proc.returncode if self._stopping.is_set() else None

    def poll(self):
        return self.returncode

    def _say(self, msg: str) -> None:
        _stderr(msg)
        with open(self.log_path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: {msg}\n")

    def _watch(self):
        delay = self.backoff
        while True:
            proc = self.proc
            rc = proc.wait()
            if self._stopping.is_set():
                return
            if time.time() - self._started >= self.healthy_after:
                delay = self.backoff
            self._say(f"the annotator service (pid {proc.pid}) died ({_status(rc)}); restarting it in {delay:g}s")
            port = self.port
            while True:
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, self.max_backoff)
                try:
                    new, url = _launch(self.args, Path(self.store), self.log_path, port, self.timeout, self.env)
                    break
                except RuntimeError as e:
                    self._say(f"restarting the annotator service failed ({str(e).splitlines()[0]}); "
                              f"trying again in {delay:g}s on a new port")
                    port = 0
            with self._lock:
                if self._stopping.is_set():  # stop() came while it was starting
                    _terminate(new)
                    return
                self.proc, self._started = new, time.time()
                if url != self.url:
                    _SUPERVISED.pop(self.url, None)
                    self.url, self.port = url, int(url.rsplit(":", 1)[1])
                    _SUPERVISED[self.url] = self
                self.restarts += 1
            self._say(f"restarted the annotator service (restart {self.restarts}, pid {new.pid}) on {url}; "
                      "it labels the pending work")

    def stop(self, timeout: float = 10.0) -> None:
        """No more restarts; the service gets SIGTERM (it closes its store cleanly), SIGKILL after ``timeout``."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        _terminate(proc, timeout)
        self._thread.join(timeout)
        _SUPERVISED.pop(self.url, None)


def _terminate(proc, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_server(store: str, backend: str = "embedded", log_path: Optional[str] = None, timeout: float = 120.0,
                 extra_args: Sequence[str] = (), env: Optional[dict] = None, supervise: bool = False):
    """Starts ``python -m jaxrl_pref.annotation.server`` as a child process on a free 127.0.0.1 port and waits until
    it answers. Returns ``(process, url)``, or ``(Supervisor, url)`` with ``supervise`` (the service is restarted
    whenever it dies). Raises RuntimeError (with the log's tail) if it does not come up."""
    store_path = Path(store)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else store_path.with_suffix(".server.log")
    args = ["--backend", backend, *extra_args]
    if supervise:
        sup = Supervisor(args, str(store_path), str(log), timeout=timeout, env=env)
        return sup, sup.url
    return _launch(args, store_path, log, 0, timeout, env)


def stop_server(proc, timeout: float = 10.0) -> None:
    """Stops what :func:`start_server` returned (a process or a :class:`Supervisor`; None is ignored)."""
    if proc is None:
        return
    if isinstance(proc, Supervisor):
        proc.stop(timeout)
    else:
        _terminate(proc, timeout)
