"""The reference (oracle) annotator: the hand labels of benchmarks/data/label_reference.jsonl for the prompt's task,
pairs compared by label, the documented keyword rule for messages not in the set (counted and said), and a clear
error for a missing or broken labels file or a task the set has no labels for."""
import json

import pytest

from jaxrl_pref.annotation.backends import (BACKENDS, REFERENCE_GOALS, REFERENCE_PATH, Prompt, ReferenceBackend,
                                            make_backend)


@pytest.fixture(scope="module")
def backend():
    return make_backend("reference")


def _rows():
    return [json.loads(line) for line in REFERENCE_PATH.read_text().splitlines() if line.strip()]


def test_labels_known_messages_as_the_reference_set_does(backend):
    assert "reference" in BACKENDS and isinstance(backend, ReferenceBackend)
    prompt = Prompt.load("minihack")  # MiniHack-* -> the keyroom labels
    want = {"You see here a key named The Master Key of Thievery.": 1.0, "This door is locked.": 1.0,
            "g - a key named The Master Key of Thievery.": 1.0, "It's a wall.": 0.0, "Never mind.": 0.0,
            "The stairs are solidly fixed to the floor.": 0.0, "The door opens.": 1.0}
    replies = backend.label(prompt, list(want))
    assert [r.label for r in replies] == list(want.values())
    assert all(r.raw.startswith("reference ") for r in replies) and backend.fallbacks == 0
    # every labelled message of the file, for every goal, through the prompt the goal's env uses
    rows = _rows()
    for task, goal in REFERENCE_GOALS.items():
        got = backend.label(Prompt.load(task), [r["message"] for r in rows])
        assert [int(r.label) for r in got] == [r["labels"][goal] for r in rows], goal
    assert backend.fallbacks == 0
    # the mapping agrees with the label-quality benchmark's goal -> env
    from jaxrl_pref.annotation.backends import task_for_env
    from jaxrl_pref.annotation.quality import GOAL_ENVS
    assert {task_for_env(env): goal for goal, env in GOAL_ENVS.items()} == REFERENCE_GOALS
    assert backend.goal_of("minihack-goal-0123abcd") == "keyroom"  # a --goal variant: its base task's labels
    with pytest.raises(ValueError, match="no labels for prompt task 'keydoor'"):
        backend.label(Prompt.load("keydoor"), ["You pick up the key."])


def test_pairs_are_compared_by_label(backend):
    prompt = Prompt.load("minihack")
    pairs = [("This door is locked.", "It's a wall."), ("It's a wall.", "This door is locked."),
             ("It's a wall.", "Never mind."), ("The door opens.", "This door is locked."), ("", "It's a wall.")]
    assert [r.label for r in backend.compare(prompt, pairs)] == [1.0, 0.0, 0.5, 0.5, 0.5]


def test_messages_not_in_the_set_fall_back_to_the_keyword_rule_counted_and_said(capsys):
    b = ReferenceBackend()
    prompt = Prompt.load("minihack")
    new = {"You find a hidden passage.  You hear a door open.": 1.0,  # a part that matches
           "There is a staircase down here.": 1.0, "You see here a key.": 1.0,
           "You hear a door open far away.": 0.0,  # a sound
           "You can't open the door.": 0.0, "There is a staircase up here.  You see here a dagger.": 0.0,
           "You kill the baby crocodile!": 0.0}
    replies = b.label(prompt, list(new))
    assert [r.label for r in replies] == list(new.values())
    assert all(r.raw.startswith("keyword rule (not in the reference set)") for r in replies)
    assert (b.fallbacks, b.lookups, len(b.fallback_messages)) == (7, 7, 7)
    b.label(prompt, ["You kill the baby crocodile!", "It's a wall."])  # the same message again: counted, not logged again
    assert (b.fallbacks, b.lookups, len(b.fallback_messages)) == (8, 9, 7)
    assert "8 of 9 lookups" in b.describe() and "keyword rule" in b.describe()
    out = capsys.readouterr().out
    assert out.count("not in the reference set") == 7 and "'You kill the baby crocodile!'" in out
    # the other goals' rules: staircase counts no locked door, score counts the kill
    assert ReferenceBackend.rule("staircase", "This door is locked.") == 0
    assert ReferenceBackend.rule("score", "You kill the newt!") == 1
    # the rule restates the rubric: on the 320 reference messages it gives the hand labels
    for goal in ("keyroom", "staircase", "score"):
        assert all(ReferenceBackend.rule(goal, r["message"]) == r["labels"][goal] for r in _rows()), goal


def test_a_missing_or_broken_labels_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"labels .*nosuch\.jsonl are missing: .*source checkout"):
        ReferenceBackend(tmp_path / "nosuch.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"message": "The door opens.", "labels": {"keyroom": 1}}\n{"message": oops}\n')
    with pytest.raises(ValueError, match="line 2, do not parse"):
        ReferenceBackend(bad)
    part = tmp_path / "part.jsonl"  # a message labelled null (new, to be labelled by hand): not in the set
    part.write_text('{"message": "The door opens.", "labels": {"keyroom": 1}}\n'
                    '{"message": "It\'s a wall.", "labels": null}\n')
    b = ReferenceBackend(part)
    assert [r.label for r in b.label(Prompt.load("minihack"), ["The door opens.", "It's a wall."])] == [1.0, 0.0]
    assert b.fallbacks == 1
    # the service refuses to start without it (exit 2, one line), as for any unusable backend
    from jaxrl_pref.annotation import backends, server
    monkeypatch.setattr(backends, "REFERENCE_PATH", tmp_path / "nosuch.jsonl")
    assert server.main(["--backend", "reference", "--store", str(tmp_path / "labels.db")]) == 2
    assert "are missing" in capsys.readouterr().err
