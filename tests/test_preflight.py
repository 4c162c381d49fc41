"""What an ONI / Motif run depends on outside itself is checked before the run builds anything (issue 33): the
service of ``--annotator-url``, the ``--label-store``, Motif's files in ``--motif-dir``. Each probe must fail at once
with exit 2 and one last line ``error: <option>: <problem>. Fix: <fix>``, no traceback, nothing compiled, nothing
written (docs/running.md, "Checked before a run starts"). One probe runs ``python -m experiments.oni`` as a user
does; the others call the same entry point (``experiments.oni.main``) in this process, which spares each ~5 s of
imports, with what would build the run replaced by a failure and JAX's compile events counted."""
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a tiny captioned JAX run: it would compile and train in a minute if a check let it through
TINY = ["--env", "KeyDoor-5", "--annotator", "scripted", "--num-envs", "4", "--num-steps", "8",
        "--total-timesteps", "64", "--progress", "False"]
DATASET = {"env": "KeyDoor-5", "steps": 4000, "seed": 0, "policy": "random",
           "texts": ["", "You pick up the key.", "The door opens.", "Él abrió la puerta."],
           "counts": [3900, 60, 30, 10]}


def _fails_at_once(tmp_path, *args):
    """Runs the CLI; checks exit 2, one last ``error:`` line, no traceback, no compile or training output, no run
    directory made, little CPU spent (the imports: ~5 s). Returns that line."""
    run_dir = tmp_path / "run"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "experiments.oni", *TINY, "--run-dir", str(run_dir), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "true"})
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ". Fix: " in last, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "compil" not in out.lower() and "motif: " not in out and "update" not in out.lower(), out[-3000:]
    assert not run_dir.exists(), sorted(run_dir.iterdir())
    assert cpu < 30, f"{cpu:.1f} s of CPU ({wall:.1f} s wall): more than the imports"
    return last


class _Built(BaseException):
    """Raised by what builds a run (not an Exception: no ``except Exception`` on the way can swallow it)."""


@contextlib.contextmanager
def _jax_compiles():
    """The JAX tracing/compiling events while the block runs, from every thread (none when nothing is built)."""
    import jax
    events = []

    def listen(event, duration, **kw):
        if event.startswith("/jax/core/compile/"):
            events.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def _fails_at_once_here(tmp_path, monkeypatch, capsys, *args):
    """:func:`_fails_at_once` in this process: ``experiments.oni.main`` (what ``python -m experiments.oni`` calls),
    with the annotator service, Motif's dataset / reward model and PPO's trainer replaced by a :class:`_Built`
    failure; also checks that JAX traced or compiled nothing. Returns the last ``error:`` line."""
    from agents import motif
    from experiments import launch
    from experiments import oni

    def refuse(what):
        def built(*a, **kw):
            raise _Built(f"{what} was built before the check failed")
        return built
    monkeypatch.setattr(oni, "start_annotator", refuse("the annotator service"))
    monkeypatch.setattr(motif, "prepare", refuse("Motif's dataset and reward model"))
    monkeypatch.setattr(launch, "train_ppo", refuse("PPO's trainer"))
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("JAXRL_DEBUG", raising=False)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    cpu = time.process_time()
    with _jax_compiles() as compiled:
        try:
            status = oni.main([*TINY, "--run-dir", str(run_dir), *args])
        except SystemExit as e:
            status = e.code
    cpu = time.process_time() - cpu
    out, err = capsys.readouterr()
    out = out + err
    assert status == 2, out[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and ". Fix: " in last, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "compil" not in out.lower() and "motif: " not in out and "update" not in out.lower(), out[-3000:]
    assert compiled == [], compiled
    assert not run_dir.exists(), sorted(run_dir.iterdir())
    assert cpu < 10, f"{cpu:.1f} s of CPU: more than the checks"
    return last


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def test_annotator_url_without_scheme(tmp_path):
    """As a user runs it: ``python -m experiments.oni`` in a process of its own (the other probes call its main)."""
    last = _fails_at_once(tmp_path, "--annotator-url", "localhost:8765")
    assert last == ("error: annotator_url: 'localhost:8765' has no http:// or https:// scheme. Fix: pass "
                    "--annotator-url http://localhost:8765"), last


def test_annotator_url_nothing_listens(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    last = _fails_at_once_here(tmp_path, monkeypatch, capsys, "--annotator-url", url)
    assert last.startswith(f"error: annotator_url: the annotator service at {url} cannot be reached: connection "
                           "refused"), last
    assert "python -m jaxrl_pref.annotation.server" in last and "drop --annotator-url" in last, last


def test_label_store_is_a_directory(tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    store.mkdir()
    last = _fails_at_once_here(tmp_path, monkeypatch, capsys, "--label-store", str(store))
    assert last == (f"error: label_store: {store} is a directory. Fix: name a file in it, e.g. --label-store "
                    f"{store / 'labels.db'}"), last
    assert list(store.iterdir()) == []


def test_label_store_is_not_sqlite(tmp_path, monkeypatch, capsys):
    store = tmp_path / "labels.db"
    store.write_text('{"labels": "not a database"}\n')
    last = _fails_at_once_here(tmp_path, monkeypatch, capsys, "--label-store", str(store))
    assert last.startswith(f"error: label_store: {store} is not a SQLite database") and "--label-store" in last, last
    assert store.read_text() == '{"labels": "not a database"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.db"]  # no -wal/-shm, no port file, no log


def test_label_store_is_read_only(tmp_path, monkeypatch, capsys):
    from jaxrl_pref.annotation.store import LabelStore
    store = tmp_path / "labels.db"
    s = LabelStore(store)
    s.add("keydoor", ["You pick up the key."])
    s.close()
    data = store.read_bytes()
    store.chmod(0o444)
    last = _fails_at_once_here(tmp_path, monkeypatch, capsys, "--label-store", str(store))
    assert last == (f"error: label_store: {store} is read-only. Fix: make it writable (chmod u+w {store}), or pass "
                    "another --label-store (a file that does not exist yet is created)"), last
    assert store.read_bytes() == data and sorted(p.name for p in tmp_path.iterdir()) == ["labels.db"]


@pytest.mark.parametrize("cut", ["json", "utf8"])
def test_motif_dataset_cut_short(tmp_path, monkeypatch, capsys, cut):
    """dataset.json cut off mid-JSON, or inside a multi-byte character: the file, the problem, how to redo it."""
    mdir = tmp_path / "motif"
    mdir.mkdir()
    raw = json.dumps(DATASET, indent=1, ensure_ascii=False).encode()
    end = raw.index(b"\xc3\x89") + 1 if cut == "utf8" else len(raw) // 2  # (after the first byte of "É")
    (mdir / "dataset.json").write_bytes(raw[:end])
    last = _fails_at_once_here(tmp_path, monkeypatch, capsys, "--method", "motif", "--motif-dir", str(mdir))
    ds = mdir / "dataset.json"
    problem = "is not UTF-8 text (byte 0xc3 at offset" if cut == "utf8" else "is not valid JSON at line"
    assert last.startswith(f"error: motif_dir: {ds} {problem}"), last
    assert last.endswith(f"Fix: delete it (rm {ds}) and run the same command again: the dataset is collected anew"), \
        last
    assert sorted(p.name for p in mdir.iterdir()) == ["dataset.json"]


def test_motif_pairs_not_json(tmp_path, monkeypatch, capsys):
    mdir = tmp_path / "motif"
    mdir.mkdir()
    (mdir / "dataset.json").write_text(json.dumps(DATASET, indent=1))
    (mdir / "pairs.json").write_text("<html>502 Bad Gateway</html>\n")
    last = _fails_at_once_here(tmp_path, monkeypatch, capsys, "--method", "motif", "--motif-dir", str(mdir))
    pairs = mdir / "pairs.json"
    assert last == (f"error: motif_dir: {pairs} is not valid JSON at line 1 column 1 (Expecting value). Fix: delete it "
                    f"(rm {pairs}) and run the same command again: the pairs are asked anew (the label store answers "
                    "those it holds at once)"), last
    assert sorted(p.name for p in mdir.iterdir()) == ["dataset.json", "pairs.json"]


# -- the pieces, in process (fast) ------------------------------------------------------------------------------------
def test_annotator_service_says_one_line_when_its_store_fails(tmp_path):
    """Started on a store the preflight would refuse (as if it changed in between), the service exits 2 with its
    one ``error: store: ...`` line, and the run's error is that line (not the service's traceback)."""
    from jaxrl_pref.annotation.client import start_server
    store = tmp_path / "labels.db"
    store.write_bytes(b"PK\x03\x04 a zip, not a store")
    with pytest.raises(RuntimeError) as e:
        start_server(str(store), "scripted", timeout=60)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert msg.startswith(f"the annotator service exited with status 2: store: {store} is not a SQLite database"), msg
    assert "Fix: pass another --store" in msg, msg
    assert store.read_bytes() == b"PK\x03\x04 a zip, not a store"


def test_annotator_url_checks_answer_of_a_service(tmp_path):
    """``GET /health`` of a running service passes; another HTTP server fails, naming the URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading
    from jaxrl_pref.annotation.client import start_server, stop_server
    from jaxrl_pref.annotation.config import AnnotatorConfig, check_service, preflight
    from jaxrl_pref.config import ConfigError
    proc, url = start_server(str(tmp_path / "labels.db"), "scripted", timeout=60)
    try:
        preflight(AnnotatorConfig(annotator_url=url), tmp_path / "run")
    finally:
        stop_server(proc)

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *a):
            pass
    other = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        with pytest.raises(ConfigError, match=f"annotator_url: {url} answers GET /health with HTTP 404: it is not an "
                                              "annotator service"):
            check_service(url)
    finally:
        other.shutdown()
        other.server_close()
    assert not (tmp_path / "run").exists()
