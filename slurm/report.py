"""Aggregate a sweep: ``python -m slurm.report SWEEP_DIR``.

Reads every task's ``metrics.csv`` (see :mod:`slurm.submit`) and writes, into ``SWEEP_DIR/report/``:

* ``report.md`` and ``summary.csv``: one row per grid point -- the final return (mean of ``episode_return`` over
  the last ``--last-frac`` of updates, per seed) as mean +- 95% confidence interval over seeds (Student t), and
  how many seeds finished;
* ``learning_curves.png``: episode return against env steps, one line per grid point (mean over seeds, shaded 95%
  CI);
* ``final_vs_<field>.png``: final return against each swept field (one line per combination of the others);

and lists the failed, unfinished and missing tasks with the command that reruns them (they resume from their
checkpoints). Exit status 0 when every task finished, 3 when some did not (the report is written either way).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from jaxrl_pref import run_config
from jaxrl_pref.config import ConfigError
from jaxrl_pref.logging import read_metrics
from jaxrl_pref.stats import final_score, mean_ci, t_quantile
from slurm import sweep as sw


def task_state(sweep_dir: Path, task: dict) -> dict:
    """``{"state": done|incomplete|failed|running|missing, "updates", "num_updates", "metrics", "status"}``."""
    run_dir = sweep_dir / task["run_dir"]
    status = _json(run_dir / "status.json")
    num_updates = run_config.run_settings(run_dir).get("num_updates")
    metrics_path = run_dir / "metrics.csv"
    metrics = read_metrics(metrics_path) if metrics_path.exists() else {}
    updates = int(len(metrics["update"])) if metrics.get("update") is not None else 0
    if status is None and not metrics:
        state = "missing"
    elif num_updates is not None and updates >= num_updates:
        state = "done"
    elif status is not None and status.get("state") == "running":
        state = "running"
    elif status is not None and status.get("state") == "failed":
        state = "failed"
    else:
        state = "incomplete"
    return {"state": state, "updates": updates, "num_updates": num_updates, "metrics": metrics, "status": status}


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def final_return(curve: np.ndarray, last_frac: float) -> float:
    """Mean of the finite values among the last ``last_frac`` of updates, rounded up (at least one update)."""
    return float(final_score(curve, frac=last_frac, rounding="ceil", finite=True))


def collect(sweep_dir, last_frac: float = 0.1, key: str = "episode_return", include_partial: bool = False) -> dict:
    sweep_dir = Path(sweep_dir).resolve()
    m = sw.read_manifest(sweep_dir)
    states = {t["index"]: task_state(sweep_dir, t) for t in m["tasks"]}
    per_point = {p["index"]: {"finals": [], "curves": [], "steps": None, "seeds": []} for p in m["points"]}
    for t in m["tasks"]:
        st = states[t["index"]]
        if st["state"] != "done" and not (include_partial and st["metrics"]):
            continue
        met = st["metrics"]
        if key not in met:
            continue
        for mem in t["members"]:
            curve = met[key][mem["row"]]
            pp = per_point[mem["point"]]
            pp["finals"].append(final_return(curve, last_frac))
            pp["curves"].append(curve)
            pp["seeds"].append(mem["seed"])
            if pp["steps"] is None or len(met["env_steps"]) > len(pp["steps"]):
                pp["steps"] = met["env_steps"]
    rows = []
    for p in m["points"]:
        pp = per_point[p["index"]]
        mean, ci, n = mean_ci(pp["finals"])
        rows.append({"point": p["index"], "name": p["name"], "params": p["params"], "mean": mean, "ci95": ci,
                     "n": n, "seeds_expected": len(m["seeds"])})
    return {"manifest": m, "sweep_dir": sweep_dir, "states": states, "rows": rows, "per_point": per_point,
            "key": key, "last_frac": last_frac}


def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.2f}"


def table(data: dict) -> str:
    m = data["manifest"]
    fields = m["varying"]
    head = ["point", *fields, f"final {data['key']} (mean ± 95% CI)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(data["rows"], key=lambda r: -r["mean"] if np.isfinite(r["mean"]) else math.inf):
        ci = f" ± {_fmt(r['ci95'])}" if np.isfinite(r["ci95"]) else ""
        vals = [str(r["params"].get(f, "")) for f in fields]
        lines.append("| " + " | ".join([str(r["point"]), *vals, f"{_fmt(r['mean'])}{ci}",
                                         f"{r['n']}/{r['seeds_expected']}"]) + " |")
    return "\n".join(lines)


def problems(data: dict) -> tuple[list[str], list[int]]:
    """Lines describing the tasks that did not finish, and their indices."""
    sweep_dir, m = data["sweep_dir"], data["manifest"]
    lines, bad = [], []
    for t in m["tasks"]:
        st = data["states"][t["index"]]
        if st["state"] == "done":
            continue
        bad.append(t["index"])
        s = st["status"] or {}
        detail = {"missing": "never started (no output)", "running": "still running or killed without saving",
                  "failed": f"failed (exit {s.get('exit_code')})",
                  "incomplete": f"stopped early ({s.get('state', 'no status')})"}[st["state"]]
        logs = sorted((sweep_dir / "logs").glob(f"*_{t['index']}.out"))
        lines.append(f"- task {t['index']} ({t['run_dir']}): {detail}, {st['updates']}/{st['num_updates'] or '?'} "
                     f"updates" + (f"; log {logs[-1]}" if logs else ""))
    return lines, bad


def plot_curves(data: dict, path: Path) -> Optional[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = False
    for r in data["rows"]:
        pp = data["per_point"][r["point"]]
        if not pp["curves"]:
            continue
        n = min(len(c) for c in pp["curves"])
        c = np.stack([c[:n] for c in pp["curves"]])
        x = np.asarray(pp["steps"][:n])
        with np.errstate(all="ignore"), _quiet():
            mean = np.nanmean(c, axis=0)
            cnt = np.sum(np.isfinite(c), axis=0)
            sd = np.nanstd(c, axis=0, ddof=1) if c.shape[0] > 1 else np.zeros_like(mean)
        half = np.array([t_quantile(int(k)) * s / math.sqrt(k) if k > 1 else 0.0 for k, s in zip(cnt, sd)])
        ok = np.isfinite(mean)
        line, = ax.plot(x[ok], mean[ok], label=r["name"])
        ax.fill_between(x[ok], (mean - half)[ok], (mean + half)[ok], alpha=0.2, color=line.get_color())
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("env steps")
    ax.set_ylabel(data["key"])
    ax.set_title(f"{data['manifest']['name']}: mean over seeds, 95% CI")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


class _quiet:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def plot_vs_field(data: dict, field: str, path: Path) -> Optional[Path]:
    """Final return against ``field``; one line per combination of the other varying fields."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    rows = [r for r in data["rows"] if field in r["params"] and np.isfinite(r["mean"])]
    if not rows:
        return None
    values = sorted({json.dumps(r["params"][field]) for r in rows}, key=lambda s: (not _num(json.loads(s)), json.loads(s)
                    if _num(json.loads(s)) else s))
    numeric = all(_num(json.loads(v)) for v in values)
    pos = {v: (json.loads(v) if numeric else i) for i, v in enumerate(values)}
    groups: dict[str, list] = {}
    for r in rows:
        others = ",".join(f"{k}={sw._short(v)}" for k, v in r["params"].items() if k != field) or "all"
        groups.setdefault(others, []).append(r)
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: pos[json.dumps(r["params"][field])])
        x = [pos[json.dumps(r["params"][field])] for r in rs]
        ax.errorbar(x, [r["mean"] for r in rs], yerr=[r["ci95"] if np.isfinite(r["ci95"]) else 0 for r in rs],
                    marker="o", capsize=3, label=label)
    if numeric and all(v > 0 for v in pos.values()) and max(pos.values()) / min(pos.values()) >= 20:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(list(pos.values()), [json.loads(v) if isinstance(json.loads(v), str) else v for v in values])
    ax.set_xlabel(field)
    ax.set_ylabel(f"final {data['key']}")
    ax.set_title(f"final {data['key']} vs {field} (mean, 95% CI)")
    if len(groups) > 1:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def write_report(sweep_dir, out_dir=None, last_frac: float = 0.1, key: str = "episode_return",
                 include_partial: bool = False, plots: bool = True) -> dict:
    data = collect(sweep_dir, last_frac, key, include_partial)
    sweep_dir = data["sweep_dir"]
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    m = data["manifest"]
    files = {}
    if plots:
        files["learning_curves"] = plot_curves(data, out / "learning_curves.png")
        for f in m["varying"]:
            files[f"final_vs_{f}"] = plot_vs_field(data, f, out / f"final_vs_{f}.png")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["point", *m["varying"], "mean", "ci95", "n", "seeds_expected"])
    for r in data["rows"]:
        w.writerow([r["point"], *[r["params"].get(f, "") for f in m["varying"]], r["mean"], r["ci95"], r["n"],
                    r["seeds_expected"]])
    (out / "summary.csv").write_text(buf.getvalue())
    files["summary_csv"] = out / "summary.csv"
    lines, bad = problems(data)
    counts = {}
    for st in data["states"].values():
        counts[st["state"]] = counts.get(st["state"], 0) + 1
    text = [f"# Sweep {m['name']} ({m['module']})", "",
            f"{len(m['points'])} grid point(s), {len(m['seeds'])} seed(s), {len(m['tasks'])} task(s): "
            + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), "",
            f"Final return: mean of `{key}` over the last {last_frac:.0%} of updates, per seed; then mean ± 95% "
            "CI (Student t) over seeds" + (" (unfinished runs included)" if include_partial else
                                           " (finished runs only)") + ".", "", table(data), ""]
    if bad:
        text += ["## Tasks that did not finish", "", *lines, "",
                 "Rerun them (each resumes from its last checkpoint):", "", "```",
                 f"python -m slurm.submit --rerun {sweep_dir} --tasks {sw.array_spec(bad, None)}",
                 f"# or here, without Slurm: python -m slurm.submit --rerun {sweep_dir} --tasks "
                 f"{sw.array_spec(bad, None)} --local", "```", ""]
    text += ["## Files", ""] + [f"- {k}: {v.name}" for k, v in files.items() if v is not None]
    (out / "report.md").write_text("\n".join(text) + "\n")
    files["report_md"] = out / "report.md"
    data.update(files=files, failed=bad, text="\n".join(text))
    return data


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slurm.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", help="output directory (default SWEEP_DIR/report)")
    ap.add_argument("--last-frac", type=float, default=0.1, help="fraction of final updates averaged (default 0.1)")
    ap.add_argument("--metric", default="episode_return", help="metric to report (default episode_return)")
    ap.add_argument("--include-partial", action="store_true", help="also use unfinished runs' metrics so far")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    if not 0 < a.last_frac <= 1:
        print("error: last_frac: must lie in (0, 1]. Fix: pass e.g. --last-frac 0.1", file=sys.stderr)
        return 2
    try:
        data = write_report(a.sweep_dir, a.out, a.last_frac, a.metric, a.include_partial, not a.no_plots)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(data["text"])
    print(f"\nwritten to {data['files']['report_md'].parent}/")
    return 3 if data["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
