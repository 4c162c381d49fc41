"""Train SQIRL on a sparse-reward task: ``python -m experiments.sqirl --env DeepSea-8 --planning-depth 2``.

Every :class:`agents.sqirl.Config` field is a flag (``--help`` lists them all), plus the run options below. JAX
envs train in one compiled program per chunk (seeds vmapped) through :func:`jaxrl_pref.runner.run_experiment`;
one update is one timestep of the horizon (so ``--checkpoint-every`` counts timesteps)::

    python -m experiments.sqirl --env DeepSea-8 --episodes-per-timestep 128 --num-seeds 4 --run-dir runs/ds8
    python -m experiments.sqirl --resume runs/ds8             # continue (options read from runs/ds8/config.json)
    python -m experiments.sqirl --env KeyDoor-5 --host        # same env through the host-env loop (JaxHostEnv)
    python -m experiments.sqirl --env MiniHack-Room-5x5-v0 --horizon 50 --episodes-per-timestep 16  # env pool

Host envs (NetHack/MiniHack pool, or ``--host``) run one seed per process with the same agent ``act``/``learn``.
Outputs (``--run-dir``, default ``runs/sqirl-<env>-<timestamp>``): ``config.json``, ``metrics.csv``/``.jsonl``,
``learning_curve.png`` (greedy-policy return per timestep), ``tb/`` and ``checkpoints/``. Logged per timestep:
``episode_return``/``episode_success`` of the greedy time-indexed policy, ``explore/*`` of the exploration episodes,
``loss/q_head*``, ``experience_steps`` (env steps of the episodes used so far).

Exit status: 0 done; 2 bad option (message names the option and the fix); 1 training diverged; 128+signal when
stopped by SIGTERM/SIGINT after saving.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from jaxrl_pref.runner import run_experiment, run_for_cli, use_sync_cpu_dispatch

use_sync_cpu_dispatch()  # before the CPU backend exists (jax#25861)

import envs  # noqa: E402
from agents import sqirl  # noqa: E402
from jaxrl_pref.config import ConfigError, RunOptions, cli, require  # noqa: E402

ALIASES = {"--env": "env_name"}
RUN_KEYS = ("num_seeds", "seed", "checkpoint_every", "log_every", "host")


@dataclasses.dataclass(frozen=True)
class Options(RunOptions, sqirl.Config):
    """SQIRL configuration plus how to run it."""
    log_every: int = 1
    """Log every this many timesteps."""
    checkpoint_every: int = 50
    """Timesteps per compiled chunk; a checkpoint is saved after each."""
    host: bool = False
    """Run a JAX env through the host-env loop (jaxrl_pref.sebulba.JaxHostEnv), as NetHack/MiniHack pools run."""

    def validate(self) -> None:
        super().validate()
        self.validate_run()
        if self.host or sqirl.is_host_env(self.env_name):
            require(self.num_seeds == 1, "num_seeds", f"host envs train one seed per process, got {self.num_seeds}",
                    "pass --num-seeds 1 and start one process per --seed")

    def agent_config(self) -> sqirl.Config:
        return sqirl.Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(sqirl.Config)})


def _tokens(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)] if value else []
    return [f"{flag}={value!r}" if isinstance(value, float) else f"{flag}={value}"]


def _saved_args(run_dir: str) -> list[str]:
    f = Path(run_dir) / "config.json"
    if not f.exists():
        raise ConfigError("resume", f"{f} does not exist", "pass the --run-dir of an earlier SQIRL run")
    saved = json.loads(f.read_text())
    args = []
    for k, v in saved.get("config", {}).items():
        args += _tokens(k, v)
    for k in RUN_KEYS:
        if k in saved.get("run", {}):
            args += _tokens(k, saved["run"][k])
    return args + ["--run-dir", str(run_dir)]


def parse(argv: Optional[Sequence[str]] = None) -> Options:
    argv = list(sys.argv[1:] if argv is None else argv)
    bare = lambda i: i + 1 >= len(argv) or argv[i + 1].startswith("--")  # noqa: E731
    argv = [x for i, a in enumerate(argv)
            for x in ((a, "True") if a in ("--host", "--no-resume", "--progress") and bare(i) else (a,))]
    resume = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--resume"), None)
    resume = resume or next((a.split("=", 1)[1] for a in argv if a.startswith("--resume=")), None)
    if resume and not any(a in ("-h", "--help") for a in argv):
        try:
            argv = _saved_args(resume) + argv
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    return cli(Options, argv, description=__doc__.split("\n\n")[0], aliases=ALIASES)


def make_host_env(opts: Options):
    """The host env for ``opts``: a NetHack/MiniHack pool, or a JAX env behind JaxHostEnv (``--host``)."""
    if sqirl.is_host_env(opts.env_name):
        pool, _ = envs.make(opts.env_name, num_envs=opts.episodes_per_timestep, seed=opts.seed)
        return pool
    from jaxrl_pref.sebulba import JaxHostEnv
    return JaxHostEnv(opts.env_name, opts.episodes_per_timestep, seed=opts.seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse(argv)
    cfg = opts.agent_config()
    run_dir = opts.run_dir or f"runs/sqirl-{opts.env_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume = True if opts.resume else (False if opts.no_resume else None)
    host = opts.host or sqirl.is_host_env(opts.env_name)
    env = None

    def run():
        nonlocal env
        if host:
            env = make_host_env(opts)
            horizon = cfg.resolved_horizon()
            make = lambda c, log_fn=None, log_every=1: sqirl.HostTrainer(c, env, log_fn, log_every,  # noqa: E731
                                                                          horizon=horizon)
        else:
            make = sqirl.make_trainer
        return run_experiment(make, cfg, run_dir=run_dir, num_seeds=opts.num_seeds, seed=opts.seed,
                              log_every=opts.log_every, checkpoint_every=opts.checkpoint_every, resume=resume,
                              progress=opts.progress, num_updates=cfg.num_updates,
                              steps_per_update=cfg.steps_per_update, agent="sqirl", run_info={"host": host})
    try:
        status, result = run_for_cli(run, module="experiments.sqirl", run_dir=run_dir, unit="timestep",
                                     errors=(ImportError,))
    finally:
        if env is not None:
            env.close()
    if status:
        return status
    m = result.metrics
    if {"episode_success", "episode_return", "experience_steps"} <= set(m) and m["episode_success"].size:
        import numpy as np
        print(f"final greedy policy: success {np.nanmean(m['episode_success'][:, -1]):.3f}, return "
              f"{np.nanmean(m['episode_return'][:, -1]):.3f} (mean over {m['episode_return'].shape[0]} seed(s)); "
              f"experience steps per seed {np.mean(m['experience_steps'][:, -1]):,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
