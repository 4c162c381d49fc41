"""Motif (--method motif): the message dataset, annotated pairs, the offline ranking model, its reuse, and PPO with it
frozen."""
import contextlib
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import motif, oni, ppo_host
from jaxrl_pref.annotation.backends import Prompt, ScriptedBackend
from jaxrl_pref.networks import EncoderActorCritic
from jaxrl_pref.rewards import motif as rm
from envs.messages import encode_messages
from jaxrl_pref.rewards.retrieval import lookup
from agents.testing import ONIConfig
from jaxrl_pref.testing import DictMLP


# -- phase 1: the dataset --------------------------------------------------------------------------------------------
class FakeEnv:
    """Host env: action a prints MSGS[a] (the key message padded with spaces, as NetHack pads); episodes of 3
    steps, whose last message is only in info["final_obs"] (the next observation is the reset's, empty)."""
    MSGS = ["", "You see here a key.   ", "It's a wall."]
    num_actions = 3

    def __init__(self, num_envs=2):
        self.num_envs, self.t = num_envs, 0

    def reset(self):
        self.t = 0
        return {"message": np.zeros((self.num_envs, 256), np.uint8)}

    def step(self, actions):
        msg = encode_messages([self.MSGS[a] for a in actions])
        self.t += 1
        done = np.full(self.num_envs, self.t % 3 == 0)
        obs = {"message": np.where(done[:, None], 0, msg).astype(np.uint8)}
        info = {"final_obs": {"message": msg}}
        return obs, np.zeros(self.num_envs), done, np.zeros(self.num_envs, bool), info


def test_collect_host_counts_each_text_once_with_final_messages():
    """A given policy on a fake host env: counts per text (padding ignored), the episode-ending steps' messages
    counted from final_obs, steps rounded up to whole batches."""
    script = iter([[1, 2], [1, 0], [2, 2], [1, 1], [0, 2]])
    texts, counts, steps = motif.collect_host(FakeEnv(), 9, policy=lambda obs: next(script))
    assert steps == 10
    assert dict(zip(texts, counts.tolist())) == {"You see here a key.": 4, "It's a wall.": 4, "": 2}
    assert texts[-1] == "" and counts.sum() == steps  # sorted by count, then text
    t2, c2, _ = motif.collect_host(FakeEnv(4), 40, seed=3)  # random policy: seeded
    t3, c3, _ = motif.collect_host(FakeEnv(4), 40, seed=3)
    assert t2 == t3 and (c2 == c3).all() and c2.sum() == 40 and set(t2) <= {"", "You see here a key.", "It's a wall."}


def test_collect_from_a_minihack_pool():
    pytest.importorskip("nle")
    ds = motif.collect_dataset("MiniHack-Room-5x5-v0", 100, num_envs=4, seed=0)
    assert ds.steps == 100 and ds.counts.sum() == 100 and "" in ds.texts and ds.env == "MiniHack-Room-5x5-v0"
    assert all(t == t.rstrip() for t in ds.texts) and len(set(ds.texts)) == len(ds.texts)


def test_collect_from_a_captioned_jax_task():
    from envs import captions
    ds = motif.collect_dataset("KeyDoor-5", 1024, num_envs=32, seed=0)
    assert ds.steps == 1024 and ds.counts.sum() == 1024 and (ds.counts > 0).all()
    assert set(ds.texts) <= set(captions.caption_table("KeyDoor-5").texts) and "It's a wall." in ds.texts
    assert motif.Dataset.from_json(ds.to_json()).as_dict() == ds.as_dict()


# -- phase 2: pairs ----------------------------------------------------------------------------------------------------
def test_sample_pairs_distinct_with_the_empty_message():
    texts = [f"message {i}" for i in range(30)] + [""]
    counts = np.r_[np.arange(30, 0, -1), 100]
    pairs = motif.sample_pairs(texts, counts, 100, "uniform", seed=1)
    assert len(pairs) == 100 and len({frozenset(p) for p in pairs}) == 100 and all(a != b for a, b in pairs)
    assert sum("" in p for p in pairs) == 25  # a quarter against the empty message, each message at most once
    assert any(a == "" for a, _ in pairs) and any(b == "" for _, b in pairs)  # random order within a pair
    assert pairs == motif.sample_pairs(texts, counts, 100, "uniform", seed=1)
    few = motif.sample_pairs(texts[:4] + [""], [5, 4, 3, 2, 1], 100, "counts")
    assert len(few) == 4 + 6  # every message vs "", and every pair of the four
    hot = motif.sample_pairs(texts, np.r_[1e6, np.ones(29), 1], 60, "counts", seed=0)
    assert sum("message 0" in p for p in hot) == 30  # counts-weighted: the frequent message in every pair it can be


class ScriptedClient:
    """In-process stand-in for the annotator client: the scripted backend's preferences on the MiniHack prompt,
    handed out ``per_poll`` at a time; ``bad`` pairs come back unanswerable (None)."""

    def __init__(self, per_poll=10 ** 9, bad=()):
        self.prompt, self.backend = Prompt.load("minihack"), ScriptedBackend()
        self.per_poll, self.bad, self.out, self.asked = per_poll, set(bad), [], []

    def submit(self, messages=(), pairs=()):
        pairs = [tuple(p) for p in pairs]
        self.asked += pairs
        self.out += [(a, b, None if (a, b) in self.bad else r.label)
                     for (a, b), r in zip(pairs, self.backend.compare(self.prompt, pairs))]

    def poll(self):
        got, self.out = self.out[:self.per_poll], self.out[self.per_poll:]
        return {}, got

    def metrics(self):
        return {}


def test_annotate_waits_reports_unanswerable_and_times_out():
    pairs = [("The door opens.", ""), ("It's a wall.", "You pick up a key."), ("Nothing happens.", "It's a wall.")]
    said = []
    ans = motif.annotate(ScriptedClient(per_poll=1, bad={pairs[2]}), pairs, timeout=30, every=0, poll=0.01,
                         say=said.append)
    assert ans.answered == [(*pairs[0], 1.0), (*pairs[1], 0.0)] and ans.unanswerable == [pairs[2]] and not ans.pending
    assert any("1/3 answered" in s for s in said)

    class Silent(ScriptedClient):
        def poll(self):
            return {}, [("other", "pair", 1.0)]  # answers to pairs it did not ask (a shared store): ignored
    ans = motif.annotate(Silent(), pairs, timeout=0.2, poll=0.01, say=said.append)
    assert ans.pending == pairs and not ans.answered


# -- phase 3: the reward model, saved and reused ------------------------------------------------------------------------
MON = ["newt", "jackal", "grid bug", "kobold", "lichen", "fox", "sewer rat", "gnome lord", "hill orc", "giant bat"]
ITEMS = ["a dagger", "3 gold pieces", "an amulet", "a wand", "a ring", "a potion", "a lamp", "a key"]
TEXTS = ([f"You kill the {m}!" for m in MON] + [f"You see here {i}." for i in ITEMS] + [f"You pick up {i}." for i in ITEMS]
         + [f"The {m} bites!" for m in MON] + [f"You hear {i} fall." for i in ITEMS]
         + ["It's a wall.", "This door is locked.", "The door opens.", "There is a staircase down here.",
            "Nothing happens.", ""])
OPTS = motif.MotifOptions(motif_pairs=300, motif_epochs=200, motif_patience=10)


def _dataset():
    return motif.Dataset(list(TEXTS), np.arange(len(TEXTS), 0, -1) * 3, "FakeEnv", 9999, 0)


def _never():
    raise AssertionError("recomputed instead of reused")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("motif")
    client, said = ScriptedClient(per_poll=50), []
    p = motif.prepare(OPTS, "FakeEnv", d, collect=_dataset, connect=lambda: contextlib.nullcontext(client),
                      say=said.append)
    return p, d, client, said


def test_reward_model_orders_messages_as_the_annotator(prepared):
    """Held-out pair accuracy of the model trained on the scripted annotator's preferences (ties left out), with
    ``OPTS`` (300 pairs, 20% held out): measured 1.0, 1.0, 1.0, 0.974 on seeds 0-3 (train acc 1.0 on each; 200 pairs
    and patience 5: 0.963-1.0); bound 0.9. The scripted annotator prefers messages with more of the prompt's
    progress words."""
    p, d, client, said = prepared
    info = p.info
    assert info["heldout_acc"] >= 0.9 and info["train_acc"] >= 0.95, info
    assert info["n_train"] + info["n_heldout"] == len(json.loads((d / "pairs.json").read_text())["pairs"])
    z = np.asarray(jax.jit(p.model.score)(p.model.init(None), jnp.asarray(
        encode_messages(["You pick up a key.", "You see here a lamp.", "It's a wall.", "The newt bites!"])), None))
    assert z[0] > z[1] > z[2] and z[1] > z[3], z
    assert any("reward model:" in s and "held-out acc" in s for s in said)
    # the threshold is the median normalised reward over the dataset's message steps
    s = info["stats"]
    texts = [t for t in TEXTS if t]
    w = _dataset().counts[:len(texts)]
    zz = (rm.rewards(p.model.params, texts) - s["mean"]) / s["std"]
    assert abs(np.average(zz, weights=w)) < 1e-4 and abs(np.sqrt(np.average(zz ** 2, weights=w)) - 1) < 1e-4
    assert w[zz <= s["threshold"] + 1e-6].sum() >= 0.5 * w.sum() > w[zz > s["threshold"] + 1e-6].sum()


def test_outputs_reload_bitwise_and_are_reused(prepared, tmp_path):
    p, d, client, said = prepared
    for f in ("dataset.json", "pairs.json", "model.msgpack", "model.json"):
        assert (d / f).is_file(), f
    assert motif.Dataset.from_json((d / "dataset.json").read_text()).as_dict() == _dataset().as_dict()
    params, info = rm.load(d)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, p.model.params)
    asked = len(client.asked)
    said2 = []
    again = motif.prepare(OPTS, "FakeEnv", d, collect=_never, connect=_never, say=said2.append)
    assert len(client.asked) == asked and again.threshold == p.threshold and again.sha == p.sha
    assert sum("reusing" in s for s in said2) == 3, said2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again.model.params,
                 p.model.params)
    # another quantile: only the threshold is recomputed (the parameters stay)
    q = motif.prepare(dataclasses.replace(OPTS, motif_quantile=0.9), "FakeEnv", d, collect=_never, connect=_never,
                      say=said2.append)
    assert q.threshold > p.threshold and q.sha == p.sha and q.info["stats"]["quantile"] == 0.9
    # another env's dataset in the directory: refused
    from jaxrl_pref.config import ConfigError
    with pytest.raises(ConfigError, match="holds messages of FakeEnv"):
        motif.prepare(OPTS, "OtherEnv", d, collect=_never, connect=_never, say=said2.append)
    # a new dataset: the pairs are asked again (the label store would answer the known ones) and the model retrained
    (tmp_path / "dataset.json").write_bytes(motif.Dataset(TEXTS[:12] + [""], np.ones(13), "FakeEnv", 13, 0).to_json())
    (tmp_path / "pairs.json").write_bytes((d / "pairs.json").read_bytes())
    c2 = ScriptedClient()
    new = motif.prepare(dataclasses.replace(OPTS, motif_epochs=3), "FakeEnv", tmp_path, collect=_never,
                        connect=lambda: contextlib.nullcontext(c2), say=said2.append)
    assert c2.asked and all(set(pr) <= set(TEXTS[:12] + [""]) for pr in c2.asked) and new.info["epochs"] == 3


def test_unanswered_pairs_stop_the_run_and_a_rerun_goes_on(tmp_path):
    class Slow(ScriptedClient):
        def poll(self):
            return {}, []
    with pytest.raises(RuntimeError, match="still unanswered"):
        motif.prepare(dataclasses.replace(OPTS, motif_timeout=0.3, motif_pairs=20), "FakeEnv", tmp_path,
                      collect=_dataset, connect=lambda: contextlib.nullcontext(Slow()), say=lambda s: None)
    assert (tmp_path / "dataset.json").exists() and not (tmp_path / "pairs.json").exists()


# -- phase 4: PPO with the frozen model ----------------------------------------------------------------------------------
MESSAGES = ["It's a wall.", "You hear some noises.", "You pick up a key.", "Nothing happens."]


class MessageBandit:
    """Host env: action a prints MESSAGES[a]; no extrinsic reward; episodes of 8 steps."""
    num_actions = len(MESSAGES)

    def __init__(self, num_envs):
        self.num_envs, self.t, self.bytes = num_envs, 0, encode_messages(MESSAGES)

    def observation_spec(self):
        return {"obs": ((2,), np.float32), "message": ((256,), np.uint8)}

    def reset(self):
        self.t = 0
        return {"obs": np.ones((self.num_envs, 2), np.float32), "message": np.zeros((self.num_envs, 256), np.uint8)}

    def step(self, actions):
        obs = {"obs": np.ones((self.num_envs, 2), np.float32), "message": self.bytes[np.asarray(actions)]}
        self.t += 1
        done = np.full(self.num_envs, self.t % 8 == 0)
        info = {"final_obs": {k: v.copy() for k, v in obs.items()}, "episode_done": done,
                "episode_return": np.zeros(self.num_envs, np.float32), "episode_length": np.full(self.num_envs, 8.0)}
        obs["message"][done] = 0
        return obs, np.zeros(self.num_envs, np.float32), np.zeros(self.num_envs, bool), done, info

    def close(self):
        pass


def test_frozen_reward_does_not_change_during_ppo(prepared):
    """PPO updates leave the frozen model's parameters and statistics bitwise as loaded (its update reports them,
    finite); the hook counts the messages into the table (the count decay) and asks nothing."""
    p = prepared[0]
    cfg = ONIConfig(env_name="CartPole-v1", num_envs=8, num_steps=16, total_timesteps=8 * 16 * 4, update_epochs=1,
              num_minibatches=2, ext_coef=0.0, int_coef=1.0, table_capacity=1024, method="motif",
              reward_model="ranking")
    env = MessageBandit(cfg.num_envs)
    reward = motif.make_reward(cfg, p)
    hook = motif.make_hook(cfg, reward)
    tr = ppo_host.make_trainer(cfg, env, reward, network=EncoderActorCritic(env.num_actions, DictMLP()),
                               host_hook=hook)
    state = tr.init(jax.random.PRNGKey(0))
    before = jax.device_get(state.reward_state["model"]["model"])
    msgs = jnp.asarray(encode_messages(MESSAGES))
    z0 = np.asarray(p.model.score(before, msgs, None))
    state, metrics = tr.run(state, None, cfg.num_updates)
    after = jax.device_get(state.reward_state["model"]["model"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), after, before)
    np.testing.assert_array_equal(np.asarray(p.model.score(after, msgs, None)), z0)
    assert z0[2] > p.threshold > z0[0]  # "You pick up a key." is paid, "It's a wall." not
    for k in ("reward_model/frozen_mean", "reward_model/frozen_std"):
        assert np.isfinite(metrics[k]).all() and (np.asarray(metrics[k]) == np.asarray(metrics[k]).reshape(-1)[0]).all()
    _, count, found = lookup(state.reward_state["model"]["table"], msgs)
    assert float(np.asarray(count).sum()) == cfg.total_timesteps and bool(found.all())
    assert metrics["labels/pairs"][-1] == 0 and metrics["labels/labeled"][-1] == 0
    assert (np.asarray(metrics["intrinsic/active_frac"]) > 0).any()


# -- the command line -----------------------------------------------------------------------------------------------------
def test_cli_method_motif_options_and_resume_of_older_runs(tmp_path):
    from experiments import oni as oni_exp
    opts = oni_exp.parse(["--method", "motif", "--motif-steps", "500", "--motif-dir", str(tmp_path / "m")])
    assert (opts.oni.reward_model, opts.motif.motif_steps, opts.motif_dir) == ("ranking", 500, str(tmp_path / "m"))
    cfg = dataclasses.asdict(opts.config)
    assert cfg["motif_steps"] == 500 and "motif_pairs" not in cfg  # only the Motif options set are saved
    assert not any(k.startswith("motif") for k in dataclasses.asdict(oni_exp.parse([]).config))  # older runs resume
    for argv in (["--motif-steps", "5"], ["--method", "motif", "--motif-pair-sampling", "x"],
                 ["--method", "motif", "--motif-quantile", "1.5"]):
        with pytest.raises(SystemExit) as e:
            oni_exp.parse(argv)
        assert e.value.code == 2, argv
    (tmp_path / "config.json").write_text(json.dumps({"agent": "oni", "config": cfg, "run": {"seed": 1}}))
    again = oni_exp.parse(["--resume", str(tmp_path)])
    assert (again.oni.method, again.motif.motif_steps, again.motif_dir) == ("motif", 500, str(tmp_path / "m"))
    # a run resumed with another reward model than it started with is refused (--no-resume starts it over)
    from jaxrl_pref.config import ConfigError
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg, "run": {"motif_model_sha256": "a" * 64}}))
    motif.check_resume(tmp_path, "a" * 64, tmp_path / "m")
    with pytest.raises(ConfigError, match="another Motif reward model"):
        motif.check_resume(tmp_path, "b" * 64, tmp_path / "m")
    assert oni_exp.motif_dir(again, tmp_path) == tmp_path / "m"


@pytest.mark.slow
def test_motif_end_to_end_on_minihack_reuses_dir_and_resumes(tmp_path):
    """`python -m experiments.oni --method motif` on MiniHack KeyRoom with the scripted annotator: the dataset, pairs
    and model are made in --motif-dir, PPO runs; a second run with the same --motif-dir reuses all three, and a run
    killed after its first checkpoint resumes with the frozen model reloaded."""
    pytest.importorskip("nle")
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    from jaxrl_pref.logging import read_metrics
    root = Path(__file__).resolve().parents[1]
    mdir, run = tmp_path / "motif", tmp_path / "run"
    base = ["--env", "MiniHack-KeyRoom-Fixed-S5-v0", "--method", "motif", "--annotator", "scripted",
            "--motif-dir", str(mdir), "--motif-steps", "2000", "--motif-pairs", "60", "--motif-epochs", "60",
            "--num-envs", "4", "--num-steps", "32", "--total-timesteps", str(4 * 32 * 4), "--checkpoint-every", "2",
            "--progress", "False", "--log-every", "1"]

    def cli(*argv):
        p = subprocess.run([sys.executable, "-m", "experiments.oni", *argv], cwd=root, capture_output=True, text=True,
                           timeout=900, env={**os.environ, "CI": "true"})
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stderr

    err = cli(*base, "--run-dir", str(run))
    for f in ("dataset.json", "pairs.json", "model.msgpack", "model.json", "labels.db", "annotator.log"):
        assert (mdir / f).is_file(), f
    assert "collecting the dataset" in err and "asking the annotator to rank" in err and "training the reward" in err
    ds = json.loads((mdir / "dataset.json").read_text())
    assert ds["env"] == "MiniHack-KeyRoom-Fixed-S5-v0" and sum(ds["counts"]) == ds["steps"] >= 2000
    pairs = json.loads((mdir / "pairs.json").read_text())["pairs"]
    assert pairs and all(p in (0.0, 0.5, 1.0) for _, _, p in pairs)
    info = json.loads((mdir / "model.json").read_text())
    assert np.isfinite([info["stats"]["mean"], info["stats"]["std"], info["stats"]["threshold"]]).all()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["method"] == "motif" and cfg["run"]["motif_model_sha256"] == info["model_sha256"]
    m = read_metrics(run / "metrics.csv")
    get = lambda k: np.asarray(m[k], np.float64).reshape(-1)  # noqa: E731
    np.testing.assert_array_equal(get("update"), [1, 2, 3, 4])
    np.testing.assert_allclose(get("reward_model/frozen_mean"), info["stats"]["mean"], rtol=1e-6)  # frozen
    np.testing.assert_allclose(get("reward_model/frozen_std"), info["stats"]["std"], rtol=1e-6)
    assert get("messages/distinct_seen")[-1] >= 1 and (get("labels/pairs") == 0).all()
    assert np.isfinite(get("intrinsic/reward")).all() and (run / "oni_curves.png").is_file()

    err2 = cli(*base, "--run-dir", str(tmp_path / "run2"), "--seed", "1")
    assert err2.count("motif: reusing") == 3 and "asking the annotator" not in err2 and "training the reward" not in err2

    shutil.rmtree(run / "checkpoints" / "4")  # killed between its checkpoints at update 2 and 4
    err3 = cli("--resume", str(run), "--progress", "False")
    assert err3.count("motif: reusing") == 3
    np.testing.assert_array_equal(np.asarray(read_metrics(run / "metrics.csv")["update"]).reshape(-1), [1, 2, 3, 4])


# -- captioned JAX tasks: the frozen model inside the jitted loop ----------------------------------------------------------
def test_caption_scores_are_the_message_scores(prepared):
    """On a captioned task the frozen model scores the caption table once per update (by id); those scores are the
    ones it gives the same messages' bytes on the pool, and the shaped reward pays exactly the captions above the
    threshold, decayed by their per-id counts."""
    from envs import captions
    from jaxrl_pref.rewards.captioned import CaptionedIntrinsic
    p = prepared[0]
    state = p.model.init(jax.random.PRNGKey(0))
    msgs = jnp.asarray(encode_messages(TEXTS))
    np.testing.assert_allclose(np.asarray(p.model.caption_scores(state, msgs, None)),
                               np.asarray(p.model.score(state, msgs, None)), rtol=1e-5, atol=1e-6)
    cfg = oni.ONIOptions(ext_coef=0.0, int_coef=1.0, normalize_intrinsic=False, count_beta=0.5)
    table = captions.caption_table("KeyDoor-5")
    reward = motif.make_reward(cfg, p, table)
    assert isinstance(reward.intrinsic, CaptionedIntrinsic)
    rs = reward.intrinsic.init(jax.random.PRNGKey(0), None)
    ids = jnp.arange(len(table), dtype=jnp.int32)
    traj = type("T", (), {"info": {"message_id": ids}})()
    rs, _ = reward.intrinsic.update(rs, traj, jax.random.PRNGKey(1))
    r, _ = reward.intrinsic(rs, traj)
    z = np.asarray(p.model.score(state, jnp.asarray(table.bytes), None))
    want = np.where((z > p.threshold) & (np.arange(len(table)) > 0), z, 0.0)  # each seen once: decay 1
    np.testing.assert_allclose(np.asarray(r), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
def test_motif_on_a_captioned_jax_task_from_the_cli(tmp_path):
    """`python -m experiments.oni --env KeyDoor-5 --method motif` (scripted annotator, 2 vmapped seeds): the dataset
    is collected in jit from the caption ids, the pairs answered, the model trained and frozen, and PPO runs in the
    jitted loop with it (no host hook): the frozen statistics logged per seed stay put, the intrinsic reward pays."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from jaxrl_pref.logging import read_metrics
    root = Path(__file__).resolve().parents[1]
    mdir, run = tmp_path / "motif", tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "experiments.oni", "--env", "KeyDoor-5", "--method", "motif",
                        "--annotator", "scripted", "--motif-dir", str(mdir), "--motif-steps", "4000",
                        "--motif-pairs", "40", "--motif-epochs", "40", "--num-seeds", "2", "--num-envs", "8",
                        "--num-steps", "16", "--total-timesteps", str(8 * 16 * 3), "--progress", "False",
                        "--log-every", "1", "--run-dir", str(run)],
                       cwd=root, capture_output=True, text=True, timeout=900, env={**os.environ, "CI": "true"})
    assert p.returncode == 0, p.stderr[-3000:]
    for f in ("dataset.json", "pairs.json", "model.msgpack", "model.json"):
        assert (mdir / f).is_file(), f
    ds = json.loads((mdir / "dataset.json").read_text())
    assert ds["env"] == "KeyDoor-5" and sum(ds["counts"]) == ds["steps"] >= 4000
    assert "You pick up the key." in ds["texts"] or any("key" in t for t in ds["texts"])
    info = json.loads((mdir / "model.json").read_text())
    m = read_metrics(run / "metrics.csv")
    np.testing.assert_array_equal(m["update"], [1, 2, 3])
    assert np.asarray(m["episode_return"]).shape == (2, 3)  # [seeds, updates]
    np.testing.assert_allclose(np.asarray(m["reward_model/frozen_mean"], np.float64), info["stats"]["mean"], rtol=1e-6)
    assert (np.asarray(m["messages/distinct_seen"])[:, -1] >= 1).all()
    assert (np.asarray(m["intrinsic/active_frac"]) > 0).any()
