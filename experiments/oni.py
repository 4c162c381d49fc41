"""ONI on NetHack/MiniHack and captioned JAX tasks: ``python -m experiments.oni --env MiniHack-KeyRoom-Fixed-S5-v0``.

PPO (as ``experiments.ppo`` on a pool env) plus ONI's intrinsic reward (:mod:`agents.oni`): the run starts the
annotator service (``python -m jaxrl_pref.annotation.server``, a child process on 127.0.0.1) unless
``--annotator-url`` names a running one, sends it every new message, and learns the reward model from the labels
as they arrive::

    # offline default: the packaged MiniLM scores messages against the task's progress descriptions
    python -m experiments.oni --env MiniHack-KeyRoom-Fixed-S5-v0 --total-timesteps 20000 --run-dir runs/oni
    # an OpenAI-compatible server (vLLM, llama.cpp, Ollama); key (if any) from $OPENAI_API_KEY
    python -m experiments.oni --env NetHackScore-v0 --ext-coef 0.1 --annotator openai \\
        --llm-base-url http://127.0.0.1:8000/v1 --llm-model meta-llama/Llama-3.1-8B-Instruct
    python -m experiments.oni --resume runs/oni      # continue; labels come back from the store, none re-asked

Outputs as ``experiments.ppo`` (``metrics.csv``, ``tb/``, ``checkpoints/``...) plus ``labels.db`` (the label
store; reusable across runs), ``annotator.log`` and ``oni_curves.png`` (extrinsic vs intrinsic reward, episode
return, label counts). ``--help`` lists every option by section.

On a captioned JAX task (``KeyDoor-*``, ``MiniGrid-*``, ``Craftax-*``: :mod:`envs.captions`) ONI runs inside PPO's
jitted loop, seeds vmapped (:mod:`agents.oni_captioned`): the reward model and the labels live in the device state,
and the annotator is sent the new captions, and its answers loaded, between compiled chunks
(``--label-sync-every``)::

    python -m experiments.oni --env MiniGrid-DoorKey-8x8 --total-timesteps 100000 --num-seeds 4
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from jaxrl_pref import cli

cli.setup()  # before JAX starts

from agents import motif, oni, oni_captioned, ppo  # noqa: E402
from experiments import launch  # noqa: E402
from envs import captions  # noqa: E402
from jaxrl_pref.annotation.client import AnnotatorClient, stop_server  # noqa: E402
from jaxrl_pref.annotation.config import AnnotatorConfig, preflight, start_annotator  # noqa: E402
from jaxrl_pref.config import require  # noqa: E402
from jaxrl_pref.logging import plot_oni_curves  # noqa: E402


def resolve(opts) -> dict:
    """What ``--method`` implies: ELLM-BoW labels with the bow annotator and a retrieval model, Motif trains a
    ranking model offline (:mod:`agents.motif`)."""
    if opts.oni.method == "ellm":  # ELLM-BoW: similarity labels, looked up by message
        require(opts.annotator.annotator in ("embedded", "bow") and not opts.annotator.annotator_url, "method",
                f"--method ellm labels messages itself (the bow annotator), not with --annotator "
                f"{opts.annotator.annotator}{' / --annotator-url' if opts.annotator.annotator_url else ''}",
                "drop --annotator / --annotator-url, or use --method oni")
        return {"annotator": dataclasses.replace(opts.annotator, annotator="bow"),
                "oni": dataclasses.replace(opts.oni, reward_model="retrieval")}
    if opts.oni.method == "motif":
        return {"oni": dataclasses.replace(opts.oni, reward_model="ranking")}
    return {}


def check(opts) -> None:
    opts.annotator.check()
    if opts.oni.method != "motif":
        require(opts.motif == motif.MotifOptions(), "method", "the --motif-* options apply to --method motif only",
                "pass --method motif, or drop them")
    if opts.host:
        require("message" in opts.pool.obs_keys, "obs_keys", "ONI needs the message observation",
                "add message to --obs-keys")
    else:  # a captioned JAX env: ONI in the jitted loop (agents/oni_captioned.py)
        require(captions.is_captioned(opts.env_name), "env_name",
                f"ONI learns from the agent's messages, and the JAX env {opts.env_name} has none",
                "pass a captioned JAX task (KeyDoor-5, MiniGrid-DoorKey-8x8, ...) or a NetHack/MiniHack one, e.g. "
                "--env MiniHack-KeyRoom-Fixed-S5-v0")
    launch.check_ppo(opts)


def motif_dir(opts, run_dir) -> Path:
    return Path(opts.motif.motif_dir) if opts.motif.motif_dir else Path(run_dir) / "motif"


def train_motif(opts, run_dir):
    """``--method motif``: Motif's phases 1-3 (:func:`agents.motif.prepare`: dataset, annotated pairs, frozen reward
    model; reused from ``--motif-dir`` when there), then PPO on the frozen model."""
    directory = motif_dir(opts, run_dir)
    env_name, m = opts.env_name, opts.motif
    if motif.check_dir(directory, env_name):  # before anything is built or written: the files, then the annotator
        preflight(opts.annotator, directory)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    prepared = motif.prepare(
        m, env_name, directory, seed=opts.run.seed, batch_size=opts.oni.rm_batch_size,
        learning_rate=opts.oni.rm_learning_rate, annotator=opts.annotator.annotator,
        collect=lambda: motif.collect_dataset(env_name, m.motif_steps, opts.ppo.num_envs, opts.run.seed, opts.pool),
        connect=lambda: motif.service_client(opts.annotator, env_name, directory))
    if opts.oni.rm_ensemble > 1:
        prepared = motif.prepare_ensemble(prepared, m, opts.oni.rm_ensemble, opts.oni.rm_aggregation,
                                          opts.oni.rm_lcb_coef, seed=opts.run.seed, batch_size=opts.oni.rm_batch_size,
                                          learning_rate=opts.oni.rm_learning_rate)
    if not opts.run.no_resume:
        motif.check_resume(run_dir, prepared.sha, directory)
    info = {"motif_dir": str(directory), "motif_model_sha256": prepared.sha}
    motif.say(f"PPO with the frozen reward model of {directory}")
    if opts.host:
        reward = motif.make_reward(opts.oni, prepared)
        hook = motif.make_hook(opts.oni, reward, opts.run.seed,
                               state_key=None if opts.bonus.bonus == "none" else "base")
        result = launch.train_ppo(opts, run_dir, reward=reward, host_hook=hook, run_info=info)
    else:  # a captioned JAX task: the frozen scores and the per-caption counts inside the jitted loop, no hook
        reward = motif.make_reward(opts.oni, prepared, captions.caption_table(env_name))
        result = launch.train_ppo(opts, run_dir, reward=reward, run_info=info)
    if result.metrics:
        plot_oni_curves(result.metrics, Path(run_dir) / "oni_curves.png", result.steps_per_update)
    return result


def train(opts, run_dir):
    if opts.oni.method == "motif":  # dataset, pairs, frozen reward model (reused from --motif-dir), then PPO
        return train_motif(opts, run_dir)
    preflight(opts.annotator, run_dir)  # the service, the label store, the LLM: before anything is built or written
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    proc, url = start_annotator(opts.annotator, run_dir, checked=True, env_name=opts.env_name)
    client = AnnotatorClient(url, opts.annotator.task(opts.env_name), wait=opts.annotator.label_wait)
    state_key = None if opts.bonus.bonus == "none" else "base"  # under launch's WithBonus
    info = {"annotator_url": url, "prompt_task": client.task}
    try:
        if opts.host:
            reward, hook = oni.build(opts.oni, client, opts.run.seed, state_key=state_key)
            result = launch.train_ppo(opts, run_dir, reward=reward, host_hook=hook, run_info=info)
        else:  # captioned JAX env: the reward model and labels in the jitted loop, the annotator between chunks
            table = captions.caption_table(opts.env_name)
            reward = oni_captioned.make_reward(opts.oni, table)
            hook = oni_captioned.CaptionLoop(opts.oni, table, client, opts.run.seed, state_key=state_key,
                                             every=opts.captioned.label_sync_every)
            result = launch.train_ppo(opts, run_dir, reward=reward, chunk_hook=hook, run_info=info)
        if result.metrics:
            plot_oni_curves(result.metrics, Path(run_dir) / "oni_curves.png", result.steps_per_update)
        return result
    finally:
        print(client.summary()["text"], file=sys.stderr)  # how many messages stayed unlabelled, and why
        client.close()
        stop_server(proc)


SPEC = cli.Experiment(
    name="oni", module="experiments.oni", doc=__doc__, train=train, default_env="MiniHack-KeyRoom-Fixed-S5-v0",
    sections=(*launch.PPO_SECTIONS, cli.Section("oni", oni.ONIOptions),
              cli.Section("motif", motif.MotifOptions, saved_if_set=True),
              cli.Section("captioned", oni_captioned.CaptionedOptions, saved_if_set=True),
              cli.Section("annotator", AnnotatorConfig), launch.RUN),
    defaults=launch.ppo_defaults, resolve=resolve, check=check, hparam_fields=ppo.HPARAM_FIELDS, errors=(ImportError, RuntimeError))


parse, main = cli.entry_points(SPEC)

if __name__ == "__main__":
    raise SystemExit(main())
