"""Checks an experiment's command lines before they run: a sweep's array tasks (``slurm.submit``) and a study's runs
(``experiments.sparse_study``) fail here, in one line each, instead of on a compute node hours later.

Each command's argv (exactly what the task will run: the sweep's options, ``--seed``/``--num-seeds``/
``--hp-values``, ``--run-dir``, ``--resume``) is parsed in this process by the experiment's own parser and checks,
:func:`jaxrl_pref.cli.parse` on the module's ``SPEC`` (a :class:`jaxrl_pref.cli.Experiment`). That builds no env and
starts no training; it does look up the env id and JAX's devices, as the run itself does first.

* :func:`load_spec` -- the ``SPEC`` of ``experiments.<name>`` (an unknown name is an error listing the experiments);
  ``None`` for a module of your own that declares none (its commands are not checked).
* :func:`check_argv` -- the parser's complaint about one argv, reduced to one line (``None`` when it is fine).
* :func:`check_tasks` -- every task of a sweep; identical messages are grouped (``tasks 0-7: ...``).

Checks that depend on the machine (``--num-devices``, ``--actor-device`` against ``jax.devices()``) are notes, not
errors: the tasks run on other nodes (and the checking process keeps JAX on its CPU, :func:`keep_jax_on_cpu`).
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import io
import os
import re
import sys
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from jaxrl_pref.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
# fields whose check asks this machine (its devices): the tasks run elsewhere, so a failure is a note
MACHINE_FIELDS = ("num_devices", "actor_device")


class TasksInvalid(ConfigError):
    """Some commands do not parse: ``lines`` holds one message per distinct problem (``task 3 (...): field: ...``)."""

    def __init__(self, lines: Sequence[str]):
        self.lines = list(lines)
        self.field = "tasks"
        ValueError.__init__(self, "\n".join(self.lines))


def keep_jax_on_cpu() -> None:
    """A process that only checks options (its runs are other processes, maybe on this machine's accelerator) keeps
    JAX on the CPU, so it holds no accelerator memory while they run. Through ``jax.config``, not the environment:
    the runs (and what sbatch exports to the tasks) are unchanged. No effect once JAX has started."""
    import jax
    from jax._src import xla_bridge  # private: only to leave an already started JAX alone
    if not getattr(xla_bridge, "_backends", {}):
        jax.config.update("jax_platforms", "cpu")


# -- the experiment module -----------------------------------------------------------------------------------------

def _declares_spec(path) -> bool:
    """Whether the module source at ``path`` assigns ``SPEC`` at top level (read, not imported)."""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return False
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "SPEC" for t in targets):
            return True
    return False


def experiments() -> list[str]:
    """The names ``experiment:`` accepts: the modules of ``experiments/`` that declare a ``SPEC``."""
    return sorted(p.stem for p in (REPO / "experiments").glob("*.py") if _declares_spec(p))


def _find(module: str):
    """The module's spec without importing it (nor its packages), on the path a task has: the repository (its
    working directory), ``$PYTHONPATH`` and this interpreter's path."""
    paths = [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p], *sys.path]
    parts, found = module.split("."), None
    for i in range(len(parts)):
        if paths is None:
            return None
        found = PathFinder.find_spec(".".join(parts[:i + 1]), list(paths))
        if found is None:
            return None
        paths = found.submodule_search_locations
    return found


def load_spec(module: str):
    """The ``SPEC`` of ``module`` (``experiments.ppo``...), imported here; None for a module outside
    ``experiments/`` that declares none (it cannot be checked). Raises :class:`ConfigError` (field ``experiment``)
    when there is no such module, or an ``experiments.*`` module is not an entry point (a study)."""
    found = _find(module)
    origin = found.origin if found is not None else None
    has_spec = bool(origin) and origin.endswith(".py") and _declares_spec(origin)
    name = module[len("experiments."):] if module.startswith("experiments.") else module
    if found is None or (module.startswith("experiments.") and not has_spec):
        avail = experiments()
        close = difflib.get_close_matches(name, avail, n=1)
        problem = (f"there is no experiment {name!r}" if found is None else
                   f"{module} is not an experiment entry point (it declares no SPEC; a study runs on its own)")
        raise ConfigError("experiment", problem + (f" (did you mean {close[0]}?)" if close else ""),
                          f"use one of: {', '.join(avail)} (or a module path of your own, e.g. mypkg.myexp)")
    if not has_spec:
        return None
    argv, sys.argv = sys.argv, sys.argv[:1]  # its import-time setup (cli.setup) must not read this process's flags
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- any import failure is the experiment's problem, said in one line
        raise ConfigError("experiment", f"{module} does not import ({type(e).__name__}: {_first_line(e)})",
                          f"run python -m {module} --help to see the error") from None
    finally:
        sys.argv = argv
    return getattr(mod, "SPEC", None)


# -- one command line ----------------------------------------------------------------------------------------------

def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_argv(spec, argv: Sequence[str]) -> Optional[str]:
    """What the experiment's parser says about ``argv`` (without ``python -m module``), as one line ``field:
    problem. Fix: ...``; None when it parses and passes every check."""
    from jaxrl_pref import cli
    buf = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100000"  # tyro wraps its messages at the terminal's width: one line per sentence
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            cli.parse(spec, list(argv))
    except SystemExit as e:
        if e.code in (0, None):
            return None
        msg = reduce_message(buf.getvalue(), spec.module) or f"the command exits with status {e.code}"
        return msg
    except ConfigError as e:
        return _tidy(str(e))
    except Exception as e:  # noqa: BLE001 -- a check that crashed still fails the task: say what it raised
        return f"{type(e).__name__}: {_first_line(e)}"
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return None


def _describe(kind: Optional[str]) -> str:
    """``float`` / ``FLOAT`` -> ``a number``, ``tuple[int, ...]`` / ``[INT [INT ...]]`` -> ``integers, separated by
    spaces`` ...: what to pass, in words (tyro's boxed message, where its error hook is missing)."""
    k = (kind or "").lower().replace("optional[", "").replace(" | none", "")
    many = k.startswith(("tuple", "list", "["))
    for name, one, several in (("float", "a number", "numbers"), ("int", "an integer", "integers"),
                               ("str", "a string", "strings"), ("bool", "True or False", "True/False values")):
        if name in k or (name == "bool" and "true" in k):
            return f"{several}, separated by spaces" if many else one
    return f"a {kind}" if kind else "a valid value"


_BORDER = "│┃|╭╮╰╯┌┐└┘"


def _blocks(text: str) -> list[list[str]]:
    """tyro's error box as blocks of lines (split at its horizontal rules), borders removed."""
    blocks: list[list[str]] = [[]]
    for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines():
        line = line.strip().strip(_BORDER).strip()
        if not line:
            continue
        if set(line) <= set("─━-═") or line.startswith("─"):  # a rule (the top one with the box's title)
            title = "" if set(line) <= set("─━-═") else line.strip("─━ ")
            if blocks[-1]:
                blocks.append([])
            if title:  # the box's top edge carries its title
                blocks[-1].append(title)
                blocks.append([])
            continue
        blocks[-1].append(line)
    return [b for b in blocks if b]


def reduce_message(text: str, module: str = "") -> str:
    """The parser's output (tyro's multi-line error box, or our ``error: field: problem. Fix: fix``) as one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("error: ")]
    if ours:
        return _tidy(ours[-1][len("error: "):])
    blocks = _blocks(text)
    body = [b for b in blocks if not b[0].startswith("For full helptext")]
    if len(body) >= 2 and len(body[0]) == 1:  # the title, then the message
        body = body[1:]
    if not body:
        return _tidy(" ".join(lines[:3]))
    msg = " ".join(body[0])
    helpme = f"python -m {module} --help" if module else "--help"
    if msg.startswith(("Unrecognized options:", "Unrecognized or misplaced options:")):
        flags = msg.split(":", 1)[1].strip()
        similar = [b[1].split()[0] for b in body[1:] if len(b) > 1 and
                   (b[0] == "Perhaps you meant:" or b[0].startswith("Arguments similar to"))]
        fix = f"did you mean {', '.join(similar)}? ({helpme} lists the options)" if similar else \
            f"drop {'them' if ',' in flags else 'it'}, or use an option {helpme} lists"
        return f"unrecognized option{'s' if ',' in flags else ''} {flags}. Fix: {fix}"
    m = re.match(r"Error parsing (--[\w.-]+): (.*)", msg)
    if m:  # a value of the wrong type: name the field, its type and default
        flag, problem = m.groups()
        field = flag[2:].replace("-", "_")
        helptext = next((b for b in body[1:] if b[0].startswith("Argument helptext")), [])
        usage = next((ln for ln in helptext[1:] if ln.startswith(flag)), "")
        kind = usage[len(flag):].strip()
        default = next((ln.strip("()") for ln in helptext if ln.startswith("(default:")), "")
        return _tidy(f"{field}: {problem}. Fix: pass {flag} {_describe(kind)}" +
                     (f" ({default})" if default else ""))
    m = re.match(r"Missing value for argument '(--[\w.-]+)'", msg)
    if m:
        return (f"{msg.rstrip('.')}. Fix: give {m.group(1)} a value (one that starts with -- attached with =: "
                f"{m.group(1)}='--x 3')")
    m = re.match(r"Error parsing [\w.]+: (.*)", msg)  # a section's own check (ConfigError in __post_init__)
    if m:
        return _tidy(m.group(1))
    return _tidy(msg)


def _tidy(msg: str) -> str:
    """One line; long lists of known names cut (the message keeps its 'did you mean')."""
    msg = " ".join(msg.split())
    msg = re.sub(r"\s*Known: .*?(?=\.? Fix: |$)", "", msg)
    return re.sub(r"([.?])\. Fix:", r"\1 Fix:", msg)


def machine_dependent(msg: str) -> bool:
    """Whether ``msg`` is a check against this machine's devices (not an error for a task run elsewhere)."""
    return msg.split(":", 1)[0] in MACHINE_FIELDS and "JAX sees" in msg


# -- a sweep's tasks -------------------------------------------------------------------------------------------------

def compress(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5] -> "0-2,5"``."""
    idx, parts, start = sorted(set(indices)), [], None
    for i, x in enumerate(idx):
        start = x if start is None else start
        if i + 1 == len(idx) or idx[i + 1] != x + 1:
            parts.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ",".join(parts)


def _what(tasks: Sequence[Mapping], points: Mapping[int, str]) -> str:
    """The grid points and seeds of ``tasks``: ``learning_rate=abc, seeds 0-1``."""
    names, seeds = [], set()
    for t in tasks:
        for m in t.get("members", []):
            name = points.get(m["point"], f"point {m['point']}")
            if name not in names:
                names.append(name)
            seeds.add(m["seed"])
    parts = [] if names in ([], ["default"]) else \
        ["; ".join(names) if len(names) <= 3 else f"{len(names)} grid points"]
    if seeds:
        parts.append(f"seed{'s' if len(seeds) > 1 else ''} {compress(seeds)}")
    return ", ".join(parts)


def group(messages: Mapping[int, str], tasks: Mapping[int, Mapping], points: Mapping[int, str]) -> list[str]:
    """``{task index: message}`` as one line per distinct message: ``task 3 (lr=abc, seed 1): msg`` /
    ``tasks 0-7 (...): msg``."""
    by_msg: dict[str, list[int]] = {}
    for i, msg in sorted(messages.items()):
        by_msg.setdefault(msg, []).append(i)
    out = []
    for msg, idx in by_msg.items():
        what = _what([tasks[i] for i in idx], points)
        out.append(f"task{'s' if len(idx) > 1 else ''} {compress(idx)}{f' ({what})' if what else ''}: {msg}")
    return out


def check_tasks(module: str, tasks: Sequence[Mapping], argv_of, points: Mapping[int, str],
                stream=None) -> bool:
    """Parses every task's command (``argv_of(task)``: what follows ``python -m module``) with the experiment's
    parser; raises :class:`TasksInvalid` (one line per distinct problem) if any fails, else prints notes (checks
    left to the node, a module that cannot be checked) to ``stream`` and returns whether the commands were
    checked (False: the module declares no SPEC)."""
    stream = stream or sys.stdout
    spec = load_spec(module)
    if spec is None:
        print(f"note: {module} declares no SPEC (jaxrl_pref.cli.Experiment): its task commands are not checked "
              "before they run", file=stream)
        return False
    errors, notes = {}, {}
    for t in tasks:
        msg = check_argv(spec, argv_of(t))
        if msg is not None:
            (notes if machine_dependent(msg) else errors)[t["index"]] = msg
    by_index = {t["index"]: t for t in tasks}
    for line in group(notes, by_index, points):
        print(f"note: {line} (this machine's devices; checked again when the task starts on its node)", file=stream)
    if errors:
        raise TasksInvalid(group(errors, by_index, points))
    return True
