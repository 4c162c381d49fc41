"""Train PPO on any env: ``python -m experiments.ppo --env CartPole-v1 --num-seeds 8``.

A JAX env (gymnax, the sparse suite, xminigrid) trains in one compiled program per chunk, seeds (and
``--hp-values``) vmapped; a NetHack/MiniHack env (``--env MiniHack-Room-5x5-v0``) trains in the host loop over a
pool of worker processes, one seed per process, with pool-sized defaults (16 envs x 32 steps). ``--help`` lists
every option by section. The run is cut into chunks of ``--checkpoint-every`` updates, each followed by a
checkpoint, so a killed or preempted job continues where it stopped::

    python -m experiments.ppo --env CartPole-v1 --run-dir runs/cp --num-seeds 8
    # ... killed, preempted (SIGTERM: the current chunk is finished and saved first) ...
    python -m experiments.ppo --resume runs/cp          # same options, read back from runs/cp/config.json
    python -m experiments.ppo --run-dir runs/cp --resume  # same thing; starts fresh if runs/cp has no checkpoint

Outputs (``--run-dir``, default ``runs/ppo-<env>-<timestamp>``): ``config.json``, ``metrics.csv``/``metrics.jsonl``
(every update of every seed), ``learning_curve.png``, ``tb/`` (tensorboard) and ``checkpoints/``. A resumed host-loop
run restores the learner exactly but starts fresh episodes (the games are not checkpointed).

``--shaping-captions`` (captioned JAX tasks) adds hand-written shaping on the captions named, e.g. ``--env KeyDoor-9
--shaping-captions "You pick up the key." "The door opens."``: +``--shaping-reward`` at each one's first occurrence
in an episode (:mod:`jaxrl_pref.rewards.caption_shaping`; the sparse study's ``shaping`` arm).

``--language minilm`` (captioned JAX tasks, NetHack/MiniHack) fuses the frozen MiniLM embedding of the step's message
into the policy's input; ``--alignment-coef C`` adds ``C * cos(message, goal statement)`` to the reward
(:mod:`jaxrl_pref.language`, docs/language.md).

Exit status: 0 done; 2 bad option, unusable run dir, annotator or checkpoint (one line naming the option and the
fix; ``--debug`` adds the traceback); 1 training diverged (NaN loss; the last good checkpoint is kept); 3 a write
failed mid-run (disk full; the last good checkpoint is kept); 128+signal when stopped by SIGTERM/SIGINT after saving
(130 also for a second Ctrl-C, which aborts at once without saving). docs/running.md has the table.
"""
from __future__ import annotations

from jaxrl_pref import cli

cli.setup()  # before JAX starts: synchronous CPU dispatch, --distributed

from agents import ppo  # noqa: E402
from experiments import launch  # noqa: E402
from jaxrl_pref.language import AlignmentConfig, make_alignment  # noqa: E402
from jaxrl_pref.rewards.caption_shaping import CaptionShapingConfig, make_caption_shaping  # noqa: E402


def check(opts) -> None:
    launch.check_ppo(opts)
    opts.shaping.check(opts.env_name, opts.host)
    opts.alignment.check(opts.env_name, opts.host, opts.ppo.language)
    if opts.host and opts.ppo.language != "none":
        from jaxrl_pref.config import require
        require("message" in opts.pool.obs_keys, "language", "--language reads the message, and --obs-keys leaves it "
                f"out ({' '.join(opts.pool.obs_keys)})", "add message to --obs-keys")


def train(opts, run_dir):
    """PPO on the env reward, plus the hand-written caption shaping of ``--shaping-captions`` when given."""
    reward = make_caption_shaping(opts.shaping, opts.env_name, opts.ppo.envs_per_device)
    reward = make_alignment(opts.alignment, opts.env_name, opts.host, reward)
    return launch.train_ppo(opts, run_dir, reward=reward)


SPEC = cli.Experiment(
    name="ppo", module="experiments.ppo", doc=__doc__,
    sections=(*launch.PPO_SECTIONS, cli.Section("shaping", CaptionShapingConfig, saved_if_set=True),
              cli.Section("alignment", AlignmentConfig, saved_if_set=True), launch.RUN),
    train=train, default_env="CartPole-v1", defaults=launch.ppo_defaults, check=check,
    hparam_fields=ppo.HPARAM_FIELDS, errors=(ImportError,))


parse, main = cli.entry_points(SPEC)

if __name__ == "__main__":
    raise SystemExit(main())
