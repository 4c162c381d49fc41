"""Documented command-line behaviours at the smallest scale that still shows them. What only a process of its own
shows runs the way a user runs it (``python -m experiments.<name> ...``: the exit status a shell sees for a NaN loss,
what ``--matmul-precision``/``--deterministic`` leave in effect in the run's process, the README's command); the rest
calls the entry point's ``main([...])`` in this process (what ``python -m`` calls, sparing each run ~5-10 s of JAX
start-up; also where a test needs to look inside the run):

* docs/running.md: a NaN loss exits 1 and keeps the last good checkpoint; ``--no-resume`` moves the old
  ``checkpoints/`` and ``tb/`` aside and starts over from update 1;
* docs/accelerators.md: ``--matmul-precision`` and ``--deterministic`` are recorded in ``config.json``, in effect in
  the run's process, and read back by ``--resume``;
* docs/oni.md: an unreachable ``--llm-base-url`` stops the run at start (exit 2, naming the URL and the fix);
  ``--allow-unreachable-llm True`` starts anyway and trains; ``--motif-holdout`` holds out that fraction of pairs;
* README "Run the main job": the sparse study's command at a tiny scale prints the table and writes the plot;
* docs/heron.md: ``--absolute-margins``, ``--random-margins --margin-low/--margin-high``, ``--rm-normalize`` and
  ``--reward-scale`` change the comparisons' margins and the reward PPO learns from;
* docs/exploration.md: ``--bonus-learning-rate`` is the RND predictor's Adam step.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxrl_pref.logging import read_metrics
from tests.cli_run import main_here as run_main

ROOT = Path(__file__).resolve().parents[1]
# PPO on CartPole at the smallest size: 4 envs x 16 steps, 6 updates
TINY = ["--env", "CartPole-v1", "--num-envs", "4", "--num-steps", "16", "--total-timesteps", "384", "--hidden", "16",
        "--update-epochs", "1", "--num-minibatches", "1", "--log-every", "1"]


def run_module(module: str, *args, timeout: float = 600, probe: bool = False) -> subprocess.CompletedProcess:
    """``python -m <module> args`` from the repository root, as a user runs it (plain progress lines: CI=true; one
    CPU device). ``probe``: the same module run through ``runpy`` (what ``-m`` does), with a hook that prints, as
    the process exits, what the run left in effect: XLA_FLAGS, JAX's default matmul precision and how a matmul
    compiled in that process is lowered (one ``PROBE {json}`` line on stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(CI="true", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", _PROBE, module, *args] if probe else [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


_PROBE = r"""
import atexit, json, os, runpy, sys

def probe():
    import jax, jax.numpy as jnp
    x = jnp.ones((4, 4), jnp.float32)
    print("PROBE " + json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""),
                                 "precision": jax.config.jax_default_matmul_precision,
                                 "hlo": jax.jit(jnp.matmul).lower(x, x).as_text()}), file=sys.stderr, flush=True)

atexit.register(probe)
module = sys.argv.pop(1)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def main_here(monkeypatch, capsys, module: str, *args) -> tuple[int, str, str]:
    """``python -m <module> args`` as ``<module>.main(args)`` in this process (:func:`tests.cli_run.main_here`):
    ``(status, stdout, stderr)``."""
    r = run_main(monkeypatch, capsys, module, *args)
    return r.status, r.out, r.err


def probed(p: subprocess.CompletedProcess) -> dict:
    lines = [line for line in p.stderr.splitlines() if line.startswith("PROBE ")]
    assert len(lines) == 1, p.stderr[-3000:]
    return json.loads(lines[0][len("PROBE "):])


def checkpoints(d: Path) -> list[int]:
    return sorted(int(x.name) for x in d.iterdir() if x.name.isdigit()) if d.is_dir() else []


def updates(run_dir: Path) -> list[tuple[int, int]]:
    """(seed, update) of every row of ``metrics.csv``, in file order."""
    rows = (run_dir / "metrics.csv").read_text().splitlines()[1:]
    return [(int(r.split(",")[0]), int(r.split(",")[1])) for r in rows]


# -- docs/running.md: exit codes, --no-resume ------------------------------------------------------------------------

def test_nan_loss_exits_1_keeping_the_last_good_checkpoint_and_no_resume_starts_over(tmp_path, monkeypatch, capsys):
    """Exit 1 for "training diverged (NaN loss); the last good checkpoint is kept", then what a user does next:
    rerun with a sane learning rate and --no-resume ("start over; the old checkpoints/ and tb/ are moved aside, not
    deleted").

    A learning rate of 1e38 makes Adam's first step put the weights near float32's limit, so a later update's loss
    is NaN; with a checkpoint after every update the run must stop at that update, say so on the console, write the
    metrics up to it and keep the checkpoints of the updates before it (none of the diverged state). With
    --no-resume the old checkpoints and event files are all kept under new names and the new run trains from
    update 1 (not resumed at the old run's last checkpoint). (That a --run-dir with checkpoints needs --resume or
    --no-resume is test_cli.py's test_tiny_run_then_resume.) The diverging run is a process of its own (the exit
    status a shell sees); the rerun is the entry point's main in this process."""
    d = tmp_path / "run"
    p = run_module("experiments.ppo", *TINY, "--learning-rate", "1e38", "--checkpoint-every", "1", "--run-dir", str(d))
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    m = re.search(r"error: (loss/\w+) became NaN at update (\d+) \(seed 0\): training diverged and was stopped; "
                  r"the last good checkpoint is update (\d+) in (\S+); metrics up to there are in (\S+)\. "
                  r"Fix: lower --learning-rate", " ".join(p.stderr.split()))
    assert m, p.stderr[-3000:]
    key, bad, last = m.group(1), int(m.group(2)), int(m.group(3))
    assert 2 <= bad <= 6 and last == bad - 1, m.group(0)  # update 1 trains from the initial parameters: finite
    assert Path(m.group(4)) == d / "checkpoints" and Path(m.group(5)) == d / "metrics.csv"
    kept = checkpoints(d / "checkpoints")
    assert kept and kept[-1] == last and bad not in kept, kept  # the diverged state was not saved
    metrics = read_metrics(d / "metrics.csv")
    assert metrics["update"].tolist() == list(range(1, bad + 1))  # up to the diverged update, nothing after
    assert np.isnan(metrics[key][0, -1]) and np.isfinite(metrics[key][0, :-1]).all(), metrics[key]
    old_events = sorted(x.name for x in (d / "tb").iterdir())
    old_ckpt_files = sorted(str(f.relative_to(d / "checkpoints")) for f in (d / "checkpoints").rglob("*"))
    assert old_events and old_ckpt_files

    sane = [*TINY, "--learning-rate", "3e-4", "--checkpoint-every", "3", "--run-dir", str(d)]
    status, stdout, stderr = main_here(monkeypatch, capsys, "experiments.ppo", *sane, "--no-resume")
    assert status == 0, stderr[-3000:]
    moved = re.search(r"moved the previous run's files aside: (\S+), (\S+?),", stdout)
    assert moved, stdout[-2000:]
    ck_old, tb_old = Path(moved.group(1)), Path(moved.group(2))
    assert ck_old.parent == d and ck_old.name.startswith("checkpoints.old-") and ck_old.is_dir()
    assert tb_old.parent == d and tb_old.name.startswith("tb.old-") and tb_old.is_dir()
    # nothing deleted: the old run's checkpoints and event files, all of them, under their new names
    assert sorted(str(f.relative_to(ck_old)) for f in ck_old.rglob("*")) == old_ckpt_files
    assert sorted(x.name for x in tb_old.iterdir()) == old_events
    # a new run from update 1, not the old one resumed
    assert "resumed" not in stdout and "finished 6 updates" in stdout, stdout[-2000:]
    assert checkpoints(d / "checkpoints") == [3, 6]
    assert list((d / "tb").glob("events.out.tfevents.*")) and sorted(x.name for x in (d / "tb").iterdir()) != old_events
    assert updates(d) == [(0, u) for u in range(1, 7)]
    new = read_metrics(d / "metrics.csv")
    assert all(np.isfinite(new[k]).all() for k in new if k.startswith("loss/")), new
    assert json.loads((d / "config.json").read_text())["config"]["learning_rate"] == 3e-4  # the new run's settings


# -- docs/accelerators.md: --matmul-precision, --deterministic -------------------------------------------------------

def test_matmul_precision_and_deterministic_are_recorded_in_effect_and_read_back_on_resume(tmp_path):
    """--matmul-precision highest: recorded in config.json and set in JAX for the run (a matmul compiled in the run's
    process is lowered at HIGHEST precision). --deterministic: recorded, and --xla_gpu_deterministic_ops=true is in
    XLA_FLAGS before JAX starts (no "came too late" warning). --resume RUN_DIR reads both back from config.json."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((4, 4), jnp.float32)
    assert "HIGHEST" not in jax.jit(jnp.matmul).lower(x, x).as_text()  # what the probe would see without the flag
    d = tmp_path / "run"
    p = run_module("experiments.ppo", *TINY, "--checkpoint-every", "6", "--matmul-precision", "highest",
                   "--deterministic", "--run-dir", str(d), probe=True)
    assert p.returncode == 0, p.stderr[-3000:]
    run = json.loads((d / "config.json").read_text())["run"]
    assert run["matmul_precision"] == "highest" and run["deterministic"] is True, run
    seen = probed(p)
    assert seen["precision"] == "highest" and "precision = [HIGHEST, HIGHEST]" in seen["hlo"], seen
    assert "--xla_gpu_deterministic_ops=true" in seen["xla_flags"].split(), seen
    assert "--deterministic was not set before JAX started" not in p.stderr

    p = run_module("experiments.ppo", "--resume", str(d), probe=True)  # neither flag given again
    assert p.returncode == 0, p.stderr[-3000:]
    assert "nothing to train" in p.stdout, p.stdout[-2000:]
    seen = probed(p)
    assert seen["precision"] == "highest" and "precision = [HIGHEST, HIGHEST]" in seen["hlo"], seen
    assert "--xla_gpu_deterministic_ops=true" in seen["xla_flags"].split(), seen
    assert "--deterministic was not set before JAX started" not in p.stderr
    run = json.loads((d / "config.json").read_text())["run"]
    assert run["matmul_precision"] == "highest" and run["deterministic"] is True, run


# -- docs/oni.md: --allow-unreachable-llm, --motif-holdout -----------------------------------------------------------

ONI_TINY = ["--env", "KeyDoor-5", "--num-envs", "4", "--num-steps", "16", "--total-timesteps", str(4 * 16 * 2),
            "--hidden", "16", "--update-epochs", "1", "--num-minibatches", "1", "--progress", "False",
            "--log-every", "1"]


def _refusing_llm():
    """A bound, not listening socket (connections are refused while it is held), its URL and the LLM flags."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    return sock, url, ["--annotator", "openai", "--llm-base-url", url, "--llm-model", "fake-llm"]


def test_unreachable_llm_stops_the_run_at_start(tmp_path, monkeypatch, capsys):
    """An --llm-base-url that does not answer stops the run before anything is built (exit 2, the URL and the fix
    named, no annotator started, no training). In-process (experiments.oni's main)."""
    sock, url, llm = _refusing_llm()
    try:
        refused = tmp_path / "refused"
        status, _, stderr = main_here(monkeypatch, capsys, "experiments.oni", *ONI_TINY, *llm, "--run-dir",
                                      str(refused))
        assert status == 2, stderr[-3000:]
        err = " ".join(stderr.split())
        assert f"error: the LLM server at {url} does not answer" in err and "--allow-unreachable-llm True" in err, err
        assert "Traceback" not in stderr
        assert not (refused / "annotator.log").exists() and not (refused / "checkpoints").exists()
        assert not (refused / "metrics.csv").exists()
    finally:
        sock.close()


@pytest.mark.slow  # nightly (tests/conftest.py): CI has the service's side in test_annotation.py
def test_unreachable_llm_allowed_starts_anyway_and_trains_to_the_end(tmp_path):
    """--allow-unreachable-llm True starts anyway with a warning and trains to the end, the messages left pending
    (no label arrives)."""
    sock, url, llm = _refusing_llm()
    try:
        allowed = tmp_path / "allowed"
        p = run_module("experiments.oni", *ONI_TINY, *llm, "--allow-unreachable-llm", "True", "--run-dir", str(allowed))
        assert p.returncode == 0, p.stderr[-3000:]
        err = " ".join(p.stderr.split())
        assert f"annotator: WARNING: the LLM server at {url} does not answer" in err and "starting anyway" in err, err
        assert json.loads((allowed / "config.json").read_text())["config"]["allow_unreachable_llm"] is True
        m = read_metrics(allowed / "metrics.csv")
        assert m["update"].tolist() == [1, 2] and checkpoints(allowed / "checkpoints") == [2]
        assert (np.nan_to_num(m["labels/labeled"]) == 0).all(), m["labels/labeled"]  # nobody answered
        assert "annotator summary" in p.stderr and (allowed / "annotator.log").is_file()
    finally:
        sock.close()


def test_motif_holdout_holds_out_that_fraction_of_the_pairs(tmp_path, monkeypatch, capsys):
    """--motif-holdout 0.5: the reward model is trained on half of the answered pairs and measured on the other
    half (the console and model.json say so); the option is recorded in config.json. In-process (experiments.oni's
    main)."""
    mdir, run = tmp_path / "motif", tmp_path / "run"
    status, _, stderr = main_here(monkeypatch, capsys, "experiments.oni", *ONI_TINY, "--method", "motif",
                                  "--annotator", "scripted", "--motif-dir", str(mdir), "--motif-steps", "1000",
                                  "--motif-pairs", "40", "--motif-epochs", "5", "--motif-holdout", "0.5",
                                  "--run-dir", str(run))
    assert status == 0, stderr[-3000:]
    n = len(json.loads((mdir / "pairs.json").read_text())["pairs"])
    info = json.loads((mdir / "model.json").read_text())
    assert n >= 10 and info["n_heldout"] == round(0.5 * n) and info["n_train"] == n - info["n_heldout"], (n, info)
    assert f"training the reward model on {n} pairs (50% held out)" in stderr, stderr[-3000:]
    assert f"({info['n_heldout']} pairs) -> {mdir / 'model.msgpack'}" in stderr
    assert json.loads((run / "config.json").read_text())["config"]["motif_holdout"] == 0.5


# -- README: the main job -------------------------------------------------------------------------------------------

@pytest.mark.slow  # two CLI runs and the embedded annotator (~40-90 s on 2 cores): CI's slow pass
def test_readme_main_job_prints_the_table_and_writes_the_plot(tmp_path):
    """The README's main job (`python -m experiments.sparse_study --tasks keydoor9 --methods ppo motif --num-seeds 8
    --first-seed 0 --out runs/demo`) with 2 seeds, a tiny budget and small PPO sizes: both runs go through their CLIs (Motif with
    the embedded annotator), their outputs land under OUT/keydoor9/, the table is printed (and saved) and
    OUT/keydoor9.png is written."""
    out = tmp_path / "demo"
    small = "--num-envs 8 --num-steps 32 --hidden 16 --update-epochs 1 --num-minibatches 1"
    p = run_module("experiments.sparse_study", "--tasks", "keydoor9", "--methods", "ppo", "motif", "--num-seeds", "2",
                   "--first-seed", "0", "--scale", "0.0026", "--out", str(out), f"--extra-args={small}")  # 780 env steps: 3 updates
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for method, agent in (("ppo", "experiments.ppo"), ("motif", "experiments.oni")):
        run = out / "keydoor9" / method
        assert re.search(rf"^\+ \S+ -m {agent} --env KeyDoor-9 .*--run-dir {re.escape(str(run))}$", p.stdout, re.M), \
            p.stdout[-3000:]
        for f in ("config.json", "metrics.csv", "metrics.jsonl", "done"):
            assert (run / f).is_file(), (method, f)
        assert checkpoints(run / "checkpoints") and list((run / "tb").glob("events.out.tfevents.*"))
        assert sorted(set(updates(run))) == [(s, u) for s in (0, 1) for u in (1, 2, 3)]
    for f in ("dataset.json", "pairs.json", "model.msgpack", "model.json"):
        assert (out / "keydoor9" / "motif-data" / f).is_file(), f
    assert json.loads((out / "keydoor9" / "motif" / "config.json").read_text())["config"]["annotator"] == "embedded"
    table = (out / "results.md").read_text()
    assert table.strip() in p.stdout  # printed at the end
    assert "| task | env | method | budget | success | return | env steps to 50% success | reached |" in table
    rows = [line for line in table.splitlines() if line.startswith("| keydoor9 | KeyDoor-9 |")]  # the main table
    assert [r.split("|")[3].strip() for r in rows] == ["ppo", "motif"], table
    assert all(re.search(r"\| [0-2]/2 \|$", r) for r in rows), table
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"keydoor9/ppo", "keydoor9/motif"} and all(r["seeds"] == 2 for r in results.values())
    png = (out / "keydoor9.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# -- docs/heron.md: margins, normalisation and scale of the learned reward ------------------------------------------

HERON_TINY = ["--env", "Pendulum-v1", "--factors", "angle", "speed", "energy", "--num-envs", "4", "--num-steps", "32",
              "--total-timesteps", str(4 * 32 * 3), "--hidden", "16", "--update-epochs", "1", "--num-minibatches", "1",
              "--segment-len", "4", "--buffer-segments", "64", "--min-segments", "32", "--rm-batch-size", "8",
              "--rm-updates", "2", "--rm-hidden", "16", "--progress", "False", "--log-every", "1"]


def test_heron_margin_normalisation_and_scale_flags(tmp_path, monkeypatch):
    """`python -m experiments.heron` (its main, in-process, so that the reward PPO learns from can be logged next to
    the model's raw output) with the reward-model flags no other test sets:

    * --absolute-margins: the margins are the given values, not multiples of the factors' std;
    * --random-margins --margin-low L --margin-high H: each comparison's margin is margin * U(L, H): with
      L = H = 1000 no pair of these segments is decided (their factor totals differ by far less);
    * --rm-normalize (default True) / --reward-scale S: the reward is S * (r - mean) / std of the running statistics,
      or S * r with --rm-normalize False."""
    from experiments import heron as heron_exp
    from jaxrl_pref.rewards.factors import traj_factors
    from jaxrl_pref.rewards.preference import PreferenceReward
    real = PreferenceReward.__call__

    def logged(self, state, traj):  # the reward PPO learns from, and the model's raw output on the same steps
        r, m = real(self, state, traj)
        raw = self.apply(state.params, traj.obs, traj_factors(self.factor_set, traj))
        return r, {**m, "test/reward_mean": r.mean(), "test/reward_std": r.std(), "test/raw_mean": raw.mean(),
                   "test/raw_std": raw.std()}

    monkeypatch.setattr(PreferenceReward, "__call__", logged)

    a = tmp_path / "absolute"
    assert heron_exp.main([*HERON_TINY, "--absolute-margins", "--margins", "0", "0.5", "0.25", "--reward-scale", "3",
                           "--run-dir", str(a)]) == 0
    cfg = json.loads((a / "config.json").read_text())["config"]
    assert (cfg["absolute_margins"], cfg["margins"], cfg["reward_scale"], cfg["rm_normalize"]) == \
        (True, [0.0, 0.5, 0.25], 3.0, True)
    m = {k: np.asarray(v, np.float64)[0] for k, v in read_metrics(a / "metrics.csv").items() if k != "update"}
    np.testing.assert_array_equal(m["reward/heron_margin_angle"], 0.0)
    np.testing.assert_array_equal(m["reward/heron_margin_speed"], np.float32(0.5))
    np.testing.assert_array_equal(m["reward/heron_margin_energy"], np.float32(0.25))
    assert (m["reward/heron_decided"] > 0.5).all(), m["reward/heron_decided"]  # angle's margin 0 decides most pairs
    std = np.sqrt(m["reward/heron_norm_std"] ** 2 + 1e-8)
    assert (np.abs(m["reward/heron_norm_mean"]) > 1e-3).any() and (np.abs(std - 1) > 1e-3).any()  # not a no-op
    np.testing.assert_allclose(m["test/reward_mean"], 3 * (m["test/raw_mean"] - m["reward/heron_norm_mean"]) / std,
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(m["test/reward_std"], 3 * m["test/raw_std"] / std, rtol=1e-3)

    r = tmp_path / "random"
    assert heron_exp.main([*HERON_TINY, "--absolute-margins", "--margins", "1", "1", "1", "--random-margins",
                           "--margin-low", "1000", "--margin-high", "1000", "--rm-normalize", "False",
                           "--reward-scale", "2", "--run-dir", str(r)]) == 0
    cfg = json.loads((r / "config.json").read_text())["config"]
    assert (cfg["random_margins"], cfg["margin_low"], cfg["margin_high"], cfg["rm_normalize"], cfg["reward_scale"]) == \
        (True, 1000.0, 1000.0, False, 2.0)
    m = {k: np.asarray(v, np.float64)[0] for k, v in read_metrics(r / "metrics.csv").items() if k != "update"}
    np.testing.assert_array_equal(m["reward/heron_margin_speed"], 1.0)  # the margins before the random factor
    np.testing.assert_array_equal(m["reward/heron_decided"], 0.0)  # every margin 1 * U(1000, 1000): nothing decided
    assert (m["test/raw_std"] > 0).all()
    np.testing.assert_allclose(m["test/reward_mean"], 2 * m["test/raw_mean"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["test/reward_std"], 2 * m["test/raw_std"], rtol=1e-5)


# -- docs/exploration.md: --bonus-learning-rate ----------------------------------------------------------------------

def test_bonus_learning_rate_is_the_rnd_predictors_step(tmp_path):
    """`python -m experiments.ppo --bonus rnd --bonus-learning-rate LR` (its main, in-process): the option is saved,
    and it is the step of the predictor's Adam update. The first update of two runs differing only in it sees the
    same rollout and the same predictor, so their prediction error before the update (rnd/loss) is equal; after
    one Adam step of about LR per weight the error (rnd/error, same observations) drops much further at 3e-2 than at
    the default 1e-4."""
    from experiments import ppo as ppo_exp
    args = ["--env", "DeepSea-8", "--num-envs", "8", "--num-steps", "16", "--total-timesteps", str(8 * 16 * 2),
            "--update-epochs", "1", "--num-minibatches", "1", "--hidden", "16", "--bonus", "rnd",
            "--bonus-hidden", "16", "--bonus-features", "8", "--progress", "False", "--log-every", "1"]
    default, fast = tmp_path / "default", tmp_path / "fast"
    assert ppo_exp.main([*args, "--run-dir", str(default)]) == 0
    assert ppo_exp.main([*args, "--bonus-learning-rate", "3e-2", "--run-dir", str(fast)]) == 0
    assert "bonus_learning_rate" not in json.loads((default / "config.json").read_text())["config"]  # saved when set
    assert json.loads((fast / "config.json").read_text())["config"]["bonus_learning_rate"] == 0.03
    d, f = read_metrics(default / "metrics.csv"), read_metrics(fast / "metrics.csv")
    loss, err_default, err_fast = d["rnd/loss"][0, 0], d["rnd/error"][0, 0], f["rnd/error"][0, 0]
    assert f["rnd/loss"][0, 0] == loss > 0
    drop_default, drop_fast = (loss - err_default) / loss, (loss - err_fast) / loss
    assert abs(drop_default) < 0.02 and drop_fast > 0.1, (loss, err_default, err_fast)
