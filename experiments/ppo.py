"""Train PPO on a JAX (gymnax) environment: ``python -m experiments.ppo --env CartPole-v1 --num-seeds 8``.

Every :class:`agents.ppo.Config` field is a flag (``--help`` lists them all), plus the run options below. All seeds
train in one compiled program (``vmap``); the run is cut into chunks of ``--checkpoint-every`` updates, each
followed by a checkpoint, so a killed or preempted job continues exactly where it stopped::

    python -m experiments.ppo --env CartPole-v1 --run-dir runs/cp --num-seeds 8
    # ... killed, preempted (SIGTERM: the current chunk is finished and saved first) ...
    python -m experiments.ppo --resume runs/cp          # same options, read back from runs/cp/config.json
    python -m experiments.ppo --run-dir runs/cp --resume  # same thing; starts fresh if runs/cp has no checkpoint

Outputs (``--run-dir``, default ``runs/ppo-<env>-<timestamp>``): ``config.json``, ``metrics.csv``/``metrics.jsonl``
(every update of every seed), ``learning_curve.png``, ``tb/`` (tensorboard) and ``checkpoints/``.

Exit status: 0 done; 2 bad option or unusable checkpoint (message names the option and the fix); 1 training
diverged (NaN loss; the last good checkpoint is kept); 128+signal when stopped by SIGTERM/SIGINT after saving.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from jaxrl_pref.runner import run_experiment, run_for_cli, use_sync_cpu_dispatch

use_sync_cpu_dispatch()  # before anything creates the CPU backend (jax#25861: callbacks + async dispatch can hang)
if __name__ == "__main__":  # --distributed: join the other processes before anything creates the backend
    from jaxrl_pref import distributed as _distributed
    try:
        _distributed.initialize_if_requested(sys.argv[1:])
    except ValueError as _e:  # ConfigError
        print(f"error: {_e}", file=sys.stderr)
        raise SystemExit(2) from None

from agents import ppo  # noqa: E402 -- after the dispatch setting
from jaxrl_pref.config import ConfigError, RunOptions, cli, require  # noqa: E402

ALIASES = {"--env": "env_name"}
_RESUME_HERE = ""  # value of a bare --resume: the run in --run-dir


@dataclasses.dataclass(frozen=True)
class Options(RunOptions, ppo.Config):
    """PPO configuration plus how to run it (seeds, outputs, checkpoints)."""
    resume: Optional[str] = None
    """Continue a run from its latest checkpoint: '--resume RUN_DIR' (options are read from RUN_DIR/config.json;
    any option given explicitly must match), or a bare '--resume' for the run in --run-dir (starts fresh when it
    has no checkpoint yet)."""
    per_seed: bool = False
    """Also write per-seed curves (seed_<i>/...) to tensorboard."""
    hp_values: Optional[str] = None
    """Vmapped hyperparameter sweep inside one run: JSON {field: [one value per seed]} for fields in
    ppo.HPARAM_FIELDS, e.g. '{"learning_rate": [1e-4, 3e-4]}' with --num-seeds 2 (seed i uses value i)."""
    distributed: bool = False
    """Multi-process data parallelism: call jax.distributed.initialize (coordinator/process count/id from
    --coordinator/--num-processes/--process-id, else the Slurm step, else JAX's detection on TPU pods/GKE/MPI) and
    use --num-devices devices across all processes. Process 0 writes logs and metrics; every process writes its
    checkpoint shards (use a shared --run-dir)."""
    coordinator: Optional[str] = None
    """host:port of process 0 for --distributed (default: from Slurm / JAX's detection)."""
    num_processes: Optional[int] = None
    """Number of processes for --distributed (default: from Slurm / JAX's detection)."""
    process_id: Optional[int] = None
    """This process's index for --distributed (default: from Slurm / JAX's detection)."""

    def validate(self) -> None:
        super().validate()
        self.validate_run()
        if self.hp_values is not None:
            self.hp_overrides()  # validates
        import jax
        n = len(jax.devices())
        require(self.num_devices <= n, "num_devices",
                f"asked for {self.num_devices} devices but JAX sees {n} ({jax.devices()[0].platform})",
                "lower --num-devices, or on CPU start Python with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={self.num_devices}")

    def hp_overrides(self) -> dict:
        """``--hp-values`` parsed and checked: {field: [num_seeds floats]}."""
        try:
            vals = json.loads(self.hp_values)
        except ValueError as e:
            raise ConfigError("hp_values", f"is not JSON ({e})", """pass e.g. '{"learning_rate": [1e-4, 3e-4]}'""") from None
        require(isinstance(vals, dict) and bool(vals), "hp_values", f"must be a JSON object, got {self.hp_values!r}",
                """pass e.g. '{"learning_rate": [1e-4, 3e-4]}'""")
        for k, v in vals.items():
            require(k in ppo.HPARAM_FIELDS, "hp_values", f"{k!r} cannot be vmapped",
                    f"use fields among {list(ppo.HPARAM_FIELDS)}; other fields need separate runs")
            require(isinstance(v, list) and len(v) == self.num_seeds
                    and all(isinstance(x, (int, float)) for x in v), "hp_values",
                    f"{k} needs one number per seed ({self.num_seeds}), got {v!r}",
                    f"give {self.num_seeds} values or set --num-seeds {len(v) if isinstance(v, list) else 1}")
        return {k: [float(x) for x in v] for k, v in vals.items()}

    def agent_config(self) -> ppo.Config:
        return ppo.Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ppo.Config)})


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(Options) if f.name not in
                   {g.name for g in dataclasses.fields(ppo.Config)})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _as_args(name: str, value) -> list[str]:
    """CLI tokens reproducing ``value`` for field ``name`` (used to replay a saved config)."""
    if isinstance(value, bool):
        return [_flag(name), str(value)]
    if isinstance(value, (list, tuple)):
        return [_flag(name), *map(str, value)]
    if isinstance(value, float):
        return [f"{_flag(name)}={value!r}"]
    return [f"{_flag(name)}={value}"]


def _preprocess(argv: Sequence[str]) -> tuple[list[str], Optional[str]]:
    """Bare boolean-ish flags -> explicit values; returns (argv, resume path or None)."""
    out, resume_path = [], None
    argv = list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        bare = nxt is None or nxt.startswith("--")
        if a == "--resume":
            if bare:
                out.append(f"--resume={_RESUME_HERE}")
            else:
                out += ["--resume", nxt]
                resume_path = nxt
                i += 1
        elif a.startswith("--resume="):
            out.append(a)
            resume_path = a.split("=", 1)[1] or None
        elif a in ("--no-resume", "--progress", "--per-seed", "--distributed") and bare:
            out += [a, "True"]
        else:
            out.append(a)
        i += 1
    return out, resume_path


def _replay_saved(resume_path: str) -> list[str]:
    """Options of the run in ``resume_path`` as CLI tokens (to prepend: explicit flags given later win)."""
    cfg_file = Path(resume_path) / "config.json"
    if not cfg_file.is_file():
        raise ConfigError("resume", f"{resume_path} is not a run directory (no config.json there)",
                          "pass the --run-dir of an earlier run, or leave out --resume to start a new one")
    try:
        saved = json.loads(cfg_file.read_text())
        config, run = saved["config"], saved["run"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError("resume", f"{cfg_file} is unreadable ({e})",
                          "start a new run, or restore that file") from None
    fields = {f.name for f in dataclasses.fields(Options)}
    tokens = []
    for k, v in config.items():
        if k in fields:
            tokens += _as_args(k, v)
    for k in ("num_seeds", "seed", "checkpoint_every", "log_every"):
        if k in run:
            tokens += _as_args(k, run[k])
    if run.get("hp_batched") and isinstance(run.get("hp"), dict):  # a --hp-values run: replay the varied fields
        varied = {k.lstrip("."): v for k, v in run["hp"].items()
                  if isinstance(v, list) and len(set(v)) > 1 and k.lstrip(".") in ppo.HPARAM_FIELDS}
        if varied:
            tokens += ["--hp-values", json.dumps(varied)]
    return tokens + ["--run-dir", str(resume_path)]


def parse(argv: Optional[Sequence[str]] = None) -> Options:
    """Parses command-line options; bad values exit with status 2 and a message naming the option."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, resume_path = _preprocess(argv)
    if resume_path is not None and not any(a in ("-h", "--help") for a in argv):
        try:
            argv = _replay_saved(resume_path) + argv
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    return cli(Options, argv, description=__doc__.split("\n\n")[0], aliases=ALIASES)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from jaxrl_pref import distributed
    try:  # before parsing: validation looks at jax.devices(), which must already be the global device list
        distributed.initialize_if_requested(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts = parse(argv)
    if opts.resume and opts.run_dir and Path(opts.resume).resolve() != Path(opts.run_dir).resolve():
        print(f"error: {ConfigError('run_dir', f'--resume {opts.resume} and --run-dir {opts.run_dir} differ', 'pass only --resume RUN_DIR, or --run-dir RUN_DIR with a bare --resume')}",
              file=sys.stderr)
        return 2
    cfg = opts.agent_config()
    run_dir = opts.run_dir or f"runs/ppo-{opts.env_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume = True if opts.resume is not None else (False if opts.no_resume else None)
    hp = ppo.hparams(cfg, **opts.hp_overrides()) if opts.hp_values is not None else None
    status, _ = run_for_cli(
        lambda: run_experiment(ppo.make_trainer, cfg, run_dir=run_dir, num_seeds=opts.num_seeds, seed=opts.seed,
                               log_every=opts.log_every, checkpoint_every=opts.checkpoint_every, resume=resume,
                               progress=opts.progress, per_seed=opts.per_seed, agent="ppo",
                               hp=hp, hp_batched=hp is not None),
        module="experiments.ppo", run_dir=run_dir)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
