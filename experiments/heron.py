"""Train HERON (PPO on a preference reward model from ranked reward factors) on a JAX env.

    python -m experiments.heron --env Pendulum-v1 --factors 'angle>speed>energy' --margins 0.5 1 1 --num-seeds 4
    python -m experiments.heron --env MountainCarContinuous-v0 --factors goal energy --margins 0 1
    python -m experiments.heron --resume runs/heron-x        # continue a run (options read from its config.json)

``--factors`` ranks the env's reward factors, most important first, as ``'a>b>c'`` (quote it: ``>`` is a shell
redirect) or as separate words; ``--margins`` gives one margin per ranked factor (a multiple of the factor's std
over the reward model's buffer, or absolute with ``--absolute-margins``). Every :class:`agents.heron.Config` field
is a flag (``--help`` lists them all). Training runs through :func:`jaxrl_pref.runner.run_experiment`: seeds are
vmapped, the run is checkpointed every ``--checkpoint-every`` updates and resumes exactly; outputs in ``--run-dir``
(``config.json``, ``metrics.csv``, ``learning_curve.png``, ``tb/``, ``checkpoints/``). Logged: the true
``episode_return``, per-episode factor totals (``episode_factor_*``) and the reward model's loss/accuracy/margins
(``reward/heron_*``).

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

from agents import heron  # noqa: E402
from jaxrl_pref.config import ConfigError, RunOptions, cli  # noqa: E402

ALIASES = {"--env": "env_name"}


@dataclasses.dataclass(frozen=True)
class Options(RunOptions, heron.Config):
    """HERON configuration plus how to run it."""

    def validate(self) -> None:
        super().validate()
        self.validate_run()

    def agent_config(self) -> heron.Config:
        return heron.Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(heron.Config)})


RUN_KEYS = ("num_seeds", "seed", "checkpoint_every", "log_every")


def _tokens(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)] if value else []
    return [f"{flag}={value!r}" if isinstance(value, float) else f"{flag}={value}"]


def _saved_args(run_dir: str) -> list[str]:
    f = Path(run_dir) / "config.json"
    if not f.is_file():
        raise ConfigError("resume", f"{run_dir} is not a run directory (no config.json there)",
                          "pass the --run-dir of an earlier run, or leave out --resume")
    saved = json.loads(f.read_text())
    fields = {x.name for x in dataclasses.fields(heron.Config)}
    out = [t for k, v in saved["config"].items() if k in fields for t in _tokens(k, v)]
    out += [t for k in RUN_KEYS if k in saved["run"] for t in _tokens(k, saved["run"][k])]
    return out + ["--run-dir", str(run_dir)]


def parse(argv: Optional[Sequence[str]] = None) -> Options:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--no-resume", "--progress", "--absolute-margins", "--random-margins"):
        argv = [x for i, a in enumerate(argv) for x in
                ([a, "True"] if a == flag and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else [a])]
    if "--resume" in argv and not any(a in ("-h", "--help") for a in argv):
        i = argv.index("--resume")
        try:
            argv = _saved_args(argv[i + 1]) + argv
        except (ConfigError, IndexError) as e:
            msg = e if isinstance(e, ConfigError) else ConfigError("resume", "needs a run directory",
                                                                   "pass --resume RUN_DIR")
            print(f"error: {msg}", file=sys.stderr)
            raise SystemExit(2) from None
    return cli(Options, argv, description=__doc__.split("\n\n")[0], aliases=ALIASES)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse(argv)
    cfg = opts.agent_config()
    run_dir = opts.resume or opts.run_dir or f"runs/heron-{opts.env_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume = True if opts.resume else (False if opts.no_resume else None)
    status, _ = run_for_cli(
        lambda: run_experiment(heron.make_trainer, cfg, run_dir=run_dir, num_seeds=opts.num_seeds, seed=opts.seed,
                               log_every=opts.log_every, checkpoint_every=opts.checkpoint_every, resume=resume,
                               progress=opts.progress, agent="heron"),
        module="experiments.heron", run_dir=run_dir)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
