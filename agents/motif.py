"""Motif (the ONI paper's offline baseline): a message reward learned once from annotated pairs, frozen, then PPO.

``python -m experiments.oni --method motif --motif-dir DIR`` runs four phases; each of the first three writes its
output into ``DIR`` and is skipped (said on the console) when a later run finds that output there:

1. **dataset** (``DIR/dataset.json``): ``--motif-steps`` env steps of a uniformly random policy
   (:func:`collect_dataset`: a NetHack/MiniHack pool, or a captioned JAX task rolled out in ``jit``); the distinct
   messages the steps produced (the message each action led to) and how often each was seen;
2. **pairs** (``DIR/pairs.json``, labels in ``DIR/labels.db`` unless ``--label-store``): ``--motif-pairs`` pairs of
   those messages (:func:`sample_pairs`), sent to the annotator service (``--annotator``, as ONI's) and waited for
   (:func:`annotate`: progress on the console, a timeout, unanswerable pairs reported). The store keeps every
   answer, so a rerun after a timeout or a crash asks only what is still unanswered;
3. **reward model** (``DIR/model.msgpack`` + ``DIR/model.json``): Bradley-Terry on the answered pairs, trained to
   convergence with a held-out split, frozen; its normalisation statistics and threshold over the dataset
   (:mod:`jaxrl_pref.rewards.motif`);
4. **PPO** on ``ext_coef * r_ext + int_coef * normalise(r_int)`` with ``r_int = 1[z(m) > eps] z(m) / N(m)^beta``
   from the frozen model (:func:`make_reward`: :class:`~jaxrl_pref.rewards.shaping.ShapedIntrinsic` in
   :class:`~jaxrl_pref.rewards.transform.ScaledSum`, as ONI's); on the pool ONI's host hook counts the messages into
   the table for the decay and asks the annotator nothing (:class:`NullClient`); on a captioned JAX task the frozen
   scores of the caption table and the per-caption counts live in the jitted loop
   (:class:`~jaxrl_pref.rewards.captioned.CaptionedIntrinsic`, no hook, seeds vmapped).

Each output records a hash of the one it was made from (``pairs.json`` of ``dataset.json``, ``model.json`` of
``pairs.json``): delete ``dataset.json`` and the pairs and the model are made again. docs/oni.md has the details.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from envs.messages import decode_messages
from jaxrl_pref import run_config
from jaxrl_pref.config import ConfigError, require
from jaxrl_pref.rewards import motif as rm
from jaxrl_pref.rewards.retrieval import message_hash_np

DATASET_FILE, PAIRS_FILE = "dataset.json", "pairs.json"
PAIR_SAMPLING = ("uniform", "counts")


@dataclasses.dataclass(frozen=True)
class MotifOptions:
    """Motif (--method motif): the offline dataset, its annotated pairs and the frozen reward model (docs/oni.md)."""
    motif_dir: str = ""
    """Directory of Motif's dataset, pairs, label store and reward model (default <run-dir>/motif). Whatever it
    already holds is reused, not recomputed: share it between runs (seeds) to train the reward model once."""
    motif_steps: int = 20000
    """Env steps of the random policy that collects the message dataset."""
    motif_pairs: int = 1000
    """Message pairs the annotator ranks (fewer when the dataset has fewer distinct pairs)."""
    motif_pair_sampling: str = "uniform"
    """How pair members are drawn from the dataset's distinct messages: uniform (each distinct message alike: the
    rare, informative ones are ranked too) or counts (as often as the random policy saw them, Motif's sampling of
    observations)."""
    motif_holdout: float = 0.2
    """Fraction of the answered pairs held out of training to measure the reward model's pair accuracy."""
    motif_epochs: int = 300
    """Most training epochs of the reward model (it stops earlier once the train loss stops improving)."""
    motif_patience: int = 20
    """Stop training after this many epochs without a train-loss improvement."""
    motif_quantile: float = 0.5
    """Threshold eps: this quantile of the normalised reward over the dataset's (non-empty) message steps; messages
    above it are paid. --threshold, if given, sets eps directly (in normalised units)."""
    motif_timeout: float = 3600.0
    """Seconds to wait for the annotator's answers; past it the run stops (the answers so far stay in the label
    store, and a rerun asks only for the rest)."""

    def __post_init__(self):
        for f in ("motif_steps", "motif_pairs", "motif_epochs", "motif_patience", "motif_timeout"):
            require(getattr(self, f) > 0, f, f"must be > 0, got {getattr(self, f)}",
                    f"pass a positive --{f.replace('_', '-')}")
        require(self.motif_pair_sampling in PAIR_SAMPLING, "motif_pair_sampling",
                f"unknown sampling {self.motif_pair_sampling!r}", f"use one of {', '.join(PAIR_SAMPLING)}")
        require(0 <= self.motif_holdout < 1, "motif_holdout", f"must be in [0, 1), got {self.motif_holdout}",
                "pass e.g. --motif-holdout 0.2")
        require(0 <= self.motif_quantile < 1, "motif_quantile", f"must be in [0, 1), got {self.motif_quantile}",
                "pass e.g. --motif-quantile 0.5")


def say(msg: str) -> None:
    print(f"motif: {msg}", file=sys.stderr, flush=True)


# -- phase 1: the dataset --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dataset:
    """Distinct messages (``texts``, ``""`` for steps without one) and how many steps produced each."""
    texts: list
    counts: np.ndarray
    env: str
    steps: int
    seed: int
    policy: str = "random"

    def to_json(self) -> bytes:
        return json.dumps({"env": self.env, "steps": self.steps, "seed": self.seed, "policy": self.policy,
                           "texts": list(self.texts), "counts": [int(c) for c in self.counts]}, indent=1).encode()

    @classmethod
    def from_json(cls, text) -> "Dataset":
        d = json.loads(text)
        return cls(list(d["texts"]), np.asarray(d["counts"], np.int64), d["env"], int(d["steps"]), int(d["seed"]),
                   d.get("policy", "random"))

    def as_dict(self) -> dict:
        return dict(zip(self.texts, (int(c) for c in self.counts)))


# -- the files of --motif-dir, read and checked before anything runs -------------------------------------------------
def _redo(file: Path, what: str) -> str:
    return f"delete it (rm {file}) and run the same command again: {what}"


REDO_DATASET = "the dataset is collected anew"
REDO_PAIRS = "the pairs are asked anew (the label store answers those it holds at once)"


def _read_json(file: Path, fix: str):
    """``file``'s JSON; ConfigError on ``motif_dir`` saying what is wrong with it (unreadable, not UTF-8, not JSON:
    where) and ``fix``."""
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise ConfigError("motif_dir", f"{file} cannot be read ({e.strerror})", fix) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        cut = e.reason == "unexpected end of data"  # a multi-byte character's first bytes, then the end
        raise ConfigError("motif_dir", f"{file} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start} of "
                          f"{len(raw)}: " + ("the file ends inside a character: cut short)" if cut else
                                             "a damaged file)"), fix) from None
    if not text.strip():
        raise ConfigError("motif_dir", f"{file} is empty", fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("motif_dir", f"{file} is not valid JSON at line {e.lineno} column {e.colno} ({e.msg}"
                          + ("; the file ends there: cut short" if e.pos >= len(text.rstrip()) else "") + ")",
                          fix) from None


def _read_object(file, redo: str, what: str):
    """``(file, fix, the JSON object in file)``; ConfigError if the file is not a JSON object (``what`` names what
    it should hold)."""
    file = Path(file)
    fix = _redo(file, redo)
    d = _read_json(file, fix)
    if not isinstance(d, dict):
        raise ConfigError("motif_dir", f"{file} holds a JSON {type(d).__name__}, not {what}", fix)
    return file, fix, d


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_dataset(file) -> Dataset:
    """``DIR/dataset.json``, checked: ConfigError (naming the file, the problem, the fix) if it is not one."""
    file, fix, d = _read_object(file, REDO_DATASET, "a Motif dataset")
    missing = [k for k in ("env", "steps", "seed", "texts", "counts") if k not in d]
    if missing:
        raise ConfigError("motif_dir", f"{file} is not a Motif dataset (no {', '.join(missing)})", fix)
    texts, counts = d["texts"], d["counts"]
    ok = (isinstance(d["env"], str) and _is_int(d["steps"]) and _is_int(d["seed"]) and isinstance(texts, list)
          and isinstance(counts, list) and len(texts) == len(counts) and all(isinstance(t, str) for t in texts)
          and all(_is_int(c) and c >= 0 for c in counts))
    if not ok:
        raise ConfigError("motif_dir", f"{file} is not a Motif dataset (env a string, steps and seed integers, texts "
                          "strings and counts integers, as many of each, expected)", fix)
    return Dataset.from_json(json.dumps(d))


def read_pairs(file) -> dict:
    """``DIR/pairs.json``, checked: ConfigError (naming the file, the problem, the fix) if it is not one."""
    file, fix, d = _read_object(file, REDO_PAIRS, "Motif's answered pairs")
    pairs, bad = d.get("pairs"), d.get("unanswerable", [])
    ok = (isinstance(d.get("dataset_sha256"), str) and isinstance(pairs, list) and bool(pairs)
          and all(isinstance(p, list) and len(p) == 3 and isinstance(p[0], str) and isinstance(p[1], str)
                  and isinstance(p[2], (int, float)) and not isinstance(p[2], bool) for p in pairs)
          and isinstance(bad, list) and all(isinstance(p, list) and len(p) == 2 for p in bad))
    if not ok:
        raise ConfigError("motif_dir", f"{file} is not Motif's answered pairs (dataset_sha256, and pairs: a non-empty "
                          "list of [message, message, preference], expected)", fix)
    return {**d, "unanswerable": bad}


def check_dir(directory, env_name: str) -> bool:
    """Reads and checks what ``directory`` (``--motif-dir``) holds before anything runs: ConfigError (one line: the
    file, the problem, the fix) for a damaged or foreign ``dataset.json`` / ``pairs.json``, a dataset of another
    env, a ``directory`` that is not a directory or cannot be written. Returns whether the annotator will be asked
    (no dataset yet, or no pairs made from it)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ConfigError("motif_dir", f"{d} is not a directory", "pass a directory to --motif-dir (it is created "
                          "if missing)")
    ds_file, pairs_file = d / DATASET_FILE, d / PAIRS_FILE
    ask = True
    if ds_file.exists():
        ds = read_dataset(ds_file)
        if ds.env != env_name:
            raise ConfigError("motif_dir", f"{ds_file} holds messages of {ds.env}, not {env_name}",
                              "pass another --motif-dir (one per env)")
        if pairs_file.exists():
            ask = read_pairs(pairs_file)["dataset_sha256"] != rm.file_sha(ds_file)
    complete = not ask and (d / rm.MODEL_FILE).exists() and (d / rm.STATS_FILE).exists()
    if d.is_dir() and not complete and not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError("motif_dir", f"{d} is not writable (Motif writes its dataset, pairs and model there)",
                          f"make it writable (chmod u+w {d}), or pass another --motif-dir")
    return ask


def _sorted(counts: dict) -> tuple[list, np.ndarray]:
    """Texts by decreasing count (then text), and their counts."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [t for t, _ in items], np.array([c for _, c in items], np.int64)


def collect_host(env, steps: int, seed: int = 0, policy: Optional[Callable] = None, every: float = 10.0,
                 say=say) -> tuple[list, np.ndarray, int]:
    """``steps`` (rounded up to whole batches) steps of a host env (``reset()``, ``step(actions)``: an
    :class:`~envs.nethack.NLEPool` or any env with that interface and ``num_envs`` / ``num_actions``): actions
    from ``policy(obs) -> int[num_envs]`` or uniformly random. Returns ``(texts, counts, steps done)``; a step's
    message is the one its action led to (``info["final_obs"]`` where an episode ended), as ONI counts them."""
    rng = np.random.default_rng(seed)
    n = env.num_envs
    obs = env.reset()
    keys, rows = [], {}
    last = start = time.monotonic()
    iters = math.ceil(steps / n)
    for i in range(iters):
        actions = rng.integers(env.num_actions, size=n) if policy is None else np.asarray(policy(obs))
        obs, _, _, _, info = env.step(actions)
        msgs = np.asarray(info["final_obs"]["message"] if "final_obs" in info else obs["message"])
        h1, h2 = message_hash_np(msgs)
        key = (h1.astype(np.uint64) << np.uint64(32)) | h2
        keys.append(key)
        for k, j in zip(*np.unique(key, return_index=True)):
            if int(k) not in rows:
                rows[int(k)] = msgs[j]
        now = time.monotonic()
        if now - last >= every:
            last = now
            say(f"dataset: {(i + 1) * n:,}/{iters * n:,} steps, {len(rows)} distinct messages "
                f"({(i + 1) * n / (now - start):.0f} steps/s)")
    uniq, cnt = np.unique(np.concatenate(keys), return_counts=True) if keys else (np.zeros(0), np.zeros(0))
    texts = decode_messages(np.stack([rows[int(k)] for k in uniq])) if len(uniq) else []
    counts: dict = {}
    for t, c in zip(texts, cnt):  # (a hash is of the text: one text per key)
        counts[t] = counts.get(t, 0) + int(c)
    return (*_sorted(counts), iters * n)


def collect_jax(name: str, steps: int, num_envs: int = 64, seed: int = 0) -> tuple[list, np.ndarray, int]:
    """:func:`collect_host` for a captioned JAX task (``envs.entry(name).captions``): a uniformly random
    rollout of ``num_envs`` envs in one jitted scan, the steps' ``info["message_id"]`` counted there, ids turned
    into texts by the task's caption table."""
    import jax
    import jax.numpy as jnp
    import envs
    from envs import captions
    table = captions.caption_table(name)
    env, params = envs.make(name, num_envs=num_envs)
    n_actions = envs.spec(env, params).num_actions
    iters = math.ceil(steps / num_envs)

    def run(key):
        k0, key = jax.random.split(key)
        _, state = env.reset(k0, params)

        def step(state, k):
            ka, ks = jax.random.split(k)
            a = jax.random.randint(ka, (num_envs,), 0, n_actions)
            _, state, _, _, _, info = env.step(ks, state, a, params)
            return state, jnp.bincount(info["message_id"].reshape(-1), length=len(table))
        return jax.lax.scan(step, state, jax.random.split(key, iters))[1].sum(0)

    counts = np.asarray(jax.jit(run)(jax.random.PRNGKey(seed)))
    return (*_sorted({table.texts[i]: int(c) for i, c in enumerate(counts) if c}), iters * num_envs)


def collect_dataset(env_name: str, steps: int, num_envs: int = 16, seed: int = 0, pool_cfg=None,
                    policy: Optional[Callable] = None) -> Dataset:
    """The random-policy message dataset of ``env_name``: a NetHack/MiniHack pool (``pool_cfg``: an
    :class:`~envs.nethack.PoolConfig`, whose ``obs_keys`` must include ``message``) or a captioned JAX task."""
    from envs import registry
    entry = registry.find(env_name)  # None: an unknown id, which has no messages either
    if entry is not None and entry.host:
        if pool_cfg is not None:
            pool = pool_cfg.make_pool(env_name, num_envs, seed)
        else:
            import envs
            pool = envs.make(env_name, num_envs=num_envs, seed=seed,
                             obs_keys=("glyphs_crop", "blstats", "message"))[0]
        try:
            texts, counts, done = collect_host(pool, steps, seed, policy)
        finally:
            pool.close()
    elif entry is not None and entry.captions is not None:
        require(policy is None, "policy", "a captioned JAX task's dataset is collected by a random policy",
                "leave policy out")
        texts, counts, done = collect_jax(env_name, steps, num_envs, seed)
    else:
        raise ConfigError("env_name", f"{env_name} has no messages (neither a NetHack/MiniHack task nor a "
                          "captioned JAX task)", "pass e.g. --env MiniHack-KeyRoom-Fixed-S5-v0")
    return Dataset(texts, counts, env_name, done, seed, "random" if policy is None else "given")


# -- phase 2: pairs and their annotation -----------------------------------------------------------------------------
def sample_pairs(texts: Sequence[str], counts: np.ndarray, num_pairs: int, how: str = "uniform",
                 seed: int = 0) -> list[tuple[str, str]]:
    """Up to ``num_pairs`` distinct unordered pairs of the dataset's messages, each in a random order (an
    annotator's position bias then averages out). A quarter of the budget (at least one pair, at most one per
    message) pairs a message with the empty message ``""``, the ranking model's zero point; the rest pair two
    non-empty messages, every such pair when there are few enough, else drawn ``how``: ``uniform`` over the
    distinct messages, or ``counts``-weighted (as often as the steps produced them)."""
    rng = np.random.default_rng(seed)
    msgs = [t for t in texts if t]
    w = np.array([c for t, c in zip(texts, counts) if t], np.float64)
    k = len(msgs)
    if k == 0:
        return []
    p = None if how == "uniform" else w / w.sum()
    n_empty = min(k, max(1, num_pairs // 4))
    out = [(msgs[i], "") for i in rng.choice(k, n_empty, replace=False, p=p)]
    rest = num_pairs - n_empty
    if rest > 0 and k >= 2:
        if k * (k - 1) // 2 <= rest:  # few messages: every pair
            out += [(msgs[i], msgs[j]) for i in range(k) for j in range(i + 1, k)]
        else:
            seen = set()
            for _ in range(50 * rest):
                i, j = rng.choice(k, 2, replace=False, p=p)
                key = (min(i, j), max(i, j))
                if key not in seen:
                    seen.add(key)
                    out.append((msgs[key[0]], msgs[key[1]]))
                    if len(seen) >= rest:
                        break
    flip = rng.random(len(out)) < 0.5
    return [(b, a) if f else (a, b) for (a, b), f in zip(out, flip)]


class NullClient:
    """An annotator client that asks nothing and answers nothing: Motif's PPO phase (no online labels)."""

    def submit(self, messages=(), pairs=()):
        pass

    def poll(self):
        return {}, []

    def metrics(self):
        return {}


@dataclasses.dataclass
class Answers:
    answered: list        # (a, b, pref) in the order asked
    unanswerable: list    # (a, b): the annotator gave up (unparseable replies)
    pending: list         # (a, b): no answer before the timeout


def annotate(client, pairs: Sequence[tuple], timeout: float, every: float = 5.0, poll: float = 0.1,
             say=say) -> Answers:
    """Submits ``pairs`` through ``client`` (``submit((), pairs)``, ``poll()``: an
    :class:`~jaxrl_pref.annotation.client.AnnotatorClient` or a stand-in) and waits for their answers, saying how
    many arrived every ``every`` s, for at most ``timeout`` s. Answers to other pairs (a shared store) are
    ignored."""
    pairs = [tuple(p) for p in pairs]
    want = set(pairs)
    got: dict = {}
    client.submit((), pairs)
    start = last = time.monotonic()
    while True:
        _, answers = client.poll()
        for a, b, pref in answers:
            if (a, b) in want:
                got[(a, b)] = pref
        now = time.monotonic()
        if len(got) >= len(want) or now - start > timeout:
            break
        if now - last >= every:
            last = now
            bad = sum(v is None for v in got.values())
            say(f"pairs: {len(got)}/{len(want)} answered" + (f" ({bad} unanswerable)" if bad else "")
                + f" after {now - start:.0f} s")
        time.sleep(poll)
    return Answers([(a, b, float(got[(a, b)])) for a, b in pairs if got.get((a, b)) is not None],
                   [(a, b) for a, b in pairs if (a, b) in got and got[(a, b)] is None],
                   [(a, b) for a, b in pairs if (a, b) not in got])


@contextlib.contextmanager
def service_client(annotator_cfg, env_name: str, directory):
    """The annotator service of ``annotator_cfg`` (started as ONI's, store and log in ``directory`` unless
    ``--label-store`` / ``--annotator-url`` say otherwise) and a client for it; stopped on exit."""
    from jaxrl_pref.annotation.client import AnnotatorClient, stop_server
    from jaxrl_pref.annotation.config import start_annotator
    proc, url = start_annotator(annotator_cfg, directory, env_name=env_name)
    client = AnnotatorClient(url, annotator_cfg.task(env_name), poll_interval=0.2)
    try:
        yield client
    finally:
        print(client.summary()["text"], file=sys.stderr)
        client.close()
        stop_server(proc)


# -- phases 1-3 with reuse -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    """What the PPO phase needs: the frozen model and its threshold, and where they came from."""
    model: rm.FrozenRanking
    threshold: float
    info: dict
    dataset: Dataset
    directory: Path

    @property
    def sha(self) -> str:
        return self.info["model_sha256"]


def prepare(cfg: MotifOptions, env_name: str, directory, *, collect: Callable[[], Dataset],
            connect: Callable[[], contextlib.AbstractContextManager], seed: int = 0, batch_size: int = 128,
            learning_rate: float = 3e-3, annotator: str = "", say=say) -> Prepared:
    """Phases 1-3 in ``directory``, each reused when its output is there (and made from the output before it):
    ``collect()`` gives the dataset; ``connect()`` a context manager yielding an annotator client (entered only
    when pairs must be asked)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ds_file, pairs_file = d / DATASET_FILE, d / PAIRS_FILE

    # 1. dataset
    if ds_file.exists():
        ds = read_dataset(ds_file)
        if ds.env != env_name:
            raise ConfigError("motif_dir", f"{ds_file} holds messages of {ds.env}, not {env_name}",
                              "pass another --motif-dir (one per env)")
        say(f"reusing the dataset {ds_file}: {ds.steps:,} steps of {ds.env} (seed {ds.seed}), {len(ds.texts)} distinct "
            "messages" + (f" (--motif-steps {cfg.motif_steps:,} asked: delete it to collect again)"
                          if ds.steps < cfg.motif_steps else ""))
    else:
        say(f"collecting the dataset: {cfg.motif_steps:,} steps of a random policy on {env_name}")
        t0 = time.monotonic()
        ds = collect()
        rm.write_atomic(ds_file, ds.to_json())
        say(f"dataset: {ds.steps:,} steps, {len(ds.texts)} distinct messages in {time.monotonic() - t0:.1f} s -> "
            f"{ds_file}")
    ds_sha = rm.file_sha(ds_file)

    # 2. pairs
    saved = read_pairs(pairs_file) if pairs_file.exists() else None
    if saved is not None and saved.get("dataset_sha256") == ds_sha:
        say(f"reusing the pairs {pairs_file}: {len(saved['pairs'])} answered"
            + (f", {len(saved['unanswerable'])} unanswerable" if saved["unanswerable"] else ""))
    else:
        if saved is not None:
            say(f"{pairs_file} was made from another dataset: asking for pairs again")
        pairs = sample_pairs(ds.texts, ds.counts, cfg.motif_pairs, cfg.motif_pair_sampling, seed)
        if not pairs:
            raise ConfigError("motif_steps", f"the dataset ({ds.steps:,} steps) has no non-empty message to rank",
                              "collect more steps: delete the dataset and pass a larger --motif-steps")
        say(f"asking the annotator to rank {len(pairs)} pairs of {sum(1 for t in ds.texts if t)} messages "
            f"({sum(1 for p in pairs if '' in p)} against the empty message; timeout {cfg.motif_timeout:g} s)")
        t0 = time.monotonic()
        with connect() as client:
            ans = annotate(client, pairs, cfg.motif_timeout, say=say)
        for a, b in ans.unanswerable[:5]:
            say(f"  unanswerable: {a!r} vs {b!r}")
        if ans.unanswerable:
            say(f"{len(ans.unanswerable)} pair(s) unanswerable (the annotator's replies did not parse): left out")
        if ans.pending:
            raise RuntimeError(f"{len(ans.pending)} of {len(pairs)} pairs still unanswered after --motif-timeout "
                               f"{cfg.motif_timeout:g} s ({len(ans.answered)} answered); the answers so far are in "
                               "the label store: run the same command again to wait for the rest (nothing is asked "
                               "twice), or pass a longer --motif-timeout")
        if not ans.answered:
            raise RuntimeError(f"the annotator answered none of the {len(pairs)} pairs (all unanswerable)")
        saved = {"dataset_sha256": ds_sha, "env": env_name, "annotator": annotator, "seed": seed,
                 "sampling": cfg.motif_pair_sampling, "pairs": [list(p) for p in ans.answered],
                 "unanswerable": [list(p) for p in ans.unanswerable]}
        rm.write_atomic(pairs_file, json.dumps(saved, indent=1).encode())
        say(f"pairs: {len(ans.answered)} answered in {time.monotonic() - t0:.1f} s -> {pairs_file}")
    pairs_sha = rm.file_sha(pairs_file)

    # 3. reward model
    info = None
    if (d / rm.STATS_FILE).exists() and (d / rm.MODEL_FILE).exists():
        try:
            params, info = rm.load(d)
            missing = [k for k in ("pairs_sha256", "epochs", "train_acc", "heldout_acc") if k not in info] + [
                f"stats.{k}" for k in ("mean", "std", "threshold", "quantile") if k not in info.get("stats", {})]
            if missing:
                raise ValueError(f"{d / rm.STATS_FILE} lacks {', '.join(missing)}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            say(f"cannot reuse the reward model in {d} ({e}): training it again")
            info = None
        if info is not None and info.get("pairs_sha256") != pairs_sha:
            say(f"the reward model in {d} was trained on other pairs: training it again")
            info = None
    if info is not None:
        say(f"reusing the reward model {d / rm.MODEL_FILE}: {info['epochs']} epochs, train acc "
            f"{info['train_acc']:.3f}, held-out acc {info['heldout_acc']:.3f}")
        if info["stats"]["quantile"] != cfg.motif_quantile:
            info["stats"] = rm.normalisation(params, ds.texts, ds.counts, cfg.motif_quantile)
            info = rm.save(d, params, {k: v for k, v in info.items() if k not in ("net", "model_sha256")})
            say(f"threshold recomputed for --motif-quantile {cfg.motif_quantile:g}")
    else:
        a, b, pref = zip(*saved["pairs"])
        say(f"training the reward model on {len(pref)} pairs ({cfg.motif_holdout:.0%} held out), at most "
            f"{cfg.motif_epochs} epochs")
        t0 = time.monotonic()

        def log(epoch, loss, acc, hacc):
            if epoch == 1 or epoch % 25 == 0:
                say(f"  epoch {epoch}: train loss {loss:.4f}, train acc {acc:.3f}, held-out acc {hacc:.3f}")
        fit = rm.fit(a, b, np.array(pref, np.float32), seed=seed, holdout=cfg.motif_holdout, epochs=cfg.motif_epochs,
                     patience=cfg.motif_patience, batch_size=batch_size, learning_rate=learning_rate, log=log)
        params = fit.params
        stats = rm.normalisation(params, ds.texts, ds.counts, cfg.motif_quantile)
        info = rm.save(d, params, {"pairs_sha256": pairs_sha, "dataset_sha256": ds_sha, "env": env_name,
                                   "epochs": fit.epochs, "train_loss": fit.train_loss, "train_acc": fit.train_acc,
                                   "heldout_acc": fit.heldout_acc, "n_train": fit.n_train,
                                   "n_heldout": fit.n_heldout, "seed": seed, "stats": stats})
        say(f"reward model: {fit.epochs} epochs in {time.monotonic() - t0:.1f} s, train loss {fit.train_loss:.4f}, "
            f"train acc {fit.train_acc:.3f}, held-out acc {fit.heldout_acc:.3f} ({fit.n_heldout} pairs) -> "
            f"{d / rm.MODEL_FILE}")
    s = info["stats"]
    say(f"normalisation over the dataset: mean {s['mean']:.4f}, std {s['std']:.4f}; threshold z > "
        f"{s['threshold']:.4f} (quantile {s['quantile']:g}) pays {s['paid_messages']} of {s['messages']} messages, "
        f"{s['paid_step_frac']:.1%} of the message steps")
    model = rm.FrozenRanking(params, s["mean"], s["std"])
    return Prepared(model, s["threshold"], info, ds, d)


def prepare_ensemble(prepared: Prepared, cfg: MotifOptions, size: int, aggregation: str, lam: float, *,
                     seed: int = 0, batch_size: int = 128, learning_rate: float = 3e-3, say=say) -> Prepared:
    """Motif with an ensemble of ``size`` frozen reward models (``--rm-ensemble``): member 0 is ``prepared``'s
    model, members 1.. are fitted as it was, each on a bootstrap resample of the answered pairs (drawn with
    replacement, seed ``seed + i``) and its own initialisation; each is normalised over the dataset as Motif's
    model is (its own mean and std), and the threshold is the ``--motif-quantile`` of the *aggregated* z over the
    dataset's message steps. Members are kept in ``<motif-dir>/ensemble/<i>/`` (reused while the pairs are the
    same)."""
    import hashlib

    import jax
    import jax.numpy as jnp

    from jaxrl_pref.rewards.ensemble import Ensemble, aggregate
    d = prepared.directory
    saved = read_pairs(d / PAIRS_FILE)
    pairs_sha = rm.file_sha(d / PAIRS_FILE)
    a, b, pref = (np.asarray(x) for x in zip(*saved["pairs"]))
    pref = pref.astype(np.float32)
    params = [prepared.model.params]  # member 0: the model prepare() trained or loaded
    infos = [prepared.info]
    for i in range(1, size):
        sub = d / "ensemble" / str(i)
        info = None
        if (sub / rm.STATS_FILE).exists():
            try:
                p_i, info = rm.load(sub)
                if info.get("pairs_sha256") != pairs_sha or info.get("seed") != seed + i:
                    info = None
            except (ValueError, KeyError, TypeError, OSError) as e:
                say(f"cannot reuse the ensemble member in {sub} ({e}): training it again")
                info = None
        if info is None:
            idx = np.random.default_rng(seed + i).integers(0, len(pref), len(pref))  # a bootstrap resample
            t0 = time.monotonic()
            fit = rm.fit(a[idx], b[idx], pref[idx], seed=seed + i, holdout=cfg.motif_holdout,
                         epochs=cfg.motif_epochs, patience=cfg.motif_patience, batch_size=batch_size,
                         learning_rate=learning_rate)
            sub.mkdir(parents=True, exist_ok=True)
            stats = rm.normalisation(fit.params, prepared.dataset.texts, prepared.dataset.counts, cfg.motif_quantile)
            info = rm.save(sub, fit.params, {"pairs_sha256": pairs_sha, "seed": seed + i, "epochs": fit.epochs,
                                             "train_acc": fit.train_acc, "heldout_acc": fit.heldout_acc,
                                             "stats": stats, "bootstrap": True})
            p_i = fit.params
            say(f"ensemble member {i}: {fit.epochs} epochs in {time.monotonic() - t0:.1f} s on a bootstrap resample "
                f"of the {len(pref)} pairs, held-out acc {fit.heldout_acc:.3f} -> {sub}")
        else:
            say(f"reusing the ensemble member {sub} (held-out acc {info['heldout_acc']:.3f})")
        params.append(p_i)
        infos.append(info)
    mean = np.array([x["stats"]["mean"] for x in infos], np.float32)
    std = np.array([x["stats"]["std"] for x in infos], np.float32)
    texts = [t for t in prepared.dataset.texts if t]
    w = np.asarray(prepared.dataset.counts, np.float64)[[bool(t) for t in prepared.dataset.texts]]
    z = np.stack([(rm.rewards(p, texts) - mu) / sd for p, mu, sd in zip(params, mean, std)])
    zagg = np.asarray(aggregate(jnp.asarray(z), aggregation, lam), np.float64)
    thr = rm.weighted_quantile(zagg, w, cfg.motif_quantile)
    stacked = {"params": jax.tree.map(lambda *x: jnp.stack(x), *params), "mean": jnp.asarray(mean),
               "std": jnp.asarray(std)}
    member = rm.FrozenRanking(params[0], mean[0], std[0])
    model = Ensemble(member, size, aggregation, lam, states=stacked)
    sha = hashlib.sha256("".join(x["model_sha256"] for x in infos).encode()).hexdigest()
    paid = zagg > thr
    say(f"Motif ensemble of {size} ({aggregation}{f', lam {lam:g}' if aggregation == 'lcb' else ''}): threshold z > "
        f"{thr:.4f} pays {int(paid.sum())} of {len(texts)} messages, {w[paid].sum() / w.sum():.1%} of the message "
        f"steps; member disagreement (std of z) {float(z.std(0).mean()):.3f} on average")
    info = {**prepared.info, "model_sha256": sha, "ensemble": size, "aggregation": aggregation}
    return Prepared(model, thr, info, prepared.dataset, d)


# -- phase 4: PPO ----------------------------------------------------------------------------------------------------
def make_reward(oni_cfg, prepared: Prepared, captions=None):
    """ONI's reward transform around the frozen model: ``ext_coef * r_ext + int_coef * normalise(r_int)``,
    ``r_int = 1[z > eps] z / N^beta``; eps is ``--threshold`` when given, else the model's quantile threshold.
    ``captions`` (a captioned JAX task's :class:`~envs.captions.CaptionTable`): the per-id form that runs inside the
    jitted loop (:class:`~jaxrl_pref.rewards.captioned.CaptionedIntrinsic`, counts by caption id in the device state,
    no host hook); None: the message table of the host loop."""
    from jaxrl_pref.rewards import ScaledSum
    from jaxrl_pref.rewards.captioned import CaptionedIntrinsic
    from jaxrl_pref.rewards.shaping import ShapedIntrinsic
    thr = oni_cfg.threshold if oni_cfg.threshold != -1.0 else prepared.threshold
    if captions is not None:
        shaped = CaptionedIntrinsic(prepared.model, captions.bytes, threshold=thr, beta=oni_cfg.count_beta)
    else:
        shaped = ShapedIntrinsic(prepared.model, threshold=thr, beta=oni_cfg.count_beta,
                                 table_capacity=oni_cfg.table_capacity)
    return ScaledSum(shaped, ext_coef=oni_cfg.ext_coef, int_coef=oni_cfg.int_coef,
                     normalize=oni_cfg.normalize_intrinsic)


def make_hook(oni_cfg, reward, seed: int = 0, state_key: Optional[str] = None):
    """ONI's host hook for Motif's PPO phase: it counts the messages into the table (the count decay) and asks
    nothing (:class:`NullClient`). It runs as for a message model (new messages to the client, which drops them),
    not as for ranking, which would draw new pairs after every rollout only to drop them."""
    from agents import oni
    return oni.ONILoop(dataclasses.replace(oni_cfg, reward_model="retrieval"), reward, NullClient(), seed,
                       state_key=state_key)


def check_resume(run_dir, sha: str, directory: Path) -> None:
    """A run resumed with another reward model than it started with would mix two rewards: refuse (the CLI skips
    this check with ``--no-resume``, which starts the run over)."""
    before = run_config.run_settings(run_dir).get("motif_model_sha256")
    if before and before != sha:
        raise ConfigError("motif_dir", f"the run in {run_dir} started with another Motif reward model than the one in "
                          f"{directory} now (model sha256 {before[:12]} then, {sha[:12]} now)",
                          "pass the --motif-dir it started with (with its model.msgpack unchanged), or --no-resume")
