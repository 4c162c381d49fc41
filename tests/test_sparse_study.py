"""experiments.sparse_study: its statistics, its commands, and (slow) a small study end to end with resume."""
import numpy as np
import pytest

from experiments import sparse_study as ss


def test_t_quantiles_and_confidence_interval(monkeypatch):
    import builtins
    from jaxrl_pref.stats import t_quantile
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("scipy") else real_import(name, *a, **k))  # the fallback without scipy
    # reference values of Student's t 97.5% quantile
    for df, t in ((1, 12.706), (2, 4.303), (10, 2.228), (12, 2.179), (20, 2.086), (40, 2.021), (120, 1.980)):
        assert abs(t_quantile(df + 1) - t) < 2e-3, df
    m, h = ss.mean_ci([0.0, 1.0, 0.5])
    assert m == pytest.approx(0.5) and h == pytest.approx(4.303 * 0.5 / np.sqrt(3), rel=1e-3)
    assert ss.mean_ci([0.3, np.nan, 0.5]) == (pytest.approx(0.4), pytest.approx(12.706 * np.std([0.3, 0.5], ddof=1)
                                                                                 / np.sqrt(2), rel=1e-3))
    assert np.isnan(ss.mean_ci([1.0])[1])


def test_steps_to_half_success_weighs_the_episodes_of_a_window():
    steps = np.arange(1, 11) * 100.0
    s = np.array([0, 0, np.nan, 1, 1, 1, 1, np.nan, 1, 1], np.float64)
    e = np.where(np.isnan(s), 0, 4)
    # the episodes of the last 5 updates: at index 4 they are 4 x 0, 4 x 0, 4 x 1, 4 x 1 (index 2 ended none) -> 0.5
    assert ss.steps_to(s, steps, e) == 500.0
    assert np.isnan(ss.steps_to(s, steps, e, min_episodes=17))  # no window holds more than 16 episodes
    assert np.isnan(ss.steps_to(np.zeros(10), steps, np.full(10, 4)))
    assert ss.steps_to(np.ones(10), steps, np.full(10, 10), window=1) == 100.0
    # weighted by the episodes that ended: one early success among many failures is not 50%
    assert np.isnan(ss.steps_to(np.array([1.0, 0, 0, 0]), steps[:4], episodes=np.array([1, 5, 5, 5])))
    assert np.isnan(ss.steps_to(np.array([1.0, np.nan]), steps[:2], min_episodes=2))  # 1 episode: not a rate
    np.testing.assert_allclose(ss.windowed(np.array([1.0, 0.0]), np.array([1, 3])), [1.0, 0.25])


def test_summary_counts_never_reached_at_the_budget():
    steps = np.tile(np.arange(1, 21) * 1000.0, (3, 1))
    succ = np.zeros((3, 20))
    succ[0, 5:] = 1.0  # reaches 50% at update index 7 (window 5)
    c = {"env_steps": steps, "success": succ, "return": succ * 2, "episodes": np.full((3, 20), 4.0)}
    r = ss.summarise(c)
    assert r["reached_50"] == 1 and r["per_seed"]["success"] == [1.0, 0.0, 0.0]
    assert r["steps_to_50"][0] == pytest.approx((8000 + 20000 + 20000) / 3)
    assert r["success"][0] == pytest.approx(1 / 3) and r["return"][0] == pytest.approx(2 / 3)


def test_commands_vmap_seeds_on_jax_tasks_and_split_them_on_the_pool(tmp_path):
    cfg = ss.StudyConfig(tasks=("deepsea10", "minihack_keyroom"), num_seeds=4, pool_seeds=3, out=str(tmp_path),
                         scale=0.5)
    run, = ss.runs(cfg, "deepsea10", "rnd")
    argv = run.command()
    assert run.run_dir == tmp_path / "deepsea10" / "rnd" and run.name == "deepsea10/rnd"
    assert argv[2] == "experiments.ppo" and argv[-2:] == ["--run-dir", str(run.run_dir)] and "--resume" in argv
    assert argv[argv.index("--num-seeds") + 1] == "4" and argv[argv.index("--seed") + 1] == "1000"
    assert argv[argv.index("--bonus") + 1] == "rnd"
    assert argv[argv.index("--total-timesteps") + 1] == str(ss.TASKS["deepsea10"]["steps"] // 2)
    runs = ss.runs(cfg, "minihack_keyroom", "ppo")  # --pool-seeds of them, one per seed key
    assert [r.run_dir.name for r in runs] == ["seed1000", "seed1001", "seed1002"] and "--bonus" not in runs[0].argv
    assert [r.name for r in runs] == [f"minihack_keyroom/ppo/seed{1000 + i}" for i in range(3)]
    assert all(r.argv[r.argv.index("--seed") + 1] == str(1000 + i) for i, r in enumerate(runs))
    assert all("--num-seeds" not in r.argv for r in runs)
    from jaxrl_pref.config import ConfigError
    for kw in (dict(tasks=("nosuch",)), dict(methods=("icm",)), dict(num_seeds=1), dict(pool_seeds=1),
               dict(first_seed=-1)):
        with pytest.raises(ConfigError):
            ss.StudyConfig(**kw)
    assert ss.StudyConfig().num_seeds == 10 and ss.StudyConfig().first_seed == 1000  # the issue's >= 10 per cell


README_KEYS = set(range(8))  # the README main job's keys 0-7 (`--num-seeds 8 --first-seed 0`)
ONE_OFF_KEYS = {s + i for s in (0, 10, 20, 30) for i in range(8)}  # the 32-seed KeyDoor-9 checks (docs): 0-37


def _keys(run) -> set:
    a = run.argv
    n = int(a[a.index("--num-seeds") + 1]) if "--num-seeds" in a else 1
    return set(range(int(a[a.index("--seed") + 1]), int(a[a.index("--seed") + 1]) + n))


def test_seed_keys_are_paired_across_methods_and_disjoint_from_the_readme_and_one_off_checks(tmp_path):
    """Every method of a task runs the same seed keys (paired), first_seed on: --num-seeds of them on a JAX task,
    --pool-seeds on the pool; the default keys (1000 on) share none with the README main job (0-7) or the
    KeyDoor-9 checks of --seed 0/10/20/30 x 8, at any seed count up to a block of 1000; another study's block
    (--first-seed 2000) shares none with this one's."""
    for n in (2, 10, 32, 1000):
        cfg = ss.StudyConfig(methods=ss.ALL_METHODS, num_seeds=n, pool_seeds=min(n, 5), out=str(tmp_path))
        for task in cfg.tasks:
            arms = [m for m in cfg.methods if not ss.not_applicable(task, m)]
            keys = {m: set().union(*map(_keys, ss.runs(cfg, task, m))) for m in arms}
            want = set(ss.seed_keys(cfg, task))
            assert all(k == want for k in keys.values()), (task, keys)  # paired
            assert len(want) == (min(n, 5) if task == "minihack_keyroom" else n) and min(want) == 1000
            assert not want & (README_KEYS | ONE_OFF_KEYS) and max(want) < 2000
    other = ss.StudyConfig(num_seeds=32, first_seed=2000, out=str(tmp_path))
    assert set(ss.seed_keys(other, "keydoor9")) == set(range(2000, 2032))
    readme = ss.StudyConfig(tasks=("keydoor9",), methods=("ppo", "motif"), num_seeds=8, first_seed=0,
                            out=str(tmp_path))
    assert set().union(*(_keys(r) for m in readme.methods for r in ss.runs(readme, "keydoor9", m))) == README_KEYS


def test_every_arm_of_a_task_learns_at_the_tasks_reward_scale(tmp_path):
    """Each run's command read back by its experiment's own parser (nothing trained): on every task, every arm's
    extrinsic coefficient is the task's (experiments.ppo learns from 1 * r_ext, so the task's must be 1), every
    LLM-feedback arm has the task's one intrinsic coefficient, and the control arm is the same pipeline (Motif) at
    int_coef 0; the table's caption and results.json say the same."""
    cfg = ss.StudyConfig(methods=ss.ALL_METHODS, num_seeds=2, pool_seeds=2, out=str(tmp_path))
    seen = set()
    for task, t in ss.TASKS.items():
        assert t["ext_coef"] == 1.0, task  # what experiments.ppo's arms learn from, having no coefficient
        ints = {}
        for method in cfg.methods:
            if ss.not_applicable(task, method):
                continue
            opts = ss.parse_run(ss.runs(cfg, task, method)[0])
            ext, int_coef = ss.reward_scale(opts)
            assert ext == t["ext_coef"], (task, method, ext)
            scale = ss.arm_scale(cfg, task, method)
            assert scale["ext_coef"] == ext
            if method in ss._PPO_METHODS:
                assert "oni" not in opts.sections and scale["int_coef"] is None, (task, method)
            else:
                assert scale["int_coef"] == int_coef
                ints[method] = int_coef
            seen.add(method)
        if ints:
            control = ints.pop("control")
            assert control == 0.0 and set(ints.values()) == {t["int_coef"]}, (task, ints)
            opts = ss.parse_run(ss.runs(cfg, task, "control")[0])
            assert opts.oni.method == "motif" and opts.motif.motif_dir.endswith(f"{task}/motif-data")
        assert f"{task}: 1 × r_ext for every arm; + {t['int_coef']:g} × normalised r_int" in ss.scale_caption(task)
    assert seen == set(ss.ALL_METHODS)
    assert ss.TASKS["keydoor9"]["int_coef"] == pytest.approx(0.4 / 10)  # ONI's intrinsic:extrinsic ratio


def test_ablation_arms_run_what_they_say(tmp_path):
    """The ablations on KeyDoor-9 as their experiments read them: the goal cut to the end goal (recorded in the run's
    config), the constant annotator with ONI's retrieval model, the LLM annotator zero- and 4-shot, hand shaping
    of the key and door captions once per episode; each Motif variant with a dataset dir of its own. Not run on
    tasks they are not defined for, saying why."""
    cfg = ss.StudyConfig(tasks=("keydoor9",), methods=ss.ABLATIONS, num_seeds=2, out=str(tmp_path))
    o = {m: ss.parse_run(ss.runs(cfg, "keydoor9", m)[0]) for m in ss.ABLATIONS}
    end = o["motif-endgoal"]
    assert end.oni.method == "motif" and end.annotator.goal == ("Reach the goal.",) and end.annotator.annotator == \
        "embedded" and end.config.goal == ("Reach the goal.",)
    assert end.annotator.task("KeyDoor-9").startswith("keydoor-goal-")
    count = o["motif-count"]
    assert (count.oni.method, count.oni.reward_model, count.annotator.annotator) == ("oni", "retrieval", "constant")
    assert count.annotator.label_wait > 0 and count.captioned.label_sync_every == 1 and count.oni.count_beta == 0.5
    for m, shots in (("motif-llm", 0), ("motif-llm-fewshot", 4)):
        assert (o[m].oni.method, o[m].annotator.annotator, o[m].annotator.llm_shots) == ("motif", "llm", shots)
    sh = o["shaping"]
    assert sh.shaping.shaping_captions == ("You pick up the key.", "The door opens.") and sh.shaping.shaping_once
    assert sh.shaping.shaping_reward == 1.0 and sh.bonus.bonus == "none"
    dirs = [o[m].motif.motif_dir for m in ("motif-endgoal", "motif-llm", "motif-llm-fewshot")]
    assert len(set(dirs)) == 3 and str(tmp_path / "keydoor9" / "motif-data") not in dirs
    assert "--methods" in ss.__doc__ and all(m in ss.__doc__ for m in ss.ABLATIONS)
    assert ss.StudyConfig().methods == ss.METHODS and not set(ss.ABLATIONS) & set(ss.METHODS)  # named to run
    for m in ss.ABLATIONS:
        assert ss.not_applicable("doorkey16", m) is None
        assert "no messages" in ss.not_applicable("deepsea10", m)
        if m in ss.POOL_ARMS:  # the LLM annotator's Motif arms: the annotator split runs them on the pool too
            assert ss.not_applicable("minihack_keyroom", m) is None
        else:
            assert "captioned JAX tasks" in ss.not_applicable("minihack_keyroom", m)
    assert ss.not_applicable("minihack_keyroom", "control") is None and ss.not_applicable("deepsea10", "control")


@pytest.mark.slow
def test_a_small_study_runs_reports_and_resumes(tmp_path, capsys):
    argv = ["--tasks", "deepsea10", "--methods", "ppo", "e3b", "--num-seeds", "2", "--scale", "0.05", "--out",
            str(tmp_path)]
    assert ss.main(argv) == 0
    text = (tmp_path / "results.md").read_text()
    assert "| deepsea10 | DeepSea-10 | ppo |" in text and "| deepsea10 | DeepSea-10 | e3b |" in text
    assert (tmp_path / "deepsea10.png").is_file() and (tmp_path / "deepsea10" / "e3b" / "done").is_file()
    capsys.readouterr()
    assert ss.main(argv) == 0  # everything done: nothing is run again
    assert "+ " not in capsys.readouterr().out


def test_curves_read_the_runs_metrics(tmp_path):
    """What the runs write (metrics.csv: a row per seed and update) comes back as [seeds, updates] curves."""
    from jaxrl_pref.logging import write_metrics
    succ = np.array([[0, np.nan, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, np.nan]], np.float32)
    for i, d in enumerate(("a", "b")):
        write_metrics(tmp_path / d, {"episode_success": succ, "episode_return": succ * 2,
                                     "episodes": np.where(np.isnan(succ), 0, 5).astype(np.float32)},
                      steps_per_update=100)
    c = ss.curves([tmp_path / "a", tmp_path / "b"])
    assert c["success"].shape == (4, 8) and c["env_steps"][0].tolist() == [100 * (i + 1) for i in range(8)]
    np.testing.assert_array_equal(c["return"][1], succ[1] * 2)
    r = ss.summarise(c)
    assert r["per_seed"]["success"] == [1.0, 0.0, 1.0, 0.0] and r["reached_50"] == 2
    # episodes of updates 1-3: 5 x 0, none, 5 x 1: 10 episodes, half succeeded
    assert r["per_seed"]["steps_to_50"][0] == 300.0


def test_llm_feedback_methods_run_through_experiments_oni(tmp_path):
    cfg = ss.StudyConfig(tasks=("keydoor9", "minihack_keyroom"), methods=ss.METHODS, num_seeds=2, pool_seeds=2,
                         out=str(tmp_path))
    run, = ss.runs(cfg, "keydoor9", "oni-ranking")
    argv = run.argv
    assert run.module == "experiments.oni" and argv[argv.index("--reward-model") + 1] == "ranking"
    assert "--num-seeds" in argv  # captioned JAX task: seeds vmapped in the jitted loop
    runs = ss.runs(cfg, "minihack_keyroom", "motif")
    assert len(runs) == 2 and all(r.argv[r.argv.index("--motif-dir") + 1] ==
                                  str(tmp_path / "minihack_keyroom" / "motif-data")
                                  for r in runs)  # one dataset and model for every seed
    argv = ss.runs(cfg, "keydoor9", "ellm")[0].argv
    assert argv[argv.index("--method") + 1] == "ellm"
    assert ss.not_applicable("deepsea10", "ellm") and ss.not_applicable("deepsea10", "motif")
    assert ss.not_applicable("keydoor9", "motif") is None
    assert ss.not_applicable("keydoor9", "oni-retrieval") is None and ss.not_applicable("minihack_keyroom", "motif") is None


def test_extra_args_value_may_start_with_dashes(tmp_path):
    """``--extra-args '--bonus-coef 0.5'`` (one shell word that starts with --) is the option's value, as
    ``--extra-args='--bonus-coef 0.5'`` is, not a flag of its own ("Missing value" before)."""
    from jaxrl_pref.config import cli
    for argv in (["--extra-args", "--bonus-coef 0.5"], ["--extra-args=--bonus-coef 0.5"]):
        cfg = cli(ss.StudyConfig, ss.attach_extra_args(["--tasks", "keydoor9", *argv, "--out", str(tmp_path)]))
        assert cfg.extra_args == "--bonus-coef 0.5" and cfg.out == str(tmp_path)
        run_argv = ss.runs(cfg, "keydoor9", "ppo")[0].argv
        assert run_argv[run_argv.index("--bonus-coef") + 1] == "0.5"
    cfg = ss.StudyConfig(tasks=("keydoor9",), methods=("ppo",), num_seeds=2, out=str(tmp_path),
                         extra_args="--bonus-coef 0.5")
    assert ss.check_commands(cfg) == []  # the runs' own parser accepts them


def test_extra_args_typo_fails_before_the_study_starts(tmp_path):
    """A typo in ``--extra-args`` is caught by the runs' own parser before any run starts: one ``error:`` line naming
    the runs, the option and the fix; exit 2; nothing run or written."""
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / "study"
    r = subprocess.run([sys.executable, "-m", "experiments.sparse_study", "--tasks", "keydoor9", "--methods", "ppo",
                        "e3b", "--num-seeds", "2", "--extra-args", "--bonus-coeff 0.5", "--out", str(out)],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: runs keydoor9/ppo, keydoor9/e3b (python -m experiments.ppo with --extra-args "
                               "'--bonus-coeff 0.5'): unrecognized options --bonus-coeff"), lines[0]
    assert "Fix: did you mean --bonus-coef?" in lines[0]
    assert "+ " not in r.stdout and not out.exists()


def test_statistics_table_counts_intervals_and_holm():
    """The study's statistics: solved counts with Clopper-Pearson intervals, IQM, P(better), Fisher's exact test
    against ppo on the same task, Holm-adjusted over the table's comparisons (hand-checked numbers)."""
    def cell(success, reached):
        return {"seeds": len(success), "reached_50": reached, "per_seed": {"success": list(success)}}
    results = {("keydoor9", "ppo"): cell([0.0] * 24 + [1.0] * 8, 8),
               ("keydoor9", "motif"): cell([0.0] * 15 + [1.0] * 17, 17),
               ("keydoor9", "control"): cell([0.0] * 24 + [1.0] * 8, 8),
               ("deepsea10", "e3b"): cell([1.0] * 4, 4)}  # no ppo on that task: nothing to compare with
    lines = ss.statistics(results)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in lines[2:]}
    assert rows[("keydoor9", "ppo")][:2] == ["8/32", "[0.11, 0.43]"] and rows[("keydoor9", "ppo")][3:] == ["", "", ""]
    solved, ci, iqm, better, p, p_holm = rows[("keydoor9", "motif")]
    assert (solved, ci) == ("17/32", "[0.35, 0.71]") and iqm.startswith("0.56 [")  # IQM: the middle 16 runs
    assert float(better) == pytest.approx(0.5 + (17 - 8) / 32 / 2, abs=5e-3)  # P(X > Y) + P(X = Y) / 2, 0/1 scores
    assert float(p) == pytest.approx(0.0394, abs=5e-4)  # Fisher's exact, 17/32 vs 8/32
    # two comparisons on keydoor9 (motif, control): Holm doubles the smaller p, keeps the larger (1) at 1
    assert float(p_holm) == pytest.approx(2 * float(p), rel=1e-3) and rows[("keydoor9", "control")][4:] == ["1", "1"]
    assert rows[("deepsea10", "e3b")][:2] == ["4/4", "[0.40, 1.00]"] and rows[("deepsea10", "e3b")][3] == ""


def test_annotator_arms_carry_their_annotator(tmp_path):
    """The method x annotator split on the pool (issue 36 item 4): Motif and ONI-retrieval with the embedded (the
    study's own arms, unchanged), the LLM and the reference annotator, as experiments.oni reads their commands; each
    Motif with a dataset dir of its own; the reference arms only where the reference set labels the task's prompt;
    every command passes its experiment's checks."""
    cfg = ss.StudyConfig(tasks=("minihack_keyroom", "minihack_lockeddoor"), pool_seeds=3, first_seed=3000,
                         methods=("motif", "oni-retrieval", "motif-llm", "oni-retrieval-llm", "motif-reference",
                                  "oni-retrieval-reference"), out=str(tmp_path))
    want = {"motif": ("motif", "embedded"), "oni-retrieval": ("oni", "embedded"), "motif-llm": ("motif", "llm"),
            "oni-retrieval-llm": ("oni", "llm"), "motif-reference": ("motif", "reference"),
            "oni-retrieval-reference": ("oni", "reference")}
    for task in cfg.tasks:
        dirs = set()
        for method, (kind, annotator) in want.items():
            assert ss.not_applicable(task, method) is None, (task, method)
            rs = ss.runs(cfg, task, method)
            assert [r.run_dir.name for r in rs] == ["seed3000", "seed3001", "seed3002"]  # the split's key block
            o = ss.parse_run(rs[0])
            assert (o.oni.method, o.annotator.annotator) == (kind, annotator), (task, method)
            assert (o.oni.ext_coef, o.oni.int_coef) == (1.0, ss.TASKS[task]["int_coef"])
            if kind == "oni":
                assert o.oni.reward_model == "retrieval"
            else:
                dirs.add(o.motif.motif_dir)
            if annotator == "llm":
                assert o.annotator.llm_shots == 0
        assert len(dirs) == 3 and str(tmp_path / task / "motif-reference-data") in dirs
    for task in ("keydoor9", "doorkey16"):  # captioned JAX tasks: no reference labels for their prompts
        assert "no labels" in ss.not_applicable(task, "motif-reference")
        assert ss.not_applicable(task, "oni-retrieval-llm") is None
    assert "no messages" in ss.not_applicable("deepsea10", "oni-retrieval-reference")
    assert set(ss.ANNOTATOR_ARMS) <= set(ss.ALL_METHODS) and not set(ss.ANNOTATOR_ARMS) & set(ss.METHODS)
    assert ss.StudyConfig().tasks == ss.STUDY_TASKS and "minihack_lockeddoor" not in ss.STUDY_TASKS  # named to run
    assert ss.check_commands(cfg) == []


def test_the_accelerator_command_runs_the_accelerator_scale_grid(tmp_path, capsys):
    """python -m experiments.accelerator_study: DoorKey-16x16 at 3M env steps and captioned Craftax-Classic at 1e7,
    >= 8 seeds vmapped per cell, every study method, its own seed block; --dry-run checks and prints every command
    and runs nothing; later flags win."""
    from jaxrl_pref.config import cli
    from experiments import accelerator_study as acc
    argv = acc.argv(["--out", str(tmp_path / "acc")])
    cfg = cli(ss.StudyConfig, ss.attach_extra_args(argv))
    assert cfg.tasks == ("doorkey16", "craftax_classic") and cfg.methods == ss.METHODS
    assert cfg.num_seeds >= 8 and cfg.budget("doorkey16") == 3_000_000 and cfg.budget("craftax_classic") >= 10 ** 7
    keys = set(ss.seed_keys(cfg, "doorkey16"))
    assert keys == set(range(5000, 5010)) and not keys & (set(range(1000, 2000)) | set(range(3000, 5000)))
    assert ss.TASKS["craftax_classic"]["env"] == "Craftax-Classic-Symbolic-v1"
    import envs
    assert envs.entry("Craftax-Classic-Symbolic-v1").captions is not None  # the LLM-feedback arms have messages
    for task, env, steps in (("doorkey16", "MiniGrid-DoorKey-16x16", 3_000_000),
                             ("craftax_classic", "Craftax-Classic-Symbolic-v1", 10_000_000)):
        for method in ("ppo", "motif"):
            run, = ss.runs(cfg, task, method)  # one process, the seeds vmapped
            o = ss.parse_run(run)
            assert (o.config.env_name, o.config.total_timesteps, o.run.num_seeds, o.run.seed) == \
                (env, steps, 10, 5000), (task, method)
    with pytest.raises(Exception):
        ss.StudyConfig(steps=("doorkey16=lots",))
    assert acc.main(["--out", str(tmp_path / "acc"), "--dry-run", "True", "--methods", "ppo", "motif"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all("--num-seeds 10 --seed 5000" in line for line in out)
    assert sum("--total-timesteps 3000000" in line for line in out) == 2
    assert sum("--total-timesteps 10000000" in line for line in out) == 2
    assert not (tmp_path / "acc").exists()  # nothing run, nothing written
