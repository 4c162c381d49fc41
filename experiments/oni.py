"""ONI on NetHack/MiniHack: ``python -m experiments.oni --env MiniHack-KeyRoom-Fixed-S5-v0 --reward-model classification``.

PPO on a pool of NetHack/MiniHack envs (as ``experiments.ppo_nethack``) plus ONI's intrinsic reward
(:mod:`agents.oni`): the run starts the annotator service (``python -m jaxrl_pref.annotation.server``, a child
process on 127.0.0.1) unless ``--annotator-url`` names a running one, sends it every new message, and learns the
reward model from the labels as they arrive::

    # offline default: the packaged MiniLM scores messages against the task's progress descriptions
    python -m experiments.oni --env MiniHack-KeyRoom-Fixed-S5-v0 --total-timesteps 20000 --run-dir runs/oni
    # an OpenAI-compatible server (vLLM, llama.cpp, Ollama); key (if any) from $OPENAI_API_KEY
    python -m experiments.oni --env NetHackScore-v0 --ext-coef 0.1 --annotator openai \\
        --llm-base-url http://127.0.0.1:8000/v1 --llm-model meta-llama/Llama-3.1-8B-Instruct
    python -m experiments.oni --resume runs/oni      # continue; labels come back from the store, none re-asked

Outputs as ``experiments.ppo`` (``metrics.csv``, ``tb/``, ``checkpoints/``...) plus ``labels.db`` (the label
store; reusable across runs), ``annotator.log`` and ``oni_curves.png`` (extrinsic vs intrinsic reward, episode
return, label counts). Every field is a flag (``--help``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional, Sequence

from jaxrl_pref.runner import run_experiment, run_for_cli, use_sync_cpu_dispatch

use_sync_cpu_dispatch()

from agents import oni  # noqa: E402
from experiments import ppo_nethack  # noqa: E402
from jaxrl_pref.annotation.backends import task_for_env  # noqa: E402
from jaxrl_pref.annotation.client import AnnotatorClient, start_server, stop_server  # noqa: E402
from jaxrl_pref.config import require  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config(ppo_nethack.Config, oni.ONIOptions):
    """ONI = PPO on a NetHack/MiniHack pool + an online intrinsic reward from annotated messages."""
    env_name: str = "MiniHack-KeyRoom-Fixed-S5-v0"
    annotator: str = "embedded"
    """Who labels messages: embedded (offline MiniLM similarity, no GPU/network) or openai (an OpenAI-compatible
    chat-completions server, see --llm-base-url / --llm-model)."""
    annotator_url: str = ""
    """Use an annotator service already running at this URL (e.g. http://127.0.0.1:8765) instead of starting one."""
    llm_base_url: str = ""
    """openai annotator: the server's base URL, e.g. http://127.0.0.1:8000/v1."""
    llm_model: str = ""
    """openai annotator: model name, e.g. meta-llama/Llama-3.1-8B-Instruct."""
    llm_api_key_env: str = "OPENAI_API_KEY"
    """openai annotator: environment variable holding the API key (never logged)."""
    label_store: str = ""
    """SQLite label store (default: <run-dir>/labels.db). Share one between runs to reuse labels."""
    prompt_task: str = ""
    """Prompt file task (default from the env: nethack_score, nethack_staircase, nethack_oracle, minihack)."""

    def validate(self) -> None:
        super().validate()
        self.validate_oni()
        require("message" in self.obs_keys, "obs_keys", "ONI needs the message observation",
                "add message to --obs-keys")
        require(self.annotator in ("embedded", "openai"), "annotator", f"unknown annotator {self.annotator!r}",
                "use --annotator embedded or --annotator openai")
        if self.annotator == "openai" and not self.annotator_url:
            require(bool(self.llm_base_url) and bool(self.llm_model), "llm_base_url",
                    "the openai annotator needs a server URL and a model name",
                    "pass --llm-base-url http://HOST:PORT/v1 --llm-model NAME")


@dataclasses.dataclass(frozen=True)
class Options(Config, ppo_nethack.Options):
    """ONI configuration plus how to run it (seed, outputs, checkpoints; one seed per process, as NetHack PPO)."""

    def agent_config(self) -> Config:
        return Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Config)})


def make_trainer(cfg: Config, env, client, log_fn=None, log_every: int = 1, seed: int = 0):
    return oni.make_trainer(cfg, env, client, log_fn=log_fn, log_every=log_every, overlap=cfg.overlap, seed=seed,
                            network=ppo_nethack.make_network(cfg, env.num_actions))


def start_annotator(cfg: Config, run_dir: str):
    """``(process or None, url)``: the service named by ``--annotator-url``, or a new child process."""
    if cfg.annotator_url:
        return None, cfg.annotator_url
    store = cfg.label_store or str(Path(run_dir) / "labels.db")
    extra = []
    if cfg.annotator == "openai":
        extra = ["--base-url", cfg.llm_base_url, "--model", cfg.llm_model, "--api-key-env", cfg.llm_api_key_env]
    return start_server(store, cfg.annotator, log_path=str(Path(run_dir) / "annotator.log"), extra_args=extra)


def plot_oni(metrics: dict, path, steps_per_update: int) -> None:
    """Extrinsic vs intrinsic reward per step, episode return and label counts over env steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import warnings

    import numpy as np
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)  # updates where no episode ended
    get = lambda k: np.nanmean(np.asarray(metrics[k], np.float64).reshape(-1, np.shape(metrics[k])[-1]), 0) \
        if k in metrics else None  # noqa: E731
    n = np.shape(next(iter(metrics.values())))[-1]
    x = (np.arange(n) + 1) * steps_per_update
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for k, lab in (("reward/extrinsic", "extrinsic"), ("reward/intrinsic", "intrinsic (normalised)")):
        if get(k) is not None:
            ax[0].plot(x, get(k), label=lab)
    ax[0].set_title("reward per step")
    ax[0].legend()
    if get("episode_return") is not None:
        r = get("episode_return")
        ok = ~np.isnan(r)
        ax[1].plot(x[ok], r[ok])
    ax[1].set_title("episode return (extrinsic)")
    for k in ("labels/labeled", "labels/positive", "labels/pairs", "messages/distinct_seen"):
        if get(k) is not None and np.nanmax(get(k)) > 0:
            ax[2].plot(x, get(k), label=k.split("/")[1])
    ax[2].set_title("annotation")
    ax[2].legend()
    for a in ax:
        a.set_xlabel("env steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv: Optional[Sequence[str]] = None) -> Options:
    return ppo_nethack.parse(argv, options=Options)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse(argv)
    cfg = opts.agent_config()
    run_dir = opts.run_dir or opts.resume or f"runs/oni-{opts.reward_model}-{opts.env_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    resume = True if opts.resume is not None else (False if opts.no_resume else None)
    proc = client = pool = None

    def run():
        nonlocal proc, client, pool
        proc, url = start_annotator(cfg, run_dir)
        client = AnnotatorClient(url, cfg.prompt_task or task_for_env(cfg.env_name))
        pool = ppo_nethack.make_pool(cfg, opts.seed)
        result = run_experiment(make_trainer, cfg, run_dir=run_dir, num_seeds=1, seed=opts.seed,
                                log_every=opts.log_every, checkpoint_every=opts.checkpoint_every, resume=resume,
                                progress=opts.progress, agent="oni",
                                trainer_kwargs={"env": pool, "client": client, "seed": opts.seed},
                                run_info={"annotator_url": url, "prompt_task": client.task})
        if result.metrics:
            plot_oni(result.metrics, Path(run_dir) / "oni_curves.png", result.steps_per_update)
        return result
    try:  # a dead annotator or a pool that cannot start is a RuntimeError: exit 2 with its message
        status, _ = run_for_cli(run, module="experiments.oni", run_dir=run_dir, errors=(ImportError, RuntimeError))
    finally:
        if client is not None:
            client.close()
        if pool is not None:
            pool.close()
        stop_server(proc)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
