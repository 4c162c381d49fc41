"""The label-quality reference set (benchmarks/data/label_reference.jsonl) and the metrics
(jaxrl_pref.annotation.quality, jaxrl_pref.stats) that benchmarks/label_quality.py reports."""
from pathlib import Path

import numpy as np
import pytest

from jaxrl_pref import stats
from jaxrl_pref.annotation import quality as LQ
from jaxrl_pref.annotation.backends import Prompt, Reply, make_backend

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "label_reference.jsonl"

GOALS = ("keyroom", "staircase", "score")


@pytest.fixture(scope="module")
def rows():
    return LQ.load_reference(REFERENCE)


def test_reference_file(rows):
    assert len(rows) >= 200
    msgs = [r["message"] for r in rows]
    assert len(set(msgs)) == len(msgs), "duplicate messages"
    for r in rows:
        assert isinstance(r["message"], str) and r["message"] == r["message"].rstrip() and r["message"]
        assert r["sources"] and all(isinstance(n, int) and n > 0 for n in r["sources"].values()), r
        assert set(r["labels"]) == set(GOALS), r
        assert all(v in (0, 1) for v in r["labels"].values()), r
    for g in GOALS:
        pos = sum(r["labels"][g] for r in rows)
        assert 15 <= pos <= len(rows) - 15, (g, pos)


def test_auc_hand_computed():
    assert stats.auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert stats.auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert stats.auc([0.5, 0.5, 0.5], [1, 0, 0]) == 0.5
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: 0.35 beats 0.1 only, 0.8 beats both -> 3 of 4
    assert stats.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # a tie counts one half: positive 1 vs negatives {1, 0} -> (0.5 + 1) / 2
    assert stats.auc([1, 1, 0], [1, 0, 0]) == 0.75
    assert np.isnan(stats.auc([0.1, 0.2], [1, 1]))


def test_bootstrap_interval_seeded():
    rng = np.random.default_rng(1)
    y = np.array([0] * 30 + [1] * 30)
    s = y + rng.normal(0, 1, 60)
    a = stats.bootstrap_interval(stats.auc, s, y, resamples=200, seed=3)
    assert a == stats.bootstrap_interval(stats.auc, s, y, resamples=200, seed=3)
    assert a[0] < stats.auc(s, y) < a[1]
    # the mean's interval (the parity benchmark's): the table's Acrobot anchor row, reproduced from its seeds
    assert stats.bootstrap_mean_interval([-86.4, -83.3, -495.1, -84.3]) == (-392.4, -83.8)
    assert stats.bootstrap_mean_interval([5.0, 5.0]) == (5.0, 5.0)


class FirstAlways:
    """A toy annotator that always prefers the first message of a pair."""
    name, batch_size = "first", 7

    def label(self, prompt, messages):
        return [Reply(1.0, "") for _ in messages]

    def compare(self, prompt, pairs):
        return [Reply(1.0, "") for _ in pairs]


def test_pair_agreement_position_bias():
    prompt = Prompt.load("minihack")
    pairs = [(f"good {i}", f"bad {i}") for i in range(20)]
    r = LQ.pair_agreement(FirstAlways(), prompt, pairs)
    assert (r["ab"], r["ba"], r["pair"], r["consistent"]) == (1.0, 0.0, 0.5, 0.0)
    assert r["n_pairs"] == 20 and r["unparsed"] == 0


def test_goal_swap_prompt():
    for task in ("minihack", "nethack_staircase", "nethack_score"):
        p = Prompt.load(task)
        s = LQ.swap_goal(p)
        assert s.goal != p.goal and "chocolate cake" in s.goal[0]
        assert "chocolate cake" not in " ".join(p.goal)
        for k in ("system", "label", "compare"):
            assert s.sections[k] == p.sections[k]
        assert set(s.sections) == set(p.sections) and s.task == p.task
        assert s.progress and s.neutral and not set(s.progress) & set(p.progress)
        user = s.label_messages("The door opens.")[1]["content"]
        assert "chocolate cake" in user and "The door opens." in user and "\\boxed{1}" in user


def test_parse_spec():
    assert LQ.parse_spec("scripted") == ("scripted", {})
    assert LQ.parse_spec("embedded:margin=0.05,tie_margin=0") == ("embedded", {"margin": 0.05, "tie_margin": 0})
    assert LQ.parse_spec("llm:model=some/model,shots=4") == ("llm", {"model": "some/model", "shots": 4})
    with pytest.raises(ValueError):
        LQ.build("no-such-backend")


def test_harness_end_to_end_scripted(rows):
    out = LQ.evaluate(make_backend("scripted"), rows[:80], pairs=20, resamples=50)
    for g in GOALS:
        r = out[g]
        assert 0 <= r["auc"] <= 1 and 0 <= r["acc"] <= 1 and 0 <= r["swap_auc"] <= 1
        assert r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
        assert r["consistent"] == 1.0 and r["ab"] == r["ba"]  # the keyword count is symmetric in the pair
    printed = LQ.table({"scripted": out})
    assert printed.count("| scripted | ") == len(GOALS) and "| scripted | keyroom" in printed
