"""jaxrl_pref.study: a grid of command-line runs (done markers, skip-if-done, a failing run named, an interrupted run
resumed) with a stand-in experiment, and a study's run trained in this process through the runner."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrl_pref import study
from jaxrl_pref.study import Run

REPO = Path(__file__).resolve().parents[1]

# the stand-in experiment (`python -m studyfake.run --steps N ... --resume --progress False --run-dir D`): records its
# arguments, "trains" N steps with a checkpoint after each (continued from it with --resume), fails with --fail, and
# with --pause-at K says it is ready at step K and waits for SIGTERM, which stops it as a run stops (128 + signal)
FAKE = """import json, signal, sys, time
from pathlib import Path
args = sys.argv[1:]
run = Path(args[args.index("--run-dir") + 1])
steps = int(args[args.index("--steps") + 1])
pause = int(args[args.index("--pause-at") + 1]) if "--pause-at" in args else None
run.mkdir(parents=True, exist_ok=True)
with open(run / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\\n")
stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
ckpt = run / "checkpoint"
done = start = int(ckpt.read_text()) if "--resume" in args and ckpt.exists() else 0
print(f"fake: starting at step {done}", flush=True)
if "--fail" in args:
    print("error: the env id is wrong", file=sys.stderr, flush=True)
    sys.exit(3)
while done < steps:
    if pause is not None and start < pause == done:
        (run / "ready").write_text("")
        while not stop:
            time.sleep(0.01)
    if stop:
        print(f"fake: stopped at step {done}", flush=True)
        sys.exit(128 + stop[0])
    done += 1
    ckpt.write_text(str(done))
print(f"fake: finished {done} steps", flush=True)
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The stand-in experiment ``studyfake.run``, importable by the runs (on PYTHONPATH)."""
    pkg = tmp_path / "pkg" / "studyfake"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "run.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "pkg"), str(REPO),
                                                      os.environ.get("PYTHONPATH", "")]))
    return tmp_path / "out"


def _calls(run_dir: Path) -> list:
    path = run_dir / "calls.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_grid_runs_each_run_once_marks_it_done_and_skips_it_after(fake, capsys):
    runs = [Run(f"t/{m}", "studyfake.run", ["--steps", "3", "--method", m], fake / "t" / m) for m in ("a", "b")]
    outcomes = study.run_grid(runs)
    assert [o.ok for o in outcomes] == [True, True]
    out = capsys.readouterr().out
    for r in runs:
        argv = r.command()
        assert argv[1:3] == ["-m", "studyfake.run"] and "--resume" in argv
        assert argv[-2:] == ["--run-dir", str(r.run_dir)]
        assert f"+ {' '.join(argv)}\n" in out  # announced, then its output shown as it runs
        assert study.is_done(r.run_dir, r) and json.loads((r.run_dir / study.DONE).read_text()) == r.marker()
        assert "fake: finished 3 steps" in (r.run_dir / study.LOG).read_text()
        assert len(_calls(r.run_dir)) == 1
    assert out.count("fake: finished 3 steps") == 2
    assert study.run_grid(runs) == [] and capsys.readouterr().out == ""  # all done: nothing runs, nothing is said
    assert all(len(_calls(r.run_dir)) == 1 for r in runs)
    # other options than the marker's: run again (its --resume restores it, or refuses a run of other settings)
    changed = Run("t/a", "studyfake.run", ["--steps", "4", "--method", "a"], fake / "t" / "a")
    assert not study.is_done(changed.run_dir, changed)
    (o,) = study.run_grid([changed, runs[1]])
    assert o.ok and _calls(changed.run_dir)[-1][:2] == ["--steps", "4"]
    assert (changed.run_dir / "checkpoint").read_text() == "4"  # continued from step 3


def test_old_done_markers_count_as_done(tmp_path):
    """Run dirs of before this module: sparse_study's and oni_compare's empty ``done``, a Slurm task's status.json."""
    run = Run("x", "studyfake.run", ["--steps", "1"], tmp_path / "x")
    assert not study.is_done(run.run_dir, run)
    run.run_dir.mkdir()
    (run.run_dir / "done").touch()
    assert study.is_done(run.run_dir, run) and study.is_done(run.run_dir)
    task = tmp_path / "task"
    task.mkdir()
    (task / "status.json").write_text(json.dumps({"state": "failed"}))
    assert not study.is_done(task)
    (task / "status.json").write_text(json.dumps({"state": "done", "exit_code": 0}))
    assert study.is_done(task, run)


def test_a_failing_run_is_named_with_its_status_command_and_log(fake, capsys):
    runs = [Run(f"t/{m}", "studyfake.run", ["--steps", "2", *(["--fail"] if m == "b" else [])], fake / m)
            for m in ("a", "b", "c")]
    with pytest.raises(study.RunFailed) as e:
        study.run_grid(runs)
    msg = str(e.value)
    assert msg.startswith("run t/b failed with exit status 3; its output is in ") and str(fake / "b" / "run.log") in msg
    assert f"command: {' '.join(runs[1].command())}" in msg
    assert "error: the env id is wrong" in (fake / "b" / "run.log").read_text()
    assert "error: the env id is wrong" in capsys.readouterr().err  # its stderr shown on stderr
    assert e.value.outcome.returncode == 3 and [o.run.name for o in e.value.outcomes] == ["t/a", "t/b"]
    assert study.is_done(fake / "a") and not study.is_done(fake / "b") and _calls(fake / "c") == []  # stopped there
    # keep_going: the others run; the failure is raised after them
    with pytest.raises(study.RunFailed) as e:
        study.run_grid(runs, keep_going=True)
    assert e.value.outcome.run.name == "t/b" and [o.run.name for o in e.value.outcomes] == ["t/b", "t/c"]
    assert study.is_done(fake / "c") and len(_calls(fake / "a")) == 1


def test_a_stopped_study_continues_the_interrupted_run(fake):
    """SIGTERM to the study is passed on to the running run, which saves and stops; the study stops (exit 128 + 15)
    without starting the next run; the same grid run again continues the run from its checkpoint."""
    script = ("import sys\nfrom pathlib import Path\nfrom jaxrl_pref import study\n"
              f"out = Path({str(fake)!r})\n"
              "runs = [study.Run('t/a', 'studyfake.run', ['--steps', '5', *sys.argv[1:]], out / 'a'),\n"
              "        study.Run('t/b', 'studyfake.run', ['--steps', '2'], out / 'b')]\n"
              "try:\n    study.run_grid(runs)\nexcept study.Stopped as e:\n"
              "    print(f'error: {e}', file=sys.stderr)\n    sys.exit(e.exit_status)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, "--pause-at", "2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60  # bounds a hang only: the stand-in starts in well under a second
    while not (fake / "a" / "ready").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # to the study only: it passes it on
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert "t/a: got SIGTERM, asking the run to save and stop" in out and "fake: stopped at step 2" in out
    assert err.strip() == ("error: stopped by SIGTERM during run t/a; run the same command again to continue from its "
                           "last checkpoint")
    assert not study.is_done(fake / "a") and _calls(fake / "b") == []
    # the same command again (in this process now): the run continues from step 2, the next one runs
    runs = [Run("t/a", "studyfake.run", ["--steps", "5", "--pause-at", "2"], fake / "a"),
            Run("t/b", "studyfake.run", ["--steps", "2"], fake / "b")]
    assert [o.ok for o in study.run_grid(runs)] == [True, True]
    calls = _calls(fake / "a")
    assert len(calls) == 2 and all("--resume" in c for c in calls)
    log = (fake / "a" / "run.log").read_text()
    assert log.count("=== ") == 2 and "fake: starting at step 2" in log and "fake: finished 5 steps" in log


def test_train_in_this_process_resumes_restores_and_refuses_other_settings(tmp_path):
    """A study's run trained here through the runner: a run dir with metrics.csv and the done marker; run again, the
    finished run is restored (not trained again) with its state and metrics; other settings are refused by name."""
    import dataclasses

    import jax.numpy as jnp

    from jaxrl_pref.config import ConfigError
    from jaxrl_pref.logging import read_metrics
    from jaxrl_pref.loop import ScanLoop

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        num_updates: int = 5
        rate: float = 0.5

    def make(cfg, log_fn=None, log_every=1):
        def step(s, hp, axis):
            s = {"x": s["x"] * cfg.rate + 1.0, "n": s["n"] + 1}
            return s, {"loss": s["x"]}
        return ScanLoop(lambda key, hp, axis: {"x": key[1].astype(jnp.float32), "n": jnp.int32(0)}, step,
                        lambda: (), lambda s: s["n"], log_fn=log_fn, log_every=log_every)

    kw = dict(num_seeds=2, seed=3, checkpoint_every=2, steps_per_update=4, tensorboard=False, plot=False)
    first = study.train("t/x", make, Cfg(), tmp_path / "x", **kw)
    assert first.finished and first.resumed_from is None and study.is_done(tmp_path / "x")
    m = read_metrics(tmp_path / "x" / "metrics.csv")
    np.testing.assert_array_equal(m["loss"], first.metrics["loss"])
    x = np.array([3.0, 4.0])  # PRNGKey(3 + i)[1], seeds 3 and 4
    for _ in range(5):
        x = x * 0.5 + 1.0
    np.testing.assert_allclose(m["loss"][:, -1], x)
    again = study.train("t/x", make, Cfg(), tmp_path / "x", **kw)
    assert again.resumed_from == 5 and again.updates_done == 5 and again.train_s == 0.0
    np.testing.assert_array_equal(np.asarray(again.state["x"]), np.asarray(first.state["x"]))
    np.testing.assert_array_equal(again.metrics["loss"], first.metrics["loss"])
    with pytest.raises(ConfigError) as e:
        study.train("t/x", make, Cfg(rate=0.25), tmp_path / "x", **kw)
    assert str(e.value).startswith(f"run t/x: {tmp_path / 'x'} was started with different settings (config.rate: "
                                   "0.5 in the checkpoint, 0.25 now)")
    assert "Fix: run the study with the settings it was started with" in str(e.value)


@pytest.mark.slow
def test_a_study_trained_in_its_process_resumes_and_reads_its_runs(tmp_path, capsys):
    """experiments.sqirl_vs_ppo trains through the runner: each (task, agent) a run dir with metrics.csv, checkpoints
    and the done marker; run again, the finished runs are restored (PPO's greedy evaluation on the restored policy)
    and the numbers are the same."""
    import csv

    from experiments import sqirl_vs_ppo as svp
    argv = ["--tasks", "DeepSea-4", "--episodes", "8", "--num-seeds", "2", "--ppo-num-envs", "4", "--ppo-num-steps",
            "8", "--eval-episodes", "4", "--out", str(tmp_path)]

    def numbers():
        with open(tmp_path / "results.csv") as f:
            return [{k: v for k, v in row.items() if not k.endswith("_wall_s")} for row in csv.DictReader(f)]

    assert svp.main(argv) == 0
    for agent in ("sqirl", "ppo"):
        run = tmp_path / "DeepSea-4" / agent
        assert (run / "metrics.csv").is_file() and (run / "checkpoints").is_dir() and study.is_done(run)
        assert json.loads((run / "config.json").read_text())["agent"] == agent
    first = numbers()
    assert [r["seed"] for r in first] == ["0", "1"] and (tmp_path / "results.md").is_file()
    capsys.readouterr()
    assert svp.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("resumed ") == 2 and out.count("nothing to train in this session") == 2
    assert numbers() == first
