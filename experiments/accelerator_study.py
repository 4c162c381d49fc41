"""The sparse study at accelerator scale, one command (issue 36 item 6; docs/accelerators.md):

    python -m experiments.accelerator_study                 # on a GPU: every run of the grid below
    python -m experiments.accelerator_study --dry-run True  # check every run's command and print them, run nothing

is ``python -m experiments.sparse_study`` with :data:`experiments.sparse_study.ACCELERATOR_ARGS`: MiniGrid-DoorKey-16x16
at 3M env steps (the 1M study's budget x 3) and Craftax-Classic with captions (``craftax_classic``: 1024 envs x 64
steps, Craftax's PPO settings) at 1e7, 10 seeds per cell vmapped in one process per (task, method), every method of
the study (PPO, RND, RND-head, E3B, ONI x 3 reward models, Motif, ELLM-BoW, the control), seed keys 5000-5009 (the
study's block rule: 5000 is this study's), results in ``runs/accelerator_study/``. Flags after it are the study's and
win over these (e.g. ``--methods ppo motif``, ``--num-seeds 16``, ``--out DIR``); an interrupted study resumes with
the same command.
"""
from __future__ import annotations

import sys
from typing import Optional

from experiments import sparse_study


def argv(extra: Optional[list[str]] = None) -> list[str]:
    """The study's arguments: :data:`~experiments.sparse_study.ACCELERATOR_ARGS`, then ``extra`` (later flags win)."""
    return [*sparse_study.ACCELERATOR_ARGS, *(sys.argv[1:] if extra is None else extra)]


def main(extra: Optional[list[str]] = None) -> int:
    return sparse_study.main(argv(extra))


if __name__ == "__main__":
    raise SystemExit(main())
