"""Experiment runner, checkpoints and logging: exact resume, corrupt checkpoints, NaN stop, output files."""
from __future__ import annotations

import glob
import io
import json
import math
import os
import shutil
import signal
import struct
import warnings
from pathlib import Path

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()  # before gymnax creates the CPU backend (jax#25861)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from agents import ppo  # noqa: E402
from jaxrl_pref.checkpoint import Checkpointer, CheckpointError, IncompatibleCheckpointError  # noqa: E402
from jaxrl_pref.config import ConfigError  # noqa: E402
from jaxrl_pref.logging import Logger, plot_learning_curve, read_metrics, write_metrics  # noqa: E402
from jaxrl_pref.runner import DivergenceError, chunk_bounds, run_experiment  # noqa: E402

# 7 updates of 64 env steps, 2 vmapped seeds, chunks of 3 -> chunks (0,3) (3,6) (6,7): a remainder chunk too
CFG = ppo.Config(env_name="CartPole-v1", num_envs=4, num_steps=16, total_timesteps=7 * 64, hidden=(16, 16),
                 update_epochs=2, num_minibatches=2)
RUN = dict(num_seeds=2, seed=3, log_every=1, checkpoint_every=3, progress=False, agent="ppo")


def bits(tree):
    """Leaves as raw bytes + dtype + shape: equality means bitwise equality (NaN included)."""
    return [(np.asarray(x).dtype.str, np.shape(x), np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


def assert_same_run(a, b):
    assert jax.tree.structure(a.state) == jax.tree.structure(b.state)
    assert bits(a.state) == bits(b.state)
    assert sorted(a.metrics) == sorted(b.metrics)
    assert bits(a.metrics) == bits(b.metrics)


def event_tags(run_dir) -> dict:
    """Scalar tags -> steps, read from the tensorboard event files (TFRecord framing, tensorboardX protos)."""
    from tensorboardX.proto import event_pb2
    tags: dict = {}
    for f in sorted(glob.glob(str(Path(run_dir) / "tb" / "events.out.tfevents.*"))):
        data, i = Path(f).read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                tags.setdefault(v.tag, []).append(ev.step)
    return tags


def kill_at(update: int, how: str):
    """make_trainer whose log_fn simulates a kill when ``update`` is reached: SIGTERM to this process, or a crash
    (an exception inside the compiled chunk, as a dying job would lose it)."""
    def make_trainer(cfg, log_fn=None, log_every=1, **kw):
        fired = []

        def log(step, metrics):
            if int(step) == update and not fired:
                fired.append(1)
                if how == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    raise RuntimeError("simulated crash")
            if log_fn is not None:  # the runner passes none for vmapped seeds (it logs from the chunk's outputs)
                log_fn(step, metrics)
        return ppo.make_trainer(cfg, log_fn=log, log_every=log_every, **kw)
    return make_trainer


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baseline")
    return run_experiment(ppo.make_trainer, CFG, run_dir=run_dir, **RUN)


def test_chunk_bounds():
    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_bounds(6, 3) == [(0, 3), (3, 6)]
    assert chunk_bounds(2, 100) == [(0, 2)]


def test_outputs_exist(baseline):
    r, d = baseline, baseline.run_dir
    assert r.finished and r.updates_done == 7 and r.interrupted is None
    assert {k: v.shape for k, v in r.metrics.items()}["loss/value"] == (2, 7)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["config"]["num_envs"] == 4 and cfg["run"]["num_seeds"] == 2 and cfg["agent"] == "ppo"
    # tensorboard: the seed-mean of every metric, at env-step x values, every update (log_every=1)
    tags = event_tags(d)
    for k in ("loss/value", "loss/policy", "episodes", "perf/env_steps_per_sec"):
        assert k in tags, sorted(tags)
    assert sorted(set(tags["loss/value"])) == [64 * u for u in range(1, 8)]
    # metrics files round-trip bit for bit
    for name in ("metrics.csv", "metrics.jsonl"):
        back = read_metrics(d / name)
        assert back["update"].tolist() == list(range(1, 8))
        assert back["env_steps"].tolist() == [64 * u for u in range(1, 8)]
        for k, v in r.metrics.items():
            np.testing.assert_array_equal(back[k], v)
            assert back[k].tobytes() == v.astype(np.float32).tobytes()
    assert len((d / "metrics.csv").read_text().splitlines()) == 1 + 2 * 7
    assert (d / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ck = Checkpointer(d / "checkpoints")
    assert ck.all_steps() == [3, 6, 7]  # one per chunk
    ck.close()


@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
def test_resume_after_sigterm_and_crash_is_bitwise_exact(baseline, tmp_path):
    d = tmp_path / "run"
    # 1) SIGTERM during the first chunk: the chunk is finished, saved, and the run stops cleanly
    r1 = run_experiment(kill_at(2, "sigterm"), CFG, run_dir=d, **RUN)
    assert r1.interrupted == signal.SIGTERM and r1.updates_done == 3 and not r1.finished
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    # 2) resumed, then killed hard in the middle of the second chunk: its work is lost, checkpoint 3 stays
    with pytest.raises(Exception, match="simulated crash"):
        run_experiment(kill_at(5, "crash"), CFG, run_dir=d, resume=True, **RUN)
    ck = Checkpointer(d / "checkpoints")
    assert ck.latest_step() == 3
    ck.close()
    # 3) resumed again to the end: identical to the uninterrupted run, parameters, PRNG keys and metrics
    r3 = run_experiment(ppo.make_trainer, CFG, run_dir=d, resume=True, **RUN)
    assert r3.resumed_from == 3 and r3.finished
    assert_same_run(r3, baseline)
    assert read_metrics(d / "metrics.csv")["loss/value"].tobytes() == baseline.metrics["loss/value"].tobytes()
    # a finished run resumes to itself without training
    r4 = run_experiment(ppo.make_trainer, CFG, run_dir=d, resume=True, **RUN)
    assert r4.resumed_from == 7 and r4.train_s == 0.0
    assert_same_run(r4, baseline)


def test_sigterm_while_the_last_save_finishes_keeps_it(baseline, tmp_path, monkeypatch):
    """A SIGTERM that arrives after the last chunk, while its checkpoint is still being written (a Slurm requeue
    as the run ends), is caught: the save completes and the run reports itself finished."""
    class Killed(Exception):
        pass

    def outside_handler(signum, frame):  # what would run if the runner's handler were not in place
        raise Killed

    wait, save = Checkpointer.wait, Checkpointer.save
    saved, sent = [], []

    def save_recorded(self, step, *args, **kwargs):  # recorded once started: save() itself waits first
        out = save(self, step, *args, **kwargs)
        saved.append(step)
        return out

    def wait_after_sigterm(self):  # the signal lands while the last chunk's checkpoint is in flight
        if saved and saved[-1] == 7 and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return wait(self)

    monkeypatch.setattr(Checkpointer, "save", save_recorded)
    monkeypatch.setattr(Checkpointer, "wait", wait_after_sigterm)
    old = signal.signal(signal.SIGTERM, outside_handler)
    try:
        r = run_experiment(ppo.make_trainer, CFG, run_dir=tmp_path / "run", **RUN)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert sent and r.finished and r.updates_done == 7
    ck = Checkpointer(tmp_path / "run" / "checkpoints")
    assert ck.latest_step() == 7
    ck.close()


def test_resume_from_corrupt_latest_falls_back(baseline, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(baseline.run_dir, d)
    for f in (d / "checkpoints" / "7" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * f.stat().st_size)  # same size, different content: only the checksum sees it
    with pytest.warns(RuntimeWarning, match=r"checkpoints/7.*damaged"):
        r = run_experiment(ppo.make_trainer, CFG, run_dir=d, resume=True, **RUN)
    assert r.resumed_from == 6 and r.finished
    assert_same_run(r, baseline)


def test_resume_policy_and_mismatch(baseline, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(baseline.run_dir, d)
    with pytest.raises(ConfigError, match="--resume") as e:  # existing checkpoints, no decision given
        run_experiment(ppo.make_trainer, CFG, run_dir=d, **RUN)
    assert e.value.field == "resume"
    other = ppo.Config(**{**CFG.__dict__, "learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"learning_rate: 0.00025 in the checkpoint, 0.001 now"):
        run_experiment(ppo.make_trainer, other, run_dir=d, resume=True, **RUN)
    with pytest.raises(ConfigError, match="num_seeds"):
        run_experiment(ppo.make_trainer, CFG, run_dir=d, resume=True, **{**RUN, "num_seeds": 3})
    # --no-resume: old checkpoints/tb are moved aside, nothing deleted
    r = run_experiment(ppo.make_trainer, CFG, run_dir=d, resume=False, stop_after=0, **RUN)
    assert r.updates_done == 0
    assert len(list(d.glob("checkpoints.old-*"))) == 1 and len(list(d.glob("tb.old-*"))) == 1


class NaNAfter:
    """Wraps a trainer so its loss metrics turn NaN after update ``n`` (as a diverging run would)."""

    def __init__(self, n, **kw):
        self.inner, self.n = ppo.make_trainer(CFG, **kw), n

    def init(self, key, hp=None):
        return self.inner.init(key, hp)

    def run(self, rs, hp, num_updates):
        rs2, m = self.inner.run(rs, hp, num_updates)
        steps = rs.update_step + 1 + jnp.arange(num_updates)
        m = {k: (jnp.where(steps > self.n, jnp.nan, v) if k.startswith("loss/") else v) for k, v in m.items()}
        return rs2, m


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    d = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"loss/\w+ became NaN at update 5 \(seed 0\).*last good checkpoint "
                                              r"is update 3"):
        run_experiment(lambda cfg, **kw: NaNAfter(4, **kw), CFG, run_dir=d, **{**RUN, "num_seeds": 1})
    ck = Checkpointer(d / "checkpoints")
    assert ck.all_steps() == [3]
    ck.close()
    m = read_metrics(d / "metrics.csv")  # the diverged chunk is kept for diagnosis
    assert np.isnan(m["loss/value"][0, 4]) and not np.isnan(m["loss/value"][0, :4]).any()


# -- checkpoint unit tests (no compilation) ------------------------------------------------------------------
def _tree(i):
    return {"key": jax.random.PRNGKey(i), "step": jnp.int32(i), "w": jnp.full((3, 2), i, jnp.float32),
            "nested": ({"b": jnp.arange(4, dtype=jnp.uint8) + i}, ()), "host": np.float64(i) * np.ones(2)}


def test_checkpoint_exact_roundtrip_and_rotation(tmp_path):
    with Checkpointer(tmp_path / "ck", max_to_keep=2) as ck:
        for s in (1, 2, 3):
            ck.save(s, _tree(s), extra_json={"config": {"hidden": (64, 64)}, "nan": float("nan")},
                    history={"r": np.arange(s, dtype=np.float32)})
        ck.wait()
        assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
        r = ck.restore(target=_tree(0))
        assert r.step == 3 and r.extra["config"] == {"hidden": [64, 64]} and math.isnan(r.extra["nan"])
        assert jax.tree.structure(r.state) == jax.tree.structure(_tree(0))
        assert bits(r.state) == bits(_tree(3))
        assert r.state["key"].dtype == jnp.uint32 and r.state["step"].dtype == jnp.int32
        assert isinstance(r.state["w"], jax.Array) and isinstance(r.state["host"], np.ndarray)
        assert r.history["r"].tolist() == [0, 1, 2]
        assert bits(ck.restore(2, target=_tree(0)).state) == bits(_tree(2))


def test_checkpoint_typed_keys(tmp_path):
    tree = {"k": jax.random.key(7), "x": jnp.ones(2)}
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, tree)
        ck.wait()
        r = ck.restore(target={"k": jax.random.key(0), "x": jnp.zeros(2)})
    assert jax.dtypes.issubdtype(r.state["k"].dtype, jax.dtypes.prng_key)
    assert (jax.random.key_data(r.state["k"]) == jax.random.key_data(tree["k"])).all()


def _damage(step_dir: Path, keep_manifest=True):
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(b"x" * 3)
    if not keep_manifest:
        (step_dir / "jaxrl_pref_manifest.json").unlink()


@pytest.mark.parametrize("keep_manifest", [True, False])
def test_corrupt_checkpoint_falls_back_then_errors(tmp_path, keep_manifest):
    d = tmp_path / "ck"
    with Checkpointer(d) as ck:
        for s in (1, 2):
            ck.save(s, _tree(s))
        ck.wait()
        _damage(d / "2", keep_manifest)
        with pytest.warns(RuntimeWarning, match=r"(?s)ck/2.*damaged.*falling back"):
            r = ck.restore(target=_tree(0))
        assert r.step == 1 and bits(r.state) == bits(_tree(1))
        with pytest.raises(CheckpointError, match=r"(?s)ck/2.*damaged.*Fix: delete .*ck/2.*--no-resume"):
            ck.restore(2, target=_tree(0))  # an explicit step does not fall back
        _damage(d / "1", keep_manifest)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(CheckpointError, match=r"(?s)none of the checkpoints \[1, 2\].*--no-resume"):
                ck.restore(target=_tree(0))


def test_incompatible_checkpoint_is_a_clear_error(tmp_path):
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, _tree(1))
        ck.wait()
        other = {**_tree(0), "w": jnp.zeros((4, 2))}
        with pytest.raises(IncompatibleCheckpointError, match=r"\['w'\] is float32\[3, 2\] in the checkpoint but "
                                                              r"float32\[4, 2\]"):
            ck.restore(target=other)


# -- logger unit tests ---------------------------------------------------------------------------------------
def test_logger_aggregates_seed_calls_in_any_order(tmp_path):
    out = io.StringIO()
    lg = Logger(tmp_path, num_seeds=3, steps_per_update=10, log_every=2, total_updates=4, progress=True,
                stream=out, print_every_s=0.0)
    rng = np.random.default_rng(0)
    for step in (1, 2, 3, 4):
        order = rng.permutation(3)
        for s in order:  # per-seed calls as vmap delivers them, shuffled; seed 2 never finishes an episode
            lg(np.int32(step), {"episode_return": np.float32(np.nan if s == 2 else 10 * s + step),
                                "loss/value": np.float32(s)})
    # all seeds at once (leading seed axis) is accepted too
    lg(np.array([6, 6, 6]), {"episode_return": np.array([1.0, 2.0, np.nan]), "loss/value": np.zeros(3)})
    lg.close()
    assert [h["update"] for h in lg.history] == [2, 4, 6]
    assert lg.history[0]["episode_return"] == pytest.approx((2 + 12) / 2)  # NaN seed left out
    assert lg.history[1]["loss/value"] == pytest.approx(1.0)
    assert lg.history[2]["episode_return"] == pytest.approx(1.5)
    text = out.getvalue()  # not a terminal: plain lines
    assert "update 2/4 | env steps 20" in text and "update 4/4" in text and "\x1b[" not in text
    tags = event_tags(tmp_path)
    assert sorted(set(tags["episode_return"])) == [20, 40, 60]


def test_metrics_files_and_plot_handle_nan(tmp_path):
    m = {"episode_return": np.array([[np.nan, 1.0, np.nan, 3.0], [np.nan, np.nan, 2.0, 5.0]], np.float32),
         "loss/value": np.ones((2, 4), np.float32)}
    write_metrics(tmp_path, m, steps_per_update=8)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"seed": 0, "update": 1, "env_steps": 8, "episode_return": None, "loss/value": 1.0}
    back = read_metrics(tmp_path / "metrics.csv")
    np.testing.assert_array_equal(back["episode_return"], m["episode_return"])
    png = plot_learning_curve(m, tmp_path / "curve.png", steps_per_update=8)
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert plot_learning_curve({"episode_return": np.full((2, 3), np.nan)}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
def test_vmapped_seeds_log_from_chunk_outputs_without_callbacks(tmp_path, monkeypatch):
    """Under vmap a callback in the scan would run once per seed on every update; the runner gives a vmapped trainer
    no log_fn and logs every log_every-th update from the chunk's outputs instead (tensorboard, progress). One seed
    keeps the in-jit callback, called once per log_every updates."""
    import jax.debug
    calls = []
    real = jax.debug.callback
    monkeypatch.setattr(jax.debug, "callback", lambda fn, *a, **k: (calls.append(1), real(fn, *a, **k))[1])
    given = []

    def make_trainer(cfg, log_fn=None, log_every=1, **kw):
        given.append(log_fn)
        return ppo.make_trainer(cfg, log_fn=log_fn, log_every=log_every, **kw)
    r = run_experiment(make_trainer, CFG, run_dir=tmp_path / "v", **{**RUN, "log_every": 2})
    assert given == [None] and calls == []  # no callback traced into the vmapped program
    assert sorted(set(event_tags(r.run_dir)["loss/value"])) == [64 * u for u in (2, 4, 6)]
    counted = []
    monkeypatch.setattr("jaxrl_pref.logging.Logger._write_update",
                        lambda self, step, rows, rate=None: counted.append((step, len(rows))))
    run_experiment(make_trainer, CFG, run_dir=tmp_path / "one", **{**RUN, "num_seeds": 1, "log_every": 2})
    assert given[-1] is not None and calls  # traced once into the scan body
    assert counted == [(2, 1), (4, 1), (6, 1)]  # one host call per log_every updates, one seed each


def test_concat_metrics_pads_missing_keys_and_hook_metrics_land_on_the_last_update():
    """A metric first reported mid-run (an annotator that connects late) or missing from a chunk is NaN there, so
    every metric keeps one column per update; a chunk hook's metrics() sit at its chunk's last update, per seed."""
    from jaxrl_pref.runner import concat_metrics, hook_metrics
    a = {"r": np.ones((2, 3), np.float32)}
    b = {"r": np.full((2, 2), 2.0, np.float32), "late": np.full((2, 2), 5.0, np.float32)}
    h = concat_metrics(a, b)
    np.testing.assert_array_equal(h["r"], [[1, 1, 1, 2, 2]] * 2)
    np.testing.assert_array_equal(h["late"], [[np.nan] * 3 + [5, 5]] * 2)
    h = concat_metrics(h, {"r": np.zeros((2, 1), np.float32)})
    assert {k: v.shape for k, v in h.items()} == {"r": (2, 6), "late": (2, 6)} and np.isnan(h["late"][:, -1]).all()

    class Hook:
        def metrics(self):
            return {"annotator/connected": 1.0}
    host = hook_metrics(Hook(), b)
    np.testing.assert_array_equal(host["annotator/connected"], [[np.nan, 1.0]] * 2)
    h2 = concat_metrics(concat_metrics(a, b), host, overwrite_last=2)
    np.testing.assert_array_equal(h2["annotator/connected"], [[np.nan] * 4 + [1.0]] * 2)
    np.testing.assert_array_equal(h2["r"], [[1, 1, 1, 2, 2]] * 2)  # the chunk's own metrics kept
    assert hook_metrics(object(), b) == {}
