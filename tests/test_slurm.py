"""Sweeps: expansion, job script, report -- and end to end on a real single-node Slurm started by a fixture.

The ``slurm`` fixture (session scope) starts ``munged``, ``slurmctld`` and ``slurmd`` with a generated
``slurm.conf`` in a temporary directory (node = this host on 127.0.0.1, ports on localhost, proctrack/linuxproc,
select/cons_tres), points the Slurm clients at it through ``SLURM_CONF``, and stops the daemons it started by pid.
It installs ``slurm-wlm`` and ``munge`` with apt-get when they are missing and we are root (``.ci/run`` does that
up front); otherwise the real-Slurm tests are skipped with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrl_pref.config import ConfigError
from jaxrl_pref.logging import write_metrics
from slurm import report, submit, sweep as sw

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# -- expansion, script, report (no Slurm) ----------------------------------------------------------------------------
def _sweep(**over):
    raw = {"experiment": "ppo", "name": "t", "fixed": {"env_name": "CartPole-v1", "total-timesteps": 2048},
           "grid": {"learning_rate": [1e-3, 3e-3], "ent_coef": [0.0, 0.01]}, "seeds": 3}
    raw.update(over)
    return sw.from_dict(raw)


def test_expand_one_task_per_point_and_seed():
    pts, tasks = sw.expand(_sweep())
    assert [p.params for p in pts] == [{"learning_rate": 1e-3, "ent_coef": 0.0}, {"learning_rate": 1e-3, "ent_coef": 0.01},
                                       {"learning_rate": 3e-3, "ent_coef": 0.0}, {"learning_rate": 3e-3, "ent_coef": 0.01}]
    assert len(tasks) == 12 and [t.index for t in tasks] == list(range(12))
    t = tasks[5]  # point 1, seed 2
    assert t.members == [{"point": 1, "seed": 2, "row": 0}]
    assert "--learning-rate=0.001" in t.args and "--ent-coef=0.01" in t.args and "--total-timesteps=2048" in t.args
    assert t.args[-4:] == ["--seed", "2", "--num-seeds", "1"]
    assert len({t.run_dir for t in tasks}) == 12


def test_expand_vmapped_seeds_and_hparams():
    _, tasks = sw.expand(_sweep(vmap_seeds=True))
    assert len(tasks) == 4 and all(len(t.members) == 3 for t in tasks)
    assert tasks[0].args[-4:] == ["--seed", "0", "--num-seeds", "3"]
    _, tasks = sw.expand(_sweep(vmap_seeds=True, vmap_hparams=["learning_rate"], zip=[{"num_envs": 4}, {"num_envs": 8}]))
    # groups: (ent_coef, num_envs) -> 4 tasks, each 2 learning rates x 3 seeds = 6 members
    assert len(tasks) == 4 and all(len(t.members) == 6 for t in tasks)
    hp = json.loads(tasks[0].args[tasks[0].args.index("--hp-values") + 1])
    assert hp == {"learning_rate": [1e-3] * 3 + [3e-3] * 3}
    assert [m["row"] for m in tasks[0].members] == list(range(6))
    assert "--learning-rate" not in " ".join(tasks[0].args)


@pytest.mark.parametrize("over, field", [
    ({"grid": {"learning_rate": 0.1}}, "grid.learning_rate"),
    ({"seeds": 0}, "seeds"),
    ({"fixed": {"seed": 3}}, "seed"),
    ({"vmap_hparams": ["learning_rate"]}, "vmap_hparams"),
    ({"vmap_seeds": True, "seeds": [0, 2]}, "seeds"),
    ({"slurm": {"time": "soon"}}, "slurm.time"),
    ({"slurm": {"gpu": 1}}, "slurm.gpu"),
    ({"bogus": 1}, "bogus"),
    ({"fixed": {"ent_coef": 0.1}}, "ent_coef"),
])
def test_sweep_file_errors_name_the_field(over, field):
    with pytest.raises(ConfigError) as e:
        _sweep(**over)
    assert e.value.field == field and "Fix:" in str(e.value)


def test_array_spec():
    assert sw.array_spec(range(8), 4) == "0-7%4"
    assert sw.array_spec([1, 2, 3, 7, 9, 10], None) == "1-3,7,9-10"
    assert submit.parse_indices("1,3-5") == [1, 3, 4, 5]


def test_dry_run_prints_script_and_writes_nothing(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("experiment: ppo\nname: dry\nfixed: {env_name: CartPole-v1}\ngrid: {learning_rate: [0.001, 0.01]}\n"
                 "seeds: 2\nslurm: {partition: gpu, time: '02:00:00', gpus_per_task: 1, cpus_per_task: 4, throttle: 3, "
                 "mem: 8G, extra: ['--qos=low'], setup: ['module load cuda']}\n")
    assert submit.main([str(f), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=8G", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --qos=low", "module load cuda", "-m slurm.task"):
        assert line in out, line
    assert out.count("-m experiments.ppo") == 4 and "--resume" in out
    assert not (tmp_path / "out").exists()


# -- checked before submission (issue 33): every task's command through the experiment's own parser ------------------
def _one_error_line(err: str) -> str:
    """stderr holds exactly one line, ``error: ...``, and no traceback; returns it."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("fixed, grid, experiment, words", [
    ({}, {}, "pop", ["experiment: there is no experiment 'pop' (did you mean ppo?)", "Fix: use one of", "ppo, "]),
    ({"env_name": "CartPol-v1"}, {"learning_rate": [1e-3, 3e-3]}, "ppo",
     ["tasks 0-3 (", "seeds 0-1): env_name: unknown environment 'CartPol-v1'", "Fix: ", "CartPole-v1"]),
    ({"totl_timesteps": 2048}, {}, "ppo",
     ["tasks 0-1 (seeds 0-1): unrecognized option --totl-timesteps=2048", "Fix: did you mean --total-timesteps?"]),
    ({}, {"learning_rate": [1e-3, "abc"]}, "ppo",
     ["tasks 2-3 (learning_rate=abc, seeds 0-1): learning_rate: could not convert string to float: 'abc'",
      "Fix: pass --learning-rate FLOAT"]),
], ids=["unknown-experiment", "env-typo", "unknown-option", "bad-value"])
def test_bad_task_commands_fail_before_anything_is_written(tmp_path, capsys, fixed, grid, experiment, words):
    """``python -m slurm.submit SWEEP --dry-run`` (and a plain submit, ``--local``) parses every task's command with the
    experiment's parser first: a bad experiment, env id, option or value is one ``error:`` line naming the tasks
    (grid point, seeds), the problem and the fix; exit 2; nothing written, nothing printed as if it would run."""
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"experiment": experiment, "name": "bad", "seeds": 2, "grid": grid,
                             "fixed": {"env_name": "CartPole-v1", "total_timesteps": 2048, **fixed}}))
    out = tmp_path / "out"
    for mode in (["--dry-run"], ["--local"], []):
        assert submit.main([str(f), "--out", str(out), *mode]) == 2, mode
        got = capsys.readouterr()
        line = _one_error_line(got.err)
        for w in words:
            assert w in line, (w, line)
        assert len(line) < 400, line  # one readable line (no list of every env or option)
        assert got.out == "" and not out.exists(), (mode, got.out)


def test_a_valid_sweep_is_checked_and_dry_runs(tmp_path, capsys):
    """The README's example sweeps pass: each of cartpole_lr's 30 commands is parsed (milliseconds each, after the
    import of experiments.ppo), the vmapped one's single task with its --hp-values too."""
    for name, n in (("cartpole_lr", 30), ("cartpole_vmapped", 1)):
        out = tmp_path / name
        assert submit.main([str(REPO / "slurm" / "examples" / f"{name}.yaml"), "--dry-run", "--out", str(out)]) == 0
        got = capsys.readouterr()
        assert "every task's command passes experiments.ppo's checks" in got.out and got.err == "", got
        assert got.out.count("-m experiments.ppo") == n and not out.exists()


def test_device_checks_are_left_to_the_node(tmp_path, capsys):
    """``--num-devices`` is checked against the devices of the node the task runs on, not of this one: a note."""
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"experiment": "ppo", "name": "gpus", "fixed": {"num_devices": 64, "num_envs": 64}}))
    assert submit.main([str(f), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "note: task 0 (seed 0): num_devices: asked for 64 devices" in out and "[0] " in out


def _cli(*args, **kw):
    return subprocess.run([PY, "-m", "slurm.submit", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kw)


def test_malformed_sweep_file_is_one_line(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("experiment: ppo\nfixed: {env_name: CartPole-v1\ngrid: {learning_rate: [0.001]}\n")
    r = _cli(f, "--dry-run", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stdout == ""
    line = _one_error_line(r.stderr)
    assert line.startswith(f"error: sweep file {f}: line 3, column 5: expected ',' or '}}'"), line
    assert "line 2, column 8" in line and "Fix:" in line  # where the unclosed mapping starts
    f = tmp_path / "s.json"
    f.write_text('{"experiment": "ppo",\n "seeds": 2,,}')
    r = _cli(f, "--dry-run")
    assert r.returncode == 2 and _one_error_line(r.stderr).startswith(f"error: sweep file {f}: line 2, column 13: ")


def test_rerun_bad_task_syntax_or_dir_is_one_line(tmp_path):
    _fake_sweep(tmp_path / "sweep")
    for tasks in ("x-3", "5-3", "1,,-2"):
        r = _cli("--rerun", tmp_path / "sweep", "--tasks", tasks)
        assert r.returncode == 2, r.stderr
        line = _one_error_line(r.stderr)
        assert line.startswith("error: --tasks: ") and "e.g. --tasks 3,7-9" in line, line
    r = _cli("--rerun", tmp_path, "--tasks", "1")
    assert r.returncode == 2 and "has no manifest.json" in _one_error_line(r.stderr)


def test_local_sweep_with_a_failing_task_exits_1_naming_it(tmp_path):
    """A task that passes every check but fails when it runs: ``--local`` runs the others and exits 1 naming it."""
    (tmp_path / "failexp").mkdir()
    (tmp_path / "failexp" / "__init__.py").write_text("")
    (tmp_path / "failexp" / "run.py").write_text(
        "import sys\nargs = sys.argv[1:]\nsys.exit(3 if args[args.index('--seed') + 1] == '1' else 0)\n")
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"experiment": "failexp.run", "name": "f", "fixed": {"total_timesteps": 64}, "seeds": 3,
                             "python": PY}))
    out = tmp_path / "out"
    r = _cli(f, "--local", "--out", out, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert _one_error_line(r.stderr).startswith("error: 1 of 3 task(s) failed: 1 ")
    assert "slurm.task 2: done" in r.stdout  # the others ran
    states = [json.loads((out / t["run_dir"] / "status.json").read_text())["state"]
              for t in sw.read_manifest(out)["tasks"]]
    assert states == ["done", "failed", "done"]


def _fake_sweep(tmp_path, broken=()):
    """A 2-point x 3-seed sweep whose runs are written directly (no training): return = 10 * point + seed."""
    s = _sweep(grid={"learning_rate": [1e-3, 3e-3]})
    pts, tasks = sw.expand(s)
    sw.write_manifest(tmp_path, s, pts, tasks, {"python": PY})
    for t in tasks:
        if t.index in broken:
            continue
        run = tmp_path / t.run_dir
        (m,) = t.members
        ret = np.full((1, 10), np.nan, np.float32)
        ret[0, 1::2] = 10 * m["point"] + m["seed"]
        write_metrics(run, {"episode_return": ret, "loss": np.zeros((1, 10), np.float32)}, 100)
        (run / "config.json").write_text(json.dumps({"run": {"num_updates": 10}}))
        (run / "status.json").write_text(json.dumps({"state": "done", "exit_code": 0}))
    return pts, tasks


def test_report_table_ci_plots_and_missing(tmp_path):
    _fake_sweep(tmp_path, broken=(4,))
    data = report.write_report(tmp_path)
    rows = {r["point"]: r for r in data["rows"]}
    assert rows[0]["n"] == 3 and rows[0]["mean"] == pytest.approx(1.0)      # seeds 0, 1, 2
    # 95% CI of {0, 1, 2}: t(0.975, 2) * 1 / sqrt(3)
    assert rows[0]["ci95"] == pytest.approx(4.302652729911275 / 3 ** 0.5, rel=1e-6)
    assert rows[1]["n"] == 2 and rows[1]["mean"] == pytest.approx(11.0)     # task 4 (point 1, seed 1) missing
    assert data["failed"] == [4]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "task 4" in md and f"--rerun {tmp_path.resolve()} --tasks 4" in md
    for f in ("learning_curves.png", "final_vs_learning_rate.png", "summary.csv"):
        assert (tmp_path / "report" / f).stat().st_size > 0
    assert report.main([str(tmp_path), "--no-plots"]) == 3


# -- real Slurm ------------------------------------------------------------------------------------------------------
# -- slurm.task signals and --rerun, with stand-in sbatch/scontrol and a stand-in experiment (no Slurm needed) ------
TOOL = """#!{py}
import json, os, sys
with open({calls!r}, "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
if os.path.basename(sys.argv[0]) == "sbatch":
    print(100 + sum(1 for _ in open({calls!r})))
"""

# the experiment a task runs (`python -m fakeexp.run ... --run-dir D --resume --progress False`): it records its
# arguments, then either finishes (FAKE_EXP=finish) or blocks its stop signals, says it is ready and waits for one
# (nothing is lost between the two), writes which one came and exits as a run stopped by it does (128 + signal)
FAKE_EXP = """import json, os, signal, sys
from pathlib import Path
args = sys.argv[1:]
run = Path(args[args.index("--run-dir") + 1])
run.mkdir(parents=True, exist_ok=True)
with open(run / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_EXP") == "finish":
    sys.exit(0)
sigs = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
(run / "ready").write_text(str(os.getpid()))
got = signal.sigwait(sigs)
(run / "signal").write_text(signal.Signals(got).name)
sys.exit(128 + got)
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sbatch`` (prints job ids 101, 102, ...) and ``scontrol`` stand-ins that record their arguments in
    ``calls.jsonl``, first on PATH; the stand-in experiment ``fakeexp.run`` importable by the task's child."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for tool in ("sbatch", "scontrol"):
        (bin_dir / tool).write_text(TOOL.format(py=PY, calls=str(calls)))
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "fakeexp").mkdir()
    (tmp_path / "fakeexp" / "__init__.py").write_text("")
    (tmp_path / "fakeexp" / "run.py").write_text(FAKE_EXP)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    sweep = tmp_path / "fake.json"
    sweep.write_text(json.dumps({"experiment": "fakeexp.run", "name": "fake", "fixed": {"total_timesteps": 64},
                                 "grid": {"learning_rate": [1e-3, 3e-3, 1e-2, 3e-2]}, "seeds": 2,
                                 "slurm": {"throttle": 3, "signal_lead_s": 90}, "python": PY}))

    def read_calls():
        return [json.loads(x) for x in calls.read_text().splitlines()] if calls.exists() else []
    return sweep, read_calls


def _start_task(sweep_dir: Path, index: int, job: str = "77") -> subprocess.Popen:
    env = {**os.environ, "SLURM_ARRAY_JOB_ID": job, "SLURM_ARRAY_TASK_ID": str(index), "SLURM_JOB_ID": "999"}
    return subprocess.Popen([PY, "-m", "slurm.task", str(sweep_dir), str(index)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout  # bounds a hang only: the stand-in run starts in about a second
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_task_passes_signals_on_as_sigterm_and_requeues_on_sigusr1(fake_slurm, tmp_path, sig):
    """README (Sweeps on Slurm): the job script asks Slurm for SIGUSR1 ``signal_lead_s`` before the time limit and
    exec's ``slurm.task``, which passes SIGUSR1 (time limit near) and SIGTERM (preemption, requeue) on to the run as
    SIGTERM; after SIGUSR1 it requeues its own array task (``scontrol requeue JOB_TASK``), after SIGTERM it does
    not (Slurm requeues preempted jobs itself)."""
    sweep, calls = fake_slurm
    out = tmp_path / "sweep"
    submit.submit(sweep, out=str(out))
    script = (out / "job.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@90" in script
    assert script.splitlines()[-1].startswith(f"exec {PY} -m slurm.task {out}")  # the task gets the signals
    task = sw.read_manifest(out)["tasks"][5]
    run = out / task["run_dir"]
    proc = _start_task(out, 5)
    _wait_for(run / "ready", proc)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=120)
    assert (run / "signal").read_text() == "SIGTERM", log  # passed on as SIGTERM
    status = json.loads((run / "status.json").read_text())
    assert status["exit_code"] == 128 + signal.SIGTERM and status["signal"] == sig.name, status
    assert status["attempt"] == 1 and status["slurm_array_job_id"] == "77"
    requeues = [c for c in calls() if c[0] == "scontrol"]
    if sig == signal.SIGUSR1:
        assert requeues == [["scontrol", "requeue", "77_5"]] and status["state"] == "requeued", (requeues, status)
    else:
        assert requeues == [] and status["state"] == "interrupted", (requeues, status)
    assert proc.returncode == 128 + signal.SIGTERM, log
    # the run was started to resume (a requeued task continues from its checkpoint) in its own run directory
    (argv,) = [json.loads(x) for x in (run / "calls.jsonl").read_text().splitlines()]
    assert argv[argv.index("--run-dir") + 1] == str(run) and "--resume" in argv
    assert "--learning-rate=0.01" in argv and argv[argv.index("--seed") + 1] == "1"  # task 5: point 2, seed 1


def test_rerun_resubmits_only_the_given_tasks(fake_slurm, tmp_path, monkeypatch):
    """``python -m slurm.submit --rerun SWEEP_DIR --tasks 3,7``: one sbatch of the sweep's job script for exactly
    those array indices (with the sweep's throttle), recorded in the manifest; ``--local`` runs just them here;
    bad or missing indices exit 2 naming --tasks."""
    sweep, calls = fake_slurm
    out = tmp_path / "sweep"
    submit.submit(sweep, out=str(out))
    assert calls() == [["sbatch", "--parsable", str(out / "job.sbatch")]]
    assert "#SBATCH --array=0-7%3" in (out / "job.sbatch").read_text()

    def cli(*args):
        return subprocess.run([PY, "-m", "slurm.submit", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    r = cli("--rerun", str(out), "--tasks", "3,7")
    assert r.returncode == 0, r.stderr
    assert calls()[1:] == [["sbatch", "--parsable", "--array=3,7%3", str(out / "job.sbatch")]]
    assert "resubmitted tasks 3,7%3 as job 102" in r.stdout
    subs = sw.read_manifest(out)["submissions"]
    assert [(x["job_id"], x["array"]) for x in subs] == [("101", "0-7%3"), ("102", "3,7%3")]
    for bad in (["--tasks", "3,8"], ["--tasks", ""], []):
        r = cli("--rerun", str(out), *bad)
        assert r.returncode == 2 and "tasks" in r.stderr, (bad, r.stderr)
    assert len(calls()) == 2  # nothing submitted for the bad ones
    # --local: the given tasks run here, one after another, and only they
    monkeypatch.setenv("FAKE_EXP", "finish")
    r = cli("--rerun", str(out), "--tasks", "2-3", "--local")
    assert r.returncode == 0, r.stdout + r.stderr
    tasks = sw.read_manifest(out)["tasks"]
    ran = [i for i, t in enumerate(tasks) if (out / t["run_dir"] / "calls.jsonl").exists()]
    assert ran == [2, 3], r.stdout
    assert all(json.loads((out / tasks[i]["run_dir"] / "status.json").read_text())["state"] == "done" for i in ran)
    assert len(calls()) == 2  # no sbatch for a local rerun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install_if_missing() -> str | None:
    """Reason to skip, or None when munged/slurmctld/slurmd/sbatch are available (installing them if root)."""
    need = ("munged", "slurmctld", "slurmd", "sbatch")
    if all(shutil.which(b) or os.path.exists(f"/usr/sbin/{b}") for b in need):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and we are not root (apt-get install -y slurm-wlm munge)"
    if not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get here"
    r = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], capture_output=True, text=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=900)
    if r.returncode != 0:
        return f"apt-get install slurm-wlm munge failed: {r.stderr.strip()[-300:]}"
    return None


class LocalSlurm:
    """munged + slurmctld + slurmd for one node (this host), all state under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.pids: list[int] = []
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def sbin(self, name):
        return shutil.which(name) or f"/usr/sbin/{name}"

    def start(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = r / "munge" / "munge.socket"
        subprocess.run([self.sbin("munged"), "--force", f"--socket={sock}", f"--key-file={key}",
                        f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                        f"--seed-file={r / 'munge' / 'seed'}"], check=True, capture_output=True, timeout=30)
        self.pids.append(self._pid(r / "munge" / "munged.pid"))
        cpus = os.cpu_count() or 1
        mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        conf = f"""ClusterName=jaxrltest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobRequeue=1
ReturnToService=2
KillWait=60
MinJobAge=300
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        (r / "slurm.conf").write_text(conf)
        for daemon in ("slurmctld", "slurmd"):
            args = ["-N", self.host] if daemon == "slurmd" else []
            p = subprocess.run([self.sbin(daemon), "-f", str(r / "slurm.conf"), *args], env=self.env,
                               capture_output=True, text=True, timeout=60)
            if p.returncode != 0:
                raise RuntimeError(f"{daemon} did not start: {p.stderr.strip()} {self.log(daemon)}")
            self.pids.append(self._pid(r / f"{daemon}.pid"))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t").stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return
            time.sleep(1)
        raise RuntimeError(f"the node did not come up (sinfo: {out!r}); {self.log('slurmctld')}")

    def _pid(self, path: Path, wait_s: float = 15) -> int:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if path.exists() and path.read_text().strip():
                return int(path.read_text().strip())
            time.sleep(0.1)
        raise RuntimeError(f"no pid file {path}")

    def log(self, daemon: str) -> str:
        p = self.root / "log" / f"{daemon}.log"
        return p.read_text()[-1500:] if p.exists() else ""

    def run(self, *cmd, check=False) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def stop(self) -> None:
        if len(self.pids) == 3:  # cancel what a failed test left behind, so no job outlives the cluster
            self.run("scancel", "--full", f"--user={os.getuid()}")
            deadline = time.time() + 60
            while time.time() < deadline and self.run("squeue", "-h").stdout.strip():
                time.sleep(1)
        for pid in reversed(self.pids):  # slurmd, slurmctld, munged: only the daemons started here
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    def job_states(self, job_id: str) -> dict[str, str]:
        """``{"<job>_<task>": state}`` for the array's tasks still known to slurmctld."""
        out = self.run("squeue", "-h", "-r", "-j", job_id, "-o", "%i %T").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_done(self, job_id: str, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if not self.job_states(job_id):
                return
            time.sleep(2)
        raise AssertionError(f"job {job_id} still queued/running after {timeout_s} s: {self.job_states(job_id)}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = _install_if_missing()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd for a test cluster needs root (SlurmUser=root)")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        cluster.stop()
        pytest.skip(f"could not start a local Slurm: {e}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]  # for slurm.submit's sbatch in this process
    yield cluster
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    cluster.stop()


TINY = {"env_name": "CartPole-v1", "num_envs": 4, "num_steps": 32, "hidden": [16], "update_epochs": 1,
        "num_minibatches": 1}


def _write_sweep(path: Path, name: str, fixed: dict, grid: dict, seeds, **more) -> Path:
    # a persistent compilation cache: a requeued task does not compile again (worth using on clusters too)
    cache = path.parent / "jax_cache"
    setup = [f"export JAX_COMPILATION_CACHE_DIR={cache}", "export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0"]
    raw = {"experiment": "ppo", "name": name, "fixed": fixed, "grid": grid, "seeds": seeds,
           "slurm": {"time": "00:10:00", "cpus_per_task": 1, "setup": setup}, "python": PY, **more}
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
def test_sweep_on_real_slurm(slurm, tmp_path):
    f = _write_sweep(tmp_path / "tiny.json", "tiny", {**TINY, "total_timesteps": 4 * 32 * 4, "checkpoint_every": 2},
                     {"learning_rate": [1e-3, 3e-3]}, 1)
    out = tmp_path / "sweep"
    submit.submit(f, out=str(out))
    m = sw.read_manifest(out)
    job = m["submissions"][0]["job_id"]
    slurm.wait_done(job, 600)
    for t in m["tasks"]:
        st = report.task_state(out, t)
        log = "".join(p.read_text() for p in (out / "logs").glob("*"))
        assert st["state"] == "done", (t, st["status"], log[-2000:])
        run = out / t["run_dir"]
        assert st["updates"] == 4
        assert (run / "checkpoints").is_dir() and (run / "config.json").exists()
        assert json.loads((run / "git.json").read_text())["commit"]
        status = json.loads((run / "status.json").read_text())
        assert status["slurm_array_job_id"] == job and status["exit_code"] == 0
    assert len(list((out / "logs").glob(f"{job}_*.out"))) == 2
    data = report.write_report(out)
    assert data["failed"] == [] and all(r["n"] == 1 for r in data["rows"])
    assert (out / "report" / "learning_curves.png").exists()
    # README: `python -m slurm.submit --rerun SWEEP_DIR --tasks 1` runs task 1 again in a new job (it resumes its
    # finished run: nothing is trained twice) and leaves task 0 alone
    r = subprocess.run([PY, "-m", "slurm.submit", "--rerun", str(out), "--tasks", "1"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    job2 = sw.read_manifest(out)["submissions"][1]["job_id"]
    assert job2 != job and f"as job {job2}" in r.stdout
    slurm.wait_done(job2, 600)
    s0, s1 = (json.loads((out / t["run_dir"] / "status.json").read_text()) for t in m["tasks"])
    assert (s0["attempt"], s0["slurm_array_job_id"]) == (1, job), s0
    assert (s1["attempt"], s1["slurm_array_job_id"], s1["state"]) == (2, job2, "done"), s1
    assert report.task_state(out, m["tasks"][1])["updates"] == 4
    assert len(list((out / "logs").glob(f"{job2}_*.out"))) == 1


def _pids_running(*words: str) -> list[int]:
    """Processes whose command line contains all ``words``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(w in cmd for w in words):
                out.append(int(d.name))
    return out


def _proc_state(pid: int) -> str:
    """The state letter of ``pid`` (R, S, T stopped, Z...); "X" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "X"


def _signal_pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` waits, undelivered, for process ``pid`` (as for a stopped process)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    mask = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return bool(mask & (1 << (sig - 1)))


@pytest.mark.slow  # ~75 s on a busy 2-core machine; CI's slow pass
def test_requeued_task_resumes_from_checkpoint(slurm, tmp_path):
    # one task, many short chunks: requeue it once it has a checkpoint; it must continue from there. The run is
    # stopped (SIGSTOP) as soon as its first checkpoint is seen and continued only once slurm.task has passed the
    # requeue's SIGTERM on to it, so the requeue lands mid-run however fast or slow this machine is
    updates = 600
    f = _write_sweep(tmp_path / "long.json", "long", {**TINY, "total_timesteps": 4 * 32 * updates,
                                                       "checkpoint_every": 10},
                     {"learning_rate": [1e-3]}, 1)
    out = tmp_path / "sweep"
    submit.submit(f, out=str(out))
    m = sw.read_manifest(out)
    job = m["submissions"][0]["job_id"]
    run = out / m["tasks"][0]["run_dir"]
    deadline = time.time() + 400  # bounds a hang only
    saved = lambda: [p for p in (run / "checkpoints").iterdir() if p.name.isdigit()] \
        if (run / "checkpoints").exists() else []  # noqa: E731 -- finished checkpoints (not *.orbax-checkpoint-tmp)
    while not saved():
        assert time.time() < deadline, "no checkpoint appeared"
        assert slurm.job_states(job), "the job ended before it could be requeued"
        time.sleep(0.2)
    (pid,) = _pids_running("experiments.ppo", str(run))
    os.kill(pid, signal.SIGSTOP)
    deadline = time.time() + 60
    while _proc_state(pid) not in "Tt":
        assert time.time() < deadline, _proc_state(pid)
        time.sleep(0.05)
    try:
        ckpts = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
        assert ckpts and ckpts[-1] < updates, ckpts  # stopped mid-run
        r = slurm.run("scontrol", "requeue", f"{job}_0")
        assert r.returncode == 0, r.stderr
        deadline = time.time() + 120  # bounds a hang only
        # the requeue has reached the run: slurm.task passed its SIGTERM on (pending while the run is stopped),
        # or Slurm signalled the job's processes itself (SIGCONT + SIGTERM)
        while not (_signal_pending(pid, signal.SIGTERM) or _proc_state(pid) not in "Tt"):
            assert time.time() < deadline, "the run was not sent SIGTERM after the requeue"
            time.sleep(0.1)
    finally:
        os.kill(pid, signal.SIGCONT)
    # a requeued job waits out a begin-time delay (minutes) once its processes have exited; let it start now
    deadline = time.time() + 300
    while slurm.job_states(job).get(f"{job}_0") != "PENDING":
        assert time.time() < deadline, slurm.job_states(job)
        time.sleep(1)
    slurm.run("scontrol", "update", f"JobId={job}_0", "StartTime=now")
    slurm.wait_done(job, 900)
    log = "".join(p.read_text() for p in (out / "logs").glob("*"))
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["attempt"] == 2, (status, log[-3000:])
    assert status["slurm_restart_count"] == 1
    assert "resumed" in log and "received SIGTERM" in log, log[-3000:]
    resumed_at = int(log.split("resumed ")[1].split(" at update ")[1].split("/")[0])
    assert 0 < resumed_at < updates and resumed_at % 10 == 0
    st = report.task_state(out, m["tasks"][0])
    assert st["state"] == "done" and st["updates"] == updates
    np.testing.assert_array_equal(st["metrics"]["update"], np.arange(1, updates + 1))


@pytest.mark.slow  # two processes compile and train: ~1-2 min on a busy 2-core machine
def test_srun_multiprocess_training_detects_the_cluster_from_slurm(slurm, tmp_path):
    """``srun`` two tasks of ``experiments.ppo --distributed``: coordinator, process count and ids come from the
    Slurm step's environment; the run trains on the 4 devices of both processes and process 0 writes the logs."""
    run = tmp_path / "run"
    script = tmp_path / "mp.sbatch"
    script.write_text(f"""#!/usr/bin/env bash
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --output={tmp_path}/mp.out
cd {REPO}
export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 JAXRL_COORDINATOR_PORT={_free_port()}
srun {PY} -m experiments.ppo --distributed --num-devices 4 --num-envs 8 --num-steps 16 --hidden 16 \\
  --num-minibatches 2 --update-epochs 1 --total-timesteps {8 * 16 * 6} --checkpoint-every 3 --progress False \\
  --run-dir {run}
""")
    r = slurm.run("sbatch", "--parsable", str(script))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    slurm.wait_done(job, 600)
    log = (tmp_path / "mp.out").read_text()
    assert log.count("finished 6 updates") == 2, log[-3000:]
    assert (run / "checkpoints").is_dir() and len(list((run / "tb").glob("events*"))) == 1, log[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["num_devices"] == 4


def test_hp_values_option_is_validated(capsys):
    from experiments import ppo as ppo_exp
    opts = ppo_exp.parse(["--num-seeds", "2", "--hp-values", '{"learning_rate": [0.001, 0.003]}'])
    assert opts.run.hp_overrides(ppo_exp.ppo.HPARAM_FIELDS) == {"learning_rate": [0.001, 0.003]}
    for bad, words in (('{"learning_rate": [0.001]}', "one number per seed"), ('{"hidden": [1, 2]}', "cannot be vmapped"),
                       ("[1,", "is not JSON")):
        with pytest.raises(SystemExit) as e:
            ppo_exp.parse(["--num-seeds", "2", "--hp-values", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "hp_values" in err and words in err and "Fix:" in err


@pytest.mark.slow  # trains one vmapped task locally (~40 s on a busy 2-core machine)
def test_vmapped_hparams_sweep_runs_locally_and_reports_each_point(tmp_path):
    f = _write_sweep(tmp_path / "v.json", "v", {**TINY, "total_timesteps": 4 * 32 * 4, "checkpoint_every": 2},
                     {"learning_rate": [1e-3, 3e-3], "ent_coef": [0.0, 0.01]}, 2, vmap_seeds=True,
                     vmap_hparams=["learning_rate", "ent_coef"])
    out = tmp_path / "sweep"
    submit.submit(f, out=str(out), local=True)
    m = sw.read_manifest(out)
    assert len(m["tasks"]) == 1 and len(m["tasks"][0]["members"]) == 8
    cfg = json.loads((out / m["tasks"][0]["run_dir"] / "config.json").read_text())
    assert cfg["run"]["hp_batched"] and cfg["run"]["num_seeds"] == 8
    assert cfg["run"]["hp"][".learning_rate"] == pytest.approx([1e-3] * 4 + [3e-3] * 4)
    assert cfg["run"]["hp"][".ent_coef"] == pytest.approx([0.0, 0.0, 0.01, 0.01] * 2)
    data = report.write_report(out)
    assert data["failed"] == [] and [r["n"] for r in data["rows"]] == [2, 2, 2, 2]
    assert (out / "report" / "final_vs_ent_coef.png").exists()
