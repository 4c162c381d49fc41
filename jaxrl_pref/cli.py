"""One command line for every experiment: options composed from config sections, ``--resume``, validation, exit codes.

An experiment declares an :class:`Experiment`: its option sections (typed dataclasses: the agent's config, the env
pool's, the reward model's, the run options), its per-env defaults and a ``train(opts, run_dir) -> RunResult``.
:func:`main` does the rest the same way for every agent:

* the flags are the sections' field names (``--learning-rate``, ``--num-envs``; ``--env`` for ``--env-name``);
  ``--help`` lists them section by section; a bare boolean flag means True;
* defaults come from the dataclasses, then the experiment's per-env defaults (e.g. PPO's sizes for the NetHack
  pool), then, with ``--resume RUN_DIR``, the options saved in ``RUN_DIR/config.json``; flags given override all;
* validation happens before anything is built: each section checks itself when constructed, the experiment
  derives the sections other options imply (``resolve``, e.g. ``--method motif`` -> the ranking model; returned, not
  written into the options) and then checks the combination (``error: <field>: <problem>. Fix: <fix>``, exit 2);
* the run dir is checked before anything is built (creatable, writable, not a file, 50 MB free: exit 2 naming the
  fix); ``--resume`` of another agent's run names the command that resumes it (exit 2);
* ``--distributed`` joins the other processes before JAX starts; SIGTERM/SIGINT finish the chunk, save and exit
  ``128 + signal`` (a second SIGINT aborts at once without saving, 130); a NaN loss exits 1; a bad option or
  unusable checkpoint exits 2; a write that fails mid-run (disk full) exits 3, keeping the last good checkpoint;
* every expected failure is one ``error: ...`` line; ``--debug`` (or ``JAXRL_DEBUG=1``) adds its traceback.

Sections marked ``host_only`` (the NetHack/MiniHack pool and its network) apply to host envs only: for a JAX env
they are left out of the saved config, and setting one of them is an error that names it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Callable, Optional, Sequence

from jaxrl_pref.config import ConfigError, RunOptions, require

__all__ = ["Section", "Experiment", "Options", "parse", "main", "setup"]

ENV_FLAGS = ("--env", "--env-name", "--env_name")
_RESUME_HERE = ""  # the value of a bare --resume: the run in --run-dir


def setup() -> None:
    """Entry points call this before importing JAX code: synchronous CPU dispatch (jax#25861) and, with
    ``--distributed`` on the command line, joining the other processes before the backend exists."""
    from jaxrl_pref import distributed
    from jaxrl_pref.runner import use_sync_cpu_dispatch
    use_sync_cpu_dispatch()
    if _deterministic_requested(sys.argv[1:]):
        use_deterministic_kernels()
    try:
        distributed.initialize_if_requested(sys.argv[1:])
    except ConfigError as e:
        _print_error(e, sys.argv[1:])
        raise SystemExit(2) from None


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def use_deterministic_kernels() -> None:
    """Asks XLA for deterministic GPU kernels (takes effect only before JAX creates its backend)."""
    import os
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_FLAG not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + DETERMINISTIC_FLAG).strip()


def _deterministic_requested(argv: Sequence[str]) -> bool:
    """``--deterministic`` on the command line, or in the config of the run ``--resume`` names."""
    from jaxrl_pref.distributed import flag_on
    if flag_on(argv, "--deterministic"):
        return True
    from jaxrl_pref import run_config
    resume = _resume_path(argv)
    return resume is not None and bool(run_config.run_settings(resume).get("deterministic"))


def _resume_path(argv: Sequence[str]) -> Optional[str]:
    out = None
    for i, a in enumerate(argv):
        if a.startswith("--resume="):
            out = a.split("=", 1)[1] or None
        elif a == "--resume" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out = argv[i + 1]
    return out


def apply_run_options(run: RunOptions) -> None:
    """Sets what the run options change in JAX itself: the matmul precision; warns when --deterministic came too
    late to take effect (JAX already started without it)."""
    import os
    import jax
    jax.config.update("jax_default_matmul_precision",
                      None if run.matmul_precision == "default" else run.matmul_precision)
    if run.deterministic and DETERMINISTIC_FLAG not in os.environ.get("XLA_FLAGS", ""):
        print("warning: --deterministic was not set before JAX started (set it on the command line of a fresh "
              f"process, or XLA_FLAGS={DETERMINISTIC_FLAG}); GPU kernels may not be deterministic", file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class Section:
    """One group of options: ``name`` (the attribute on :class:`Options`), its dataclass, whether it applies to
    NetHack/MiniHack pool envs only, and whether it is part of the saved (and on resume compared) config."""
    name: str
    cls: type
    host_only: bool = False
    saved: bool = True
    saved_if_set: bool = False
    """Save (and compare on resume) only the fields that differ from their defaults: a section added after runs
    were saved (e.g. the exploration bonus) leaves those runs resumable when it is not used."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What an entry point declares; :func:`main` does the rest."""
    name: str                                       # agent name: config.json "agent", runs/<name>-<env>-<time>
    module: str                                     # python -m <module> (printed in the resume hint)
    doc: str                                        # the module docstring: its first paragraph heads --help
    sections: tuple[Section, ...]                   # the last one is the run options (a RunOptions)
    train: Callable[["Options", str], Any]          # (options, run_dir) -> RunResult
    default_env: str
    defaults: Callable[[str, bool], dict] = lambda env, host: {}  # (env, host) -> {field: default}
    resolve: Optional[Callable[["Options"], dict]] = None        # sections other options imply: {name: section}
    check: Optional[Callable[["Options"], None]] = None          # checks across sections (raise ConfigError)
    hparam_fields: tuple[str, ...] = ()             # fields --hp-values may vmap
    unit: str = "update"
    errors: tuple = ()                              # further exceptions that mean "exit 2 with the message"


class Options:
    """Parsed options: one attribute per section (``opts.ppo``, ``opts.run``...), and each field by its own name
    (``opts.num_envs``). ``config`` is the flat view of the sections that apply, saved as ``config.json``'s
    ``config`` and compared on resume."""

    def __init__(self, spec: Experiment, sections: dict, host: bool):
        self.spec, self.sections, self.host = spec, sections, host

    def __getattr__(self, name):
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        for s in sections.values():
            if name in {f.name for f in dataclasses.fields(s)}:
                return getattr(s, name)
        raise AttributeError(name)

    @property
    def run(self) -> RunOptions:
        return self.sections[self.spec.sections[-1].name]

    @property
    def env_name(self) -> str:
        return self.__getattr__("env_name")

    def applies(self, section: Section) -> bool:
        return self.host or not section.host_only

    @property
    def config(self):
        """One frozen dataclass holding every field of the sections that apply (the run options excepted)."""
        parts = [(s, self.sections[s.name]) for s in self.spec.sections[:-1] if self.applies(s) and s.saved]
        fields = [f for s, obj in parts for f in dataclasses.fields(obj)
                  if not s.saved_if_set or getattr(obj, f.name) != f.default]
        cls = dataclasses.make_dataclass(f"{self.spec.name}_config", [(f.name, f.type) for f in fields], frozen=True)
        values = {f.name: getattr(obj, f.name) for _, obj in parts for f in dataclasses.fields(obj)}
        return cls(**{f.name: values[f.name] for f in fields})

    def runner_kwargs(self, run_dir) -> dict:
        """The run options as :func:`jaxrl_pref.runner.run_experiment` keywords."""
        r = self.run
        return dict(run_dir=run_dir, num_seeds=r.num_seeds, seed=r.seed, log_every=r.log_every,
                    checkpoint_every=r.checkpoint_every, progress=r.progress, per_seed=r.per_seed,
                    resume=True if r.resume is not None else (False if r.no_resume else None),
                    agent=self.spec.name, module=self.spec.module)

    def run_info(self) -> dict:
        """Run settings recorded in config.json's ``run`` next to the runner's own."""
        return {"matmul_precision": self.run.matmul_precision, "deterministic": self.run.deterministic}

    def default_run_dir(self) -> str:
        return self.run.run_dir or self.run.resume or \
            f"runs/{self.spec.name}-{self.env_name}-{time.strftime('%Y%m%d-%H%M%S')}"


# -- parsing ------------------------------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bool_fields(spec: Experiment) -> set:
    return {_flag(f.name) for s in spec.sections for f in dataclasses.fields(s.cls) if f.type in ("bool", bool)}


def _normalise(spec: Experiment, argv: Sequence[str]) -> tuple[list[str], Optional[str], Optional[str]]:
    """Aliases and bare flags made explicit; returns (argv, the --resume path or None, the --env value or None)."""
    bools, out, resume, env = _bool_fields(spec), [], None, None
    argv = list(argv)
    for i, a in enumerate(argv):
        bare = i + 1 >= len(argv) or argv[i + 1].startswith("--")
        name, eq, val = a.partition("=")
        if name in ENV_FLAGS:
            a = "--env-name" + eq + val
            env = val if eq else (None if bare else argv[i + 1])
        if name == "--resume":
            if eq:
                resume = val or None
            elif bare:
                a = f"--resume={_RESUME_HERE}"
            else:
                resume = argv[i + 1]
        out.append(a)
        if not eq and bare and name in bools:
            out.append("True")
    return out, resume, env


def _saved_options(resume_path: str, agent: Optional[str] = None) -> dict:
    """The options of the run in ``resume_path``: its config, its run settings and any section it saved apart.
    ``agent``: the agent resuming it; another agent's run is refused, naming the command that resumes it."""
    from jaxrl_pref import run_config
    fix = "start a new run, or restore that file"
    try:
        saved = run_config.read(resume_path)
    except run_config.UnreadableRunConfig as e:
        raise ConfigError("resume", str(e), fix) from None
    if saved is None:
        raise ConfigError("resume", f"{resume_path} is not a run directory (no config.json there)",
                          "pass the --run-dir of an earlier run, or leave out --resume to start a new one")
    try:
        config, run = dict(saved["config"]), dict(saved["run"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError("resume", f"{run_config.path(resume_path)} is unreadable ({e})", fix) from None
    from jaxrl_pref.runner import check_same_agent
    check_same_agent(saved, agent, resume_path)
    for v in run.values():  # sections an older version saved under run (e.g. run["heron"])
        if isinstance(v, dict) and not any(k.startswith(".") for k in v):
            config.update(v)
    config.update({k: run[k] for k in ("num_seeds", "seed", "checkpoint_every", "log_every", "host",
                                            "matmul_precision", "deterministic") if k in run})
    if run.get("hp_batched") and isinstance(run.get("hp"), dict):  # a --hp-values run: the varied fields
        varied = {k.lstrip("."): v for k, v in run["hp"].items() if isinstance(v, list) and len(set(v)) > 1}
        if varied:
            config["hp_values"] = json.dumps(varied)
    if config.get("network", "mlp") != "mlp" and "critic" not in config:
        config["critic"] = "shared"  # recurrent runs saved before agents.ppo.Config.critic had a shared core
    config["run_dir"] = str(resume_path)
    return config


def _defaults(spec: Experiment, overrides: dict) -> dict:
    """Each section's default instance: its dataclass defaults with ``overrides`` (by field name) applied."""
    out = {}
    for s in spec.sections:
        names = {f.name for f in dataclasses.fields(s.cls)}
        out[s.name] = s.cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if k in names})
    return out


def _section_type(spec: Experiment, host: bool, defaults: dict):
    """The nested dataclass tyro parses: one field per section, defaulting to ``defaults[section]``."""
    import tyro
    from typing import Annotated
    fields = []
    for s in spec.sections:
        doc = " ".join((s.cls.__doc__ or "").split("\n\n")[0].split())
        if s.host_only:
            doc += " (NetHack/MiniHack pool envs only" + (")" if host else "; not used with this env)")
        fields.append((s.name, Annotated[s.cls, tyro.conf.arg(help=doc)],
                       dataclasses.field(default=defaults[s.name])))
    return dataclasses.make_dataclass(f"{spec.name}_options", fields, frozen=True)


def parse(spec: Experiment, argv: Optional[Sequence[str]] = None) -> Options:
    """Parses and validates the command line; a bad value prints ``error: ...`` and exits with status 2."""
    import tyro
    from envs import registry
    argv, resume, env = _normalise(spec, list(sys.argv[1:] if argv is None else argv))
    helping = any(a in ("-h", "--help") for a in argv)
    try:
        saved = _saved_options(resume, spec.name) if resume is not None and not helping else {}
        env = env or saved.get("env_name") or spec.default_env
        entry = registry.find(env)  # an unknown id: check_name's error, once the flags are parsed
        host = entry is not None and entry.host  # the NetHack/MiniHack pool (host loop), not a JAX env
        flat_names = [f.name for s in spec.sections for f in dataclasses.fields(s.cls)]
        dup = {n for n in flat_names if flat_names.count(n) > 1}
        assert not dup, f"option names appear in two sections: {dup}"
        defaults = _defaults(spec, {"env_name": spec.default_env, **spec.defaults(env, host), **saved})
        with _one_line_value_errors(argv, spec.module):
            parsed = tyro.cli(_section_type(spec, host, defaults), args=argv, prog=f"python -m {spec.module}",
                              description=spec.doc.split("\n\n")[0] + " (--env is short for --env-name)",
                              config=(tyro.conf.FlagConversionOff, tyro.conf.OmitArgPrefixes))
        opts = Options(spec, {s.name: getattr(parsed, s.name) for s in spec.sections}, host)
        _check(opts, defaults)
    except ConfigError as e:
        _print_error(e, argv)
        raise SystemExit(2) from None
    return opts


class _SectionError(ConfigError):
    """A section's own check (its ``__post_init__``) refused a value while tyro built it; ``str`` is its message."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.field = message.split(":", 1)[0]


def _one_line_value_errors(argv: Sequence[str], module: str = "..."):
    """tyro draws a box of 5-10 lines around a ValueError (our ConfigError) raised while it builds a section; this
    turns that into the usual one ``error: <field>: <problem>. Fix: <fix>`` line (tyro's hook, a private API: where
    it is missing, tyro's box is printed)."""
    import contextlib
    try:
        from tyro import _errors
        on_parse_error, failure = _errors.on_parse_error, _errors.InstantiationFailure
    except (ImportError, AttributeError):
        return contextlib.nullcontext()

    def hook(event):
        if not (isinstance(event, failure) and isinstance(getattr(event, "message", None), str)):
            return
        arg = getattr(event, "argument", None)
        field = getattr(getattr(arg, "field", None), "intern_name", None)
        if arg is not None and field:  # a value tyro could not convert: name the option and what it takes
            flag = (getattr(getattr(arg, "lowered", None), "name_or_flags", None) or (_flag(field),))[0]
            kind = getattr(getattr(arg, "lowered", None), "metavar", None) or "a value of its type"
            raise ConfigError(field, event.message, f"pass {flag} {kind} (python -m {module} --help lists the options)")
        raise _SectionError(event.message)  # --debug: its traceback shows the section's (the chained one)
    return on_parse_error(hook)


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """``--debug`` in ``argv``, or ``JAXRL_DEBUG=1`` in the environment."""
    from jaxrl_pref.distributed import flag_on
    from jaxrl_pref.logging import debug_mode
    return debug_mode() or flag_on(argv, "--debug")


def _print_error(e: BaseException, argv: Sequence[str] = ()) -> None:
    """``error: <e>`` on stderr; its traceback first with ``--debug`` / ``JAXRL_DEBUG=1``."""
    if debug_requested(argv):
        import traceback
        traceback.print_exception(e)
    print(f"error: {e}", file=sys.stderr)


def _check(opts: Options, defaults: dict) -> None:
    spec = opts.spec
    from envs import check_name
    check_name(opts.env_name)
    for s in spec.sections:  # a pool option set for a JAX env
        if not opts.applies(s):
            for f in dataclasses.fields(s.cls):
                require(getattr(opts.sections[s.name], f.name) == getattr(defaults[s.name], f.name), f.name,
                        f"applies to NetHack/MiniHack pool envs only, and {opts.env_name} is a JAX env",
                        f"drop {_flag(f.name)}, or pass a NetHack/MiniHack --env")
    opts.run.hp_overrides(spec.hparam_fields)  # validates --hp-values
    if opts.host:
        require(opts.run.num_seeds == 1, "num_seeds",
                f"host-env runs train one seed per process, got {opts.run.num_seeds}",
                "pass --num-seeds 1 and start one process per seed (--seed 0, --seed 1, ...)")
        require(opts.run.hp_values is None, "hp_values", "host-env runs cannot vmap hyperparameters",
                "start one process per value")
    if spec.resolve is not None:  # e.g. --method motif implies the ranking model: what is saved and trained
        opts.sections.update(spec.resolve(opts))
    if spec.check is not None:
        spec.check(opts)


def entry_points(spec: Experiment):
    """``(parse, main)`` of an experiment module: ``parse(argv=None) -> Options`` and ``main(argv=None) -> exit
    status``, :func:`parse` and :func:`main` bound to ``spec``. An entry point is its spec and these two lines::

        parse, main = cli.entry_points(SPEC)
        if __name__ == "__main__":
            raise SystemExit(main())
    """
    def parse_argv(argv: Optional[Sequence[str]] = None) -> Options:
        return parse(spec, argv)

    def main_argv(argv: Optional[Sequence[str]] = None) -> int:
        return main(spec, argv)

    parse_argv.__doc__ = f"The options of ``python -m {spec.module}`` from ``argv`` (default: the command line)."
    main_argv.__doc__ = f"``python -m {spec.module}``: parse ``argv``, train, return the exit status."
    return parse_argv, main_argv


def main(spec: Experiment, argv: Optional[Sequence[str]] = None) -> int:
    """Parses ``argv``, trains (``spec.train``) and returns the exit status (see the module docstring)."""
    from jaxrl_pref import distributed
    from jaxrl_pref.runner import _remove_empty, check_run_dir, exit_now_if_aborted, run_for_cli
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # before parsing: validation may look at jax.devices(), which must already be the global list
        distributed.initialize_if_requested(argv)
    except ConfigError as e:
        _print_error(e, argv)
        return 2
    opts = parse(spec, argv)
    if opts.run.debug:
        import os
        os.environ["JAXRL_DEBUG"] = "1"  # what the runner and the writers look at
    apply_run_options(opts.run)
    run_dir = opts.default_run_dir()
    try:  # before anything is built (an annotator started, a dataset collected, a program compiled)
        created = check_run_dir(run_dir)
    except ConfigError as e:
        _print_error(e, argv)
        return 2
    status, _ = run_for_cli(lambda: spec.train(opts, run_dir), module=spec.module, run_dir=run_dir,
                            unit=spec.unit, errors=spec.errors)
    if status != 0:  # refused (or stopped) before it wrote anything: no new empty directory left behind
        _remove_empty(created)
    exit_now_if_aborted(status)  # a second Ctrl-C: its chunk still computes in a thread
    return status
