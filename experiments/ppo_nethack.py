"""Train PPO on NetHack/MiniHack (host envs, Sebulba loop): ``python -m experiments.ppo_nethack --env NetHackScore-v0``.

Envs are stepped by a pool of worker processes (:class:`envs.nethack.NLEPool`); the jitted PPO ``act`` picks the
actions and the same jitted PPO update as the Anakin trainer learns (:class:`jaxrl_pref.sebulba.HostTrainer`).
Logging, checkpoints and resume go through :func:`jaxrl_pref.runner.run_experiment`, as in ``experiments.ppo``::

    python -m experiments.ppo_nethack --env MiniHack-Room-5x5-v0 --total-timesteps 200000 --run-dir runs/room
    python -m experiments.ppo_nethack --resume runs/room     # continues from the last checkpoint

Every field below is a flag (``--help`` lists them). One seed per process (host envs cannot be vmapped). A resumed
run restores the learner exactly but starts fresh episodes (the games themselves are not checkpointed). Needs the
``nle`` extra: ``pip install -e ".[nle]"``.

Exit status: 0 done; 2 bad option or unusable checkpoint; 1 training diverged; 128+signal when stopped by a signal.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from jaxrl_pref.runner import run_experiment, run_for_cli, use_sync_cpu_dispatch

use_sync_cpu_dispatch()  # before anything creates the CPU backend (jax#25861)

import envs  # noqa: E402
from agents import ppo  # noqa: E402
from experiments import ppo as ppo_exp  # noqa: E402
from jaxrl_pref.config import ConfigError, cli, require  # noqa: E402
from jaxrl_pref.networks import EncoderActorCritic, NetHackEncoder  # noqa: E402
from jaxrl_pref.sebulba import HostTrainer  # noqa: E402
from envs import nle_worker  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config(ppo.Config):
    """PPO on a NetHack/MiniHack pool. Defaults are sized for 2 CPU cores."""
    env_name: str = "NetHackScore-v0"
    num_envs: int = 16
    num_steps: int = 32
    total_timesteps: int = 1_000_000
    learning_rate: float = 3e-4
    update_epochs: int = 2
    num_minibatches: int = 2
    num_workers: int = 0
    """Env worker processes (0: one per CPU core, less one if host-envs > 0)."""
    host_envs: int = -1
    """Envs per group stepped by the training process itself while the workers step theirs (NLEPool host_envs):
    on few cores the host then works instead of waiting, and one worker process fewer shares the cores; those envs
    are not isolated in a worker process. -1 (auto), on machines with at most 2 cores unless num-workers is given:
    3/8 of a group (at least 1, at most all but one: 3 of 8, the best of 2, 3, 4 there, since the host also runs the
    policy and the pool's bookkeeping); else 0."""
    obs_keys: tuple[str, ...] = ("glyphs_crop", "blstats", "message")
    """Observation keys the pool produces (from glyphs, glyphs_crop, chars, chars_crop, blstats, message)."""
    encode_keys: tuple[str, ...] = ("glyphs_crop", "blstats")
    """Keys the policy network encodes (a subset of obs-keys; message is carried for reward models either way)."""
    crop: int = 9
    """Side of the glyph crop around the agent (odd)."""
    max_episode_steps: int = 0
    """Episode step limit (0: the task's default: 5000 NetHack, task-specific MiniHack)."""
    glyph_dim: int = 8
    channels: int = 16
    features: int = 64
    crop_conv: bool = False
    """Two 3x3 convs over the embedded crop (the glyph CNN). Off by default: on CPU, XLA runs convolutions inside
    the PPO minibatch scan ~10x slower than outside; turn on for GPU runs."""
    overlap: bool = False
    """Collect the next rollout while the previous one is learned from (one update of policy lag)."""
    env_groups: int = 2
    """Split the envs into this many groups and pipeline collection: the policy acts on one group while the
    workers step the other (2: neither the workers nor the learner wait within a rollout; see NLEPool.send)."""

    def validate(self) -> None:
        require(envs.nethack.is_host_env(self.env_name), "env_name",
                f"{self.env_name!r} is not a NetHack/MiniHack task",
                "pass --env NetHackScore-v0 (or another NetHack*-v0 / MiniHack-* task); JAX envs train with "
                "python -m experiments.ppo")
        super().validate()
        bad = [k for k in self.obs_keys if k not in nle_worker.OBS_KEYS]
        require(not bad and len(self.obs_keys) > 0, "obs_keys", f"unknown keys {bad}",
                f"choose from {' '.join(nle_worker.OBS_KEYS)}")
        require(set(self.encode_keys) <= set(self.obs_keys) and len(self.encode_keys) > 0, "encode_keys",
                f"{self.encode_keys} must be a non-empty subset of obs-keys {self.obs_keys}",
                "add the keys to --obs-keys or drop them from --encode-keys")
        require(self.crop >= 1 and self.crop % 2 == 1, "crop", f"must be odd and positive, got {self.crop}",
                "pass e.g. --crop 9")
        require(self.env_groups >= 1 and self.num_envs % self.env_groups == 0, "env_groups",
                f"must be >= 1 and divide num_envs={self.num_envs}, got {self.env_groups}",
                "pass --env-groups 1, or 2 with an even --num-envs")
        per_group = self.num_envs // self.env_groups
        require(-1 <= self.host_envs <= per_group, "host_envs",
                f"must be -1 (auto) or in [0, num_envs / env_groups = {per_group}], got {self.host_envs}",
                "pass --host-envs -1 (auto) or 0 (every env in a worker process)")
        host = self.resolved_host_envs()
        require(0 <= self.num_workers <= per_group - host, "num_workers",
                f"must be in [0, num_envs / env_groups - host_envs = {per_group - host}], got "
                f"{self.num_workers}", "pass e.g. --num-workers 0")
        require(self.max_episode_steps >= 0, "max_episode_steps", f"must be >= 0, got {self.max_episode_steps}",
                "pass 0 for the task's default")
        for name in ("glyph_dim", "channels", "features"):
            require(getattr(self, name) > 0, name, "must be positive", f"pass e.g. --{name.replace('_', '-')} 16")
        require(self.num_devices == 1, "num_devices", "the host loop runs on one device", "pass --num-devices 1")

    def resolved_host_envs(self) -> int:
        """``host_envs`` with -1 (auto) resolved for this machine (at most the envs in a group)."""
        if self.host_envs >= 0:
            return self.host_envs
        auto = (os.cpu_count() or 1) <= 2 and self.num_workers == 0  # an explicit --num-workers means no host envs
        per_group = self.num_envs // self.env_groups
        return min(max(1, 3 * per_group // 8), per_group - 1) if auto else 0


def make_pool(cfg: Config, seed: int = 0, **pool_kwargs):
    """The env pool ``cfg`` describes (a host env; close it when done); ``pool_kwargs`` go to
    :class:`envs.nethack.NLEPool` (e.g. ``spin``)."""
    env_kwargs = {"max_episode_steps": cfg.max_episode_steps} if cfg.max_episode_steps else {}
    pool, _ = envs.make(cfg.env_name, num_envs=cfg.num_envs, seed=seed, num_workers=cfg.num_workers or None,
                        obs_keys=cfg.obs_keys, crop=(cfg.crop, cfg.crop), env_kwargs=env_kwargs,
                        num_groups=cfg.env_groups, host_envs=cfg.resolved_host_envs(), **pool_kwargs)
    return pool


def make_network(cfg: Config, num_actions: int):
    return EncoderActorCritic(num_actions, NetHackEncoder(glyph_dim=cfg.glyph_dim, channels=cfg.channels,
                                                          features=cfg.features, keys=tuple(cfg.encode_keys),
                                                          crop_conv=cfg.crop_conv))


def make_trainer(cfg: Config, env, log_fn=None, log_every: int = 1, reward=None) -> HostTrainer:
    """A :class:`HostTrainer` on ``env`` with ``cfg``'s network (the runner's ``make_trainer``)."""
    return HostTrainer(cfg, env, reward=reward, log_fn=log_fn, log_every=log_every, overlap=cfg.overlap,
                       network=make_network(cfg, env.num_actions))


@dataclasses.dataclass(frozen=True)
class Options(Config, ppo_exp.Options):
    """NetHack PPO configuration plus how to run it (seed, outputs, checkpoints)."""

    def validate(self) -> None:
        super().validate()
        require(self.num_seeds == 1, "num_seeds", f"host-env runs train one seed per process, got {self.num_seeds}",
                "pass --num-seeds 1 and start one process per seed (--seed 0, --seed 1, ...)")

    def agent_config(self) -> Config:
        return Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Config)})


def _replay_saved(resume_path: str, options: type = None, sections: Sequence[str] = ()) -> list[str]:
    """Options of the run in ``resume_path`` as CLI tokens (explicit flags given later win): the agent config, the
    run's seed/cadence, and the option fields saved under ``run[section]`` for each of ``sections``."""
    cfg_file = Path(resume_path) / "config.json"
    try:
        saved = json.loads(cfg_file.read_text())
        config, run = saved["config"], saved["run"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError("resume", f"{resume_path} is not a readable run directory ({e})",
                          "pass the --run-dir of an earlier run, or leave out --resume to start a new one") from None
    fields = {f.name for f in dataclasses.fields(options or Options)}
    saved_options = dict(config)
    for section in sections:
        saved_options.update(run.get(section) or {})
    tokens = [t for k, v in saved_options.items() if k in fields for t in ppo_exp._as_args(k, v)]
    tokens += [t for k in ("seed", "checkpoint_every", "log_every") if k in run for t in ppo_exp._as_args(k, run[k])]
    return tokens + ["--run-dir", str(resume_path)]


def parse(argv: Optional[Sequence[str]] = None, options: type = None, sections: Sequence[str] = ()) -> Options:
    """Parses the command line into ``options`` (default :class:`Options`; experiments built on this one pass a
    subclass, e.g. :mod:`experiments.heron_nethack`, and the ``run_info`` sections where they saved their own
    fields, so that ``--resume`` restores them)."""
    options = options or Options
    argv, resume_path = ppo_exp._preprocess(list(sys.argv[1:] if argv is None else argv))
    if resume_path is not None and not any(a in ("-h", "--help") for a in argv):
        try:
            argv = _replay_saved(resume_path, options, sections) + argv
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    doc = sys.modules[options.__module__].__doc__ or __doc__
    return cli(options, argv, description=doc.split("\n\n")[0], aliases=ppo_exp.ALIASES)


def run_main(opts: Options, agent: str = "ppo_nethack", module: str = "experiments.ppo_nethack",
             trainer_kwargs: Optional[dict] = None, run_info: Optional[dict] = None) -> int:
    """Trains ``opts`` on a fresh pool with the runner and returns the exit status (experiments built on this one,
    e.g. :mod:`experiments.heron_nethack`, pass their reward model in ``trainer_kwargs``)."""
    cfg = opts.agent_config()
    run_dir = opts.run_dir or opts.resume or f"runs/{agent}-{opts.env_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume = True if opts.resume is not None else (False if opts.no_resume else None)
    try:
        pool = make_pool(cfg, opts.seed)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        status, _ = run_for_cli(
            lambda: run_experiment(make_trainer, cfg, run_dir=run_dir, num_seeds=1, seed=opts.seed,
                                   log_every=opts.log_every, checkpoint_every=opts.checkpoint_every, resume=resume,
                                   progress=opts.progress, agent=agent,
                                   trainer_kwargs={"env": pool, **(trainer_kwargs or {})},
                                   run_info={"num_workers": pool.num_workers, "host_envs": pool.host_envs,
                                             **(run_info or {})}),
            module=module, run_dir=run_dir)
    finally:
        pool.close()
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(parse(argv))


if __name__ == "__main__":
    raise SystemExit(main())
