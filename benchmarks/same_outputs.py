"""Are a restructuring's outputs bitwise the same? Three small runs (PPO in the jitted loop, ONI in the jitted loop
on a captioned task, PPO on a NetHack/MiniHack pool) recorded once from the old code and once from the new, then
compared: every saved array of the final checkpoint, and every metric that is not a clock reading.

    git worktree add /tmp/before <old commit>
    (cd /tmp/before && python -m benchmarks.same_outputs record /tmp/out-before)   # the old code's outputs
    python -m benchmarks.same_outputs record /tmp/out-after                         # this checkout's
    python -m benchmarks.same_outputs compare /tmp/out-before /tmp/out-after        # exit 1 on any difference

``record`` runs the entry points as a user would (subprocesses, CPU); ``compare`` is this file's own code, so it can
compare outputs recorded by an older checkout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# name -> the command line (after python -m); small enough for 2 CPU cores (about a minute each)
RUNS = {
    "ppo": ["experiments.ppo", "--env", "CartPole-v1", "--total-timesteps", "16384", "--num-seeds", "2",
            "--checkpoint-every", "4"],
    # label-wait: each exchange waits for every answer, so the labels (and the run) do not depend on timing
    "oni_jit": ["experiments.oni", "--env", "KeyDoor-5", "--total-timesteps", "16384", "--num-seeds", "2",
                "--label-wait", "60", "--checkpoint-every", "4"],
    "pool": ["experiments.ppo", "--env", "MiniHack-Room-5x5-v0", "--total-timesteps", "2048",
             "--checkpoint-every", "2"],
}
CLOCK_WORDS = ("time", "sps", "per_s", "wall", "elapsed", "second", "waited", "latency")


def record(out: Path, names) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for name in names:
        run_dir = out / name
        cmd = [sys.executable, "-m", *RUNS[name], "--run-dir", str(run_dir), "--no-resume"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def _final_state(run_dir: Path) -> dict:
    import orbax.checkpoint as ocp
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    state = ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / str(steps[-1]) / "state").absolute())
    return {"step": steps[-1], **{k: np.asarray(v) for k, v in state.items()}}


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not any(w in k.lower() for w in CLOCK_WORDS)} for r in rows]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare(a: Path, b: Path, names) -> list[str]:
    diffs = []
    for name in names:
        sa, sb = _final_state(a / name), _final_state(b / name)
        if sa.keys() != sb.keys():
            diffs.append(f"{name}: checkpoint leaves differ: {sorted(sa.keys() ^ sb.keys())}")
        for k in sorted(sa.keys() & sb.keys()):
            x, y = np.asarray(sa[k]), np.asarray(sb[k])
            if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
                diffs.append(f"{name}: checkpoint leaf {k} differs ({x.dtype}{x.shape} vs {y.dtype}{y.shape})")
        ma, mb = _metrics(a / name), _metrics(b / name)
        if len(ma) != len(mb):
            diffs.append(f"{name}: {len(ma)} vs {len(mb)} metric rows")
        for i, (ra, rb) in enumerate(zip(ma, mb)):
            bad = sorted(k for k in ra.keys() | rb.keys() if not _same(ra.get(k), rb.get(k)))
            if bad:
                diffs.append(f"{name}: metrics row {i} differs in {bad[:6]}")
                break
        leaves = len(sa) - 1
        print(f"{name}: step {sa['step']} vs {sb['step']}, {leaves} checkpoint leaves, {len(ma)} metric rows compared")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run the three commands into DIR/<name>")
    r.add_argument("out", type=Path)
    c = sub.add_parser("compare", help="compare two recorded DIRs; exit 1 on any difference")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    for s in (r, c):
        s.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    a = p.parse_args(argv)
    if a.cmd == "record":
        record(a.out, a.runs)
        return 0
    diffs = compare(a.a, a.b, a.runs)
    print("\n".join(diffs) if diffs else "bitwise equal: every checkpoint leaf and every non-clock metric")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
