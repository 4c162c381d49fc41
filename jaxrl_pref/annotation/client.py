"""The learner's side of the annotator: a client that never blocks, and a helper that starts the service.

``AnnotatorClient.submit(messages)`` only adds to an in-memory outbox; ``poll()`` only drains an inbox. A background
thread moves the outbox to the service (``POST /submit``) and new answers from it (``GET /changes``) into the inbox.
If the service is down or slow, the outbox keeps everything (deduplicated), the learner carries on with the
labels it has, and when the service comes back the outbox is sent and the missed answers are fetched (``seq`` of
the last answer seen is the cursor, so none are skipped).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence


class AnnotatorClient:
    def __init__(self, url: str, task: str, poll_interval: float = 0.5, timeout: float = 5.0,
                 max_batch: int = 5000):
        self.url, self.task = url.rstrip("/"), task
        self.poll_interval, self.timeout, self.max_batch = poll_interval, timeout, max_batch
        self._out_msgs: dict = {}
        self._out_pairs: dict = {}
        self._in_labels: dict = {}
        self._in_pairs: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self.seq = 0
        self.connected = False
        self.errors = 0
        self.server_metrics: dict = {}
        self._thread = threading.Thread(target=self._loop, name="annotator-client", daemon=True)
        self._thread.start()

    # -- learner side (never blocks on the network) -------------------------------------------------------------------
    def submit(self, messages: Sequence[str] = (), pairs: Sequence[Sequence[str]] = ()) -> None:
        with self._lock:
            self._out_msgs.update(dict.fromkeys(messages))
            self._out_pairs.update(dict.fromkeys(tuple(p) for p in pairs))
        self._kick.set()

    def poll(self) -> tuple[dict, list]:
        """New answers since the last poll: ``({message: label or None}, [(a, b, pref or None), ...])``."""
        with self._lock:
            labels, pairs = self._in_labels, self._in_pairs
            self._in_labels, self._in_pairs = {}, []
        return labels, pairs

    @property
    def outbox(self) -> int:
        with self._lock:
            return len(self._out_msgs) + len(self._out_pairs)

    def metrics(self) -> dict:
        """Client state plus the service's last reported metrics (prefixed ``annotator/``)."""
        out = {"annotator/connected": float(self.connected), "annotator/client_outbox": float(self.outbox),
               "annotator/client_errors": float(self.errors)}
        for k, v in self.server_metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out["annotator/" + k] = float(v)
        return out

    def close(self):
        self._stop.set()
        self._kick.set()
        self._thread.join(timeout=self.timeout + 1)

    # -- background thread -------------------------------------------------------------------------------------------
    def _http(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"}, method=method)
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())

    def _sync(self):
        with self._lock:
            msgs = list(self._out_msgs)[:self.max_batch]
            pairs = list(self._out_pairs)[:self.max_batch]
        if msgs or pairs:
            self._http("POST", "/submit", {"task": self.task, "messages": msgs, "pairs": [list(p) for p in pairs]})
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
            more = ch["seq"] > self.seq and (ch["labels"] or ch["pairs"])
            self.seq = ch["seq"]
            if not more or len(ch["labels"]) + len(ch["pairs"]) < 10_000:
                break
        self.server_metrics = self._http("GET", "/metrics")

    def _loop(self):
        delay = self.poll_interval
        while not self._stop.is_set():
            try:
                self._sync()
                self.connected, delay = True, self.poll_interval
            except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
                self.connected = False
                self.errors += 1
                delay = min(delay * 2, 5.0)  # back off while the service is down
            self._kick.wait(delay)
            self._kick.clear()


def start_server(store: str, backend: str = "embedded", log_path: Optional[str] = None, timeout: float = 120.0,
                 extra_args: Sequence[str] = (), env: Optional[dict] = None):
    """Starts ``python -m jaxrl_pref.annotation.server`` as a child process on a free 127.0.0.1 port and waits until
    it answers. Returns ``(process, url)``. Raises RuntimeError (with the log's tail) if it does not come up."""
    store_path = Path(store)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    port_file = store_path.with_suffix(f".port.{os.getpid()}")
    port_file.unlink(missing_ok=True)
    log = open(log_path or store_path.with_suffix(".server.log"), "ab")
    cmd = [sys.executable, "-m", "jaxrl_pref.annotation.server", "--store", str(store_path), "--backend", backend,
           "--port", "0", "--port-file", str(port_file), *extra_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"annotator exited with status {proc.returncode}; see {log.name}:\n"
                               + Path(log.name).read_text()[-2000:])
        if port_file.exists():
            url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                port_file.unlink(missing_ok=True)
                return proc, url
            except OSError:
                pass
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"annotator did not start within {timeout}s; see {log.name}")


def stop_server(proc, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
