"""Test-session setup shared by every test module, and the test tiers.

Three tiers (docs/testing.md):
- the default suite, ``pytest -q`` (the README's test command): every test not marked ``slow`` or ``nightly``;
- CI (``.ci/run``): the default suite, then ``-m "slow and not nightly"``, the curated slow subset;
- nightly (``.ci/nightly``): ``-m nightly``, everything else: the long learning runs, the multi-seed bounds, the
  heavy multi-process and Craftax runs, the second and later instances of a behaviour CI already covers.
A test leaves CI only to the nightly tier: ``NIGHTLY`` below names each one with the reason and the CI test that
still covers its behaviour; the two tiers together run every test.
"""
import os
import time

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxrl_pref.runner import use_sync_cpu_dispatch  # noqa: E402

# as the experiment entry points do, before any test creates the CPU backend (jax#25861: host callbacks with
# asynchronous CPU dispatch can hang a vmapped program for good)
use_sync_cpu_dispatch()


# node id (a function: all its parameters; or one parameter set) -> why it runs nightly, not in CI, and which test
# keeps the behaviour covered in CI. Times: the last fresh-clone CI run before the split (2026-12-07, 2 cores).
_LEARN = "a long learning run or multi-seed bound"
_CRAFTAX = "Craftax (37-88 s per test on 2 cores; Classic's captions and scripted steps are in the default suite)"
NIGHTLY: dict[str, str] = {
    # learning runs: CI keeps one per kind (CartPole: test_ppo.py::test_cartpole_reaches_475_for_7_of_8_seeds;
    # MiniHack: test_nethack.py::test_ppo_learns_minihack_room_beats_random[1]; memory: the GRU memory task;
    # ONI: test_oni.py's retrieval learning test in the default suite)
    "tests/test_recurrent.py::test_gru_cartpole_reaches_475": _LEARN + " (94 s); CartPole: test_ppo's",
    "tests/test_recurrent.py::test_gru_acrobot_learns_with_the_truncation_bootstrap":
        _LEARN + " (4 x 500k steps); the cause is pinned in CI by test_constant_value_targets_saturate_...",
    "tests/test_sparse.py::test_ppo_learns_xminigrid_door_key_5x5": _LEARN + " (92 s)",
    "tests/test_bonus.py::test_e3b_solves_minihack_keyroom_where_ppo_does_not": _LEARN + " (86 s)",
    "tests/test_nethack.py::test_ppo_learns_minihack_room_beats_random[2]": _LEARN + "; CI runs [1]",
    "tests/test_recurrent.py::test_lstm_policy_learns_minihack_room": _LEARN + "; MiniHack: test_nethack's [1]",
    "tests/test_recurrent.py::test_memory_task_needs_a_recurrent_policy[lstm]": _LEARN + " (31 s); CI runs [gru]",
    "tests/test_oni.py::test_agent_learns_to_produce_the_helpful_message[classification]":
        _LEARN + "; ONI learning: [retrieval] in the default suite",
    "tests/test_oni.py::test_agent_learns_from_pairwise_preferences": _LEARN + " (ONI ranking model)",
    "tests/test_oni_captioned.py::test_labelling_a_caption_helpful_makes_the_agent_produce_it_more": _LEARN,
    "tests/test_heron.py::test_heron_learns_pendulum": _LEARN,
    "tests/test_sqirl.py::test_host_env_loop_uses_the_same_learner": _LEARN + "; SQIRL: test_learns_deep_sea_5",
    # resume: CI keeps one bitwise-resume test per loop type (scanned: test_runner.py's SIGTERM+crash test;
    # host loop: test_nethack.py::test_stopped_run_resumes_from_cli) and the CLI resume tests of the default suite
    "tests/test_recurrent.py::test_resume_of_a_recurrent_run_is_bitwise_exact": "resume, recurrent (31-34 s each)",
    "tests/test_bonus.py::test_ppo_with_a_bonus_resumes_bitwise_exactly": "resume with a bonus (23-29 s each)",
    "tests/test_heron.py::test_heron_run_resumes_exactly": "resume, HERON",
    "tests/test_sqirl.py::test_cli_trains_checkpoints_and_resumes_exactly": "resume, SQIRL",
    "tests/test_oni_captioned.py::test_asked_once_loaded_between_chunks_and_resume_is_exact":
        "resume, captioned ONI (26-27 s each); CI runs [ranking-5] (the table at capacity)",
    "tests/test_oni.py::test_experiment_cli_grows_the_table_and_resumes_after_growth":
        "resume after table growth from the CLI; CI runs the in-run growth test",
    "tests/test_multihost.py::test_distributed_cli_stops_together_and_resumes": "multi-process resume (24 s)",
    "tests/test_guards.py::test_captioned_oni_with_an_ensemble_and_rpo_resumes_bitwise_exactly":
        "resume with a reward-model ensemble and RPO (57 s); the ensemble's state is checkpointed as any reward "
        "state: CI's captioned-ONI resume test [ranking-5] and test_guards' ensemble tests (default suite)",
    "tests/test_language.py::test_language_run_resumes_exactly":
        "resume with --language (37 s; the option adds no state): CI's scanned-loop resume tests",
    # heavy multi-process runs (the default suite keeps the cluster detection and flag checks, and data parallel
    # over several devices of one process: test_ppo.py::test_normalisation_statistics_are_shared_across_devices[2])
    "tests/test_multihost.py::test_processes_see_the_global_mesh_and_end_identical": "two processes, jax.distributed",
    "tests/test_multihost.py::test_two_processes_match_one_process_four_devices": "two processes, jax.distributed",
    "tests/test_slurm.py::test_vmapped_hparams_sweep_runs_locally_and_reports_each_point":
        "a vmapped sweep task trained locally (~40 s); sweep expansion is in the default suite, Slurm in CI",
    "tests/test_slurm.py::test_srun_multiprocess_training_detects_the_cluster_from_slurm":
        "two processes under srun; CI runs the real-Slurm sweep and requeue tests",
    "tests/test_heron.py::test_heron_data_parallel_over_two_devices": "data parallel: test_ppo's in the default suite",
    # Craftax: compiling the full game takes 40-90 s per variant (Classic's captions are in the default suite)
    "tests/test_craftax.py::test_spec_shapes_dtypes": _CRAFTAX,
    "tests/test_craftax.py::test_time_limit_truncates_not_terminates": _CRAFTAX,
    "tests/test_craftax.py::test_auto_reset_from_fresh_worlds": _CRAFTAX,
    "tests/test_craftax.py::test_achievement_and_score_metrics": _CRAFTAX,
    "tests/test_craftax.py::test_other_variants_step": _CRAFTAX,
    "tests/test_craftax.py::test_craftax_pixels_shapes_without_compiling": _CRAFTAX,
    "tests/test_captions.py::test_craftax_rollout_ids_survive_auto_reset": "Craftax-Classic batched (~40 s)",
    "tests/test_captions.py::test_full_craftax_scripted_transitions": "full Craftax world generation (~30 s)",
    # second and later instances of a behaviour CI covers
    "tests/test_study.py::test_a_study_trained_in_its_process_resumes_and_reads_its_runs":
        "a study trained in its process end to end (~25 s); study.train's resume and restore: "
        "test_train_in_this_process_resumes_restores_and_refuses_other_settings (default suite)",
    "tests/test_recurrent.py::test_update_over_sequences_equals_a_step_by_step_reference":
        "the sequence update against its step-by-step reference, every parameter set (31 s for [gru-0-detached], "
        "as long for [gru-4-detached]); not in CI: the GRU memory task (slow pass) trains through the same update",
    "tests/test_recurrent.py::test_oni_and_heron_run_with_an_lstm_on_minihack":
        "the host loop's recurrent carry: test_recurrent.py::test_host_loop_carries_the_policy_state",
    "tests/test_value_heads.py::test_ppo_with_the_rnd_value_head_trains_in_both_loops[gru]": "[mlp] in the default suite",
    "tests/test_bonus.py::test_heron_with_e3b_trains_in_the_jitted_loop": "bonus compositions: test_bonus's fused-seam test",
    "tests/test_bonus.py::test_host_loop_agents_train_with_a_bonus_on_minihack": "CI runs [ppo-e3b]",
    "tests/test_heron.py::test_heron_reward_model_in_the_nethack_host_loop":
        "HERON in the host loop: test_heron_nethack_cli_trains_and_resumes (default suite)",
    "tests/test_oni.py::test_agent_with_real_annotator_service":
        "the annotator service: test_experiment_cli_on_minihack and the captioned CLI test",
    "tests/test_oni_captioned.py::test_cli_end_to_end_with_the_annotator_service":
        "CI runs [KeyDoor-5-classification] (38 s for the MiniGrid one)",
    "tests/test_motif.py::test_motif_end_to_end_on_minihack_reuses_dir_and_resumes":
        "Motif end to end: test_motif_on_a_captioned_jax_task_from_the_cli (36 s)",
    "tests/test_accelerator.py::test_accelerator_check_runs_on_cpu_with_a_small_budget":
        "the GPU/TPU one-call check, run on CPU (64 s); its pieces are tested in the default suite",
    "tests/test_cli_documented.py::test_unreachable_llm_allowed_starts_anyway_and_trains_to_the_end":
        "an unanswered LLM run to the end from the CLI (~50 s): the service's side (warnings, errors recorded, "
        "labels once it answers) is test_annotation.py::test_unreachable_llm_allowed_warns_and_records_errors, the "
        "refusal at start test_cli_documented.py::test_unreachable_llm_stops_the_run_at_start",
    "tests/test_sqirl.py::test_vmap_over_episodes_per_timestep_equals_separate_runs":
        "SQIRL's vmap equality (47 s): CI keeps test_planning_depth_on_chain_and_vmap_over_k_equals_separate_runs",
    "tests/test_cli_errors.py::test_second_sigint_aborts_a_long_chunk_at_once[host]":
        "the second SIGINT on the host loop (19 s): CI runs [scanned], the same handler and worker thread",
    "tests/test_cli.py::test_sigterm_saves_and_exits_cleanly":
        "SIGTERM from the CLI (16 s): CI has the CLI's SIGINT test (same save-and-exit path) and test_runner.py's "
        "SIGTERM + crash resume test",
    "tests/test_slurm.py::test_rerun_bad_task_syntax_or_dir_is_one_line":
        "slurm.submit --rerun's one-line errors, 6 subprocesses (26 s): CI has test_malformed_sweep_file_is_one_line "
        "(the same error printer) and the --rerun test itself",
    "tests/test_recurrent.py::test_vmap_over_seeds_equals_separate_runs":
        "vmap equality, recurrent (30 s): CI has test_ppo.py::test_vmap_over_hyperparameters_equals_separate_runs and "
        "the GRU memory task (seeds vmapped, recurrent)",
    "tests/test_rnd.py::test_ppo_with_rnd_through_the_seam_vmaps_over_seeds":
        "a bonus through the seam, seeds vmapped (22 s): CI runs test_e3b.py's (the same seam and WithBonus)",
    "tests/test_oni.py::test_experiment_cli_on_minihack":
        "ONI's CLI on MiniHack (29 s): CI runs test_llm_annotator.py::test_oni_on_minihack_learns_from_labels_the_llm_"
        "produced (the same CLI, service and pool, labels from the LLM) and the captioned CLI test",
    "tests/test_sparse_study.py::test_a_small_study_runs_reports_and_resumes":
        "the study's CLI end to end: test_cli_documented.py's README main-job test in CI; this one adds its resume",
    # default-suite duplicates: the same check at another device count, env or cell
    "tests/test_recurrent.py::test_rollout_stores_the_state_entering_each_step[lstm]":
        "the stored carry, LSTM (5 s): CI runs [gru] and test_host_loop_carries_the_policy_state (an LSTM, the same "
        "checks of the carry stored and carried across rollouts)",
    "tests/test_recurrent.py::test_targets_bootstrap_truncation_from_the_carry_after_the_step[lstm-detached]":
        "CI runs [gru-detached] (the detached critic) and [lstm-separate] (the LSTM's default) (5 s)",
    "tests/test_ppo.py::test_normalisation_statistics_are_shared_across_devices[4]": "CI runs [2] (11 s)",
    "tests/test_ppo.py::test_data_parallel_devices":
        "PPO over 2 and 4 devices, a process of its own (14 s for [2]): CI's "
        "test_normalisation_statistics_are_shared_across_devices[2] makes the same checks (replicated parameters, "
        "sharded envs) on the same PPO with the normalisers",
    "tests/test_prng.py::test_trainer_numbers_unchanged[MiniGrid-DoorKey-5x5]": "CI runs [CartPole-v1] (15 s)",
    # the sparse suite: CI steps one task per family (the default suite DeepSea-5 and KeyDoor-5, KEEP_IN_CI the rest)
    "tests/test_sparse.py::test_tasks_jittable_with_success": "one task per family in CI",
}

# parameter sets of a NIGHTLY function that stay in CI (one per behaviour or family)
KEEP_IN_CI: set[str] = {
    "tests/test_sparse.py::test_tasks_jittable_with_success[DeepSea-5]",
    "tests/test_sparse.py::test_tasks_jittable_with_success[KeyDoor-5]",
    "tests/test_sparse.py::test_tasks_jittable_with_success[MemoryChain-10]",
    "tests/test_sparse.py::test_tasks_jittable_with_success[MiniGrid-DoorKey-5x5]",
    "tests/test_sparse.py::test_tasks_jittable_with_success[SparseCartPole-v1]",
    "tests/test_oni_captioned.py::test_asked_once_loaded_between_chunks_and_resume_is_exact[ranking-5]",
    "tests/test_oni_captioned.py::test_cli_end_to_end_with_the_annotator_service[KeyDoor-5-classification]",
    "tests/test_bonus.py::test_host_loop_agents_train_with_a_bonus_on_minihack[ppo-e3b]",
}


def _nightly_reason(nodeid: str) -> str | None:
    if nodeid in KEEP_IN_CI:
        return None
    if nodeid in NIGHTLY:
        return NIGHTLY[nodeid]
    return NIGHTLY.get(nodeid.split("[", 1)[0])


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the marker must be there when it does
def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = _nightly_reason(item.nodeid)
        if reason is not None:
            item.add_marker(pytest.mark.nightly(reason=reason))
    # a renamed or deleted test must not leave a stale entry behind (checked for whole files collected)
    if not any("::" in str(a) for a in config.args):
        files = {item.nodeid.split("::", 1)[0] for item in items}
        names = {item.nodeid for item in items} | {item.nodeid.split("[", 1)[0] for item in items}
        stale = sorted(k for k in (*NIGHTLY, *KEEP_IN_CI) if k.split("::", 1)[0] in files and k not in names)
        if stale:
            raise pytest.UsageError("tests/conftest.py's tiers name tests that do not exist (renamed or deleted?): "
                                    + ", ".join(stale))


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (setup.cfg): one worker per core this process may use, at most one per 3 GiB of memory (a
    worker's JAX programs plus the CLI subprocesses it starts peak near 2 GiB) and at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        by_memory = max(1, avail_kib // (3 * 1024 * 1024))
    except (OSError, StopIteration, ValueError):
        by_memory = cores
    return max(1, min(cores, by_memory, 8))


_XDIST_CONTROLLER = False


# The marker expressions of the CI tiers that compile quickly: the default suite (setup.cfg's addopts, the README's
# test command) and CI's slow pass (.ci/run).
QUICK_TIERS = ("not slow and not nightly", "slow and not nightly")


def _quick_compiles(config) -> bool:
    """Whether this session compiles with most of XLA's optimisation off (``jax_disable_most_optimizations``:
    LLVM at level 0, no expensive passes). CI's tiers are compile-bound -- hundreds of small programs run for a few
    updates each, in this process and in the CLI runs it starts -- and compile 20-25% faster so (measured 2026-12-08
    on 2 cores: tests/test_cli_documented.py + tests/test_guards.py 125 -> 102 s). A test whose time goes into
    running programs (a learning run, an LLM answering) says so with ``@pytest.mark.run_bound`` and keeps XLA's
    defaults: unoptimised it runs up to 3.5x slower, and the learning tests' bounds were measured optimised. The
    nightly tier keeps the defaults throughout. ``JAX_DISABLE_MOST_OPTIMIZATIONS=0|1`` set by the caller wins."""
    if "JAX_DISABLE_MOST_OPTIMIZATIONS" in os.environ:
        return os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true")
    return (config.option.markexpr or "").strip() in QUICK_TIERS


_QUICK = False


def _set_quick(on: bool) -> None:
    import jax
    jax.config.update("jax_disable_most_optimizations", on)  # this process (JAX reads the env only at import)
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1" if on else "0"  # the CLI runs, services, workers it starts


def pytest_configure(config):
    global _XDIST_CONTROLLER, _QUICK
    _XDIST_CONTROLLER = bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")
    _QUICK = _quick_compiles(config)
    if _QUICK:
        _set_quick(True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A ``run_bound`` test compiles with XLA's defaults in a quick tier (see :func:`_quick_compiles`): around its
    whole protocol, so that the module fixtures its setup starts (an LLM server, a service) run optimised too."""
    run_bound = _QUICK and item.get_closest_marker("run_bound") is not None
    if run_bound:
        _set_quick(False)
    try:
        yield
    finally:
        if run_bound:
            _set_quick(True)


def pytest_report_header(config):
    log = os.environ.get("PYTEST_PROGRESS_LOG")
    return f"per-test durations are appended to {log}" if log else None


def _progress(line: str) -> None:
    log = os.environ.get("PYTEST_PROGRESS_LOG")
    # with parallel workers each worker writes its own tests' lines (the controller sees the same reports again)
    if log and (os.environ.get("PYTEST_XDIST_WORKER") or not _XDIST_CONTROLLER):
        with open(log, "a") as f:
            f.write(line + "\n")


def pytest_runtest_logreport(report):
    """With ``PYTEST_PROGRESS_LOG=FILE``, append each test phase's duration as it ends ("start" lines as tests begin),
    so that a pass killed by its time limit can still say which tests ran long (``.ci/run`` prints it)."""
    _progress(f"{report.duration:.2f}\t{report.when}\t{report.outcome}\t{report.nodeid}")


def pytest_runtest_logstart(nodeid, location):
    _progress(f"{time.time():.0f}\tstart\t-\t{nodeid}")
