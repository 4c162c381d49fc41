"""Who labels the agent's messages: the annotator options every LLM-feedback experiment composes, and starting the
service they describe."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

from jaxrl_pref.annotation.backends import BACKENDS
from jaxrl_pref.config import require


@dataclasses.dataclass(frozen=True)
class AnnotatorConfig:
    """The annotator service and its backend (each field is a flag of ``experiments.oni``)."""
    annotator: str = "embedded"
    """Who labels messages: embedded (offline MiniLM similarity, no GPU/network), openai (an OpenAI-compatible
    chat-completions server, see --llm-base-url / --llm-model), scripted (instant keyword labels with no model,
    for tests and benchmarks of the pipeline) or bow (ELLM-BoW: cosine similarity of bag-of-words embeddings to the
    task's goal statement; what --method ellm uses)."""
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
        require(self.label_wait >= 0, "label_wait", f"must be >= 0 seconds, got {self.label_wait}",
                "pass e.g. --label-wait 60 (or 0: never wait for the annotator)")

    def store_path(self, run_dir) -> str:
        return self.label_store or str(Path(run_dir) / "labels.db")

    def task(self, env_name: str) -> str:
        from jaxrl_pref.annotation.backends import task_for_env
        return self.prompt_task or task_for_env(env_name)


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


def start_annotator(cfg: AnnotatorConfig, run_dir):
    """``(supervisor or None, url)``: the service named by ``--annotator-url`` (None: not ours to run), or a new
    supervised child process writing ``run_dir/annotator.log`` and restarted whenever it dies (see
    :class:`~jaxrl_pref.annotation.client.Supervisor`). The openai annotator is checked first (:func:`check_llm`).
    A client made afterwards with ``AnnotatorClient(url, task)`` writes its messages ahead into the label store."""
    from jaxrl_pref.annotation.client import remember_store, start_server
    if cfg.annotator_url:
        if cfg.label_store:
            remember_store(cfg.annotator_url, cfg.label_store)
        return None, cfg.annotator_url
    extra = []
    if cfg.annotator == "openai":
        check_llm(cfg)
        extra = ["--base-url", cfg.llm_base_url, "--model", cfg.llm_model, "--api-key-env", cfg.llm_api_key_env,
                 "--preflight", "False"]  # checked here; a restarted service must not refuse to start
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
