"""Who labels the agent's messages: the annotator options every LLM-feedback experiment composes, and starting the
service they describe."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxrl_pref.config import require


@dataclasses.dataclass(frozen=True)
class AnnotatorConfig:
    """The annotator service and its backend (each field is a flag of ``experiments.oni``)."""
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

    def __post_init__(self):
        require(self.annotator in ("embedded", "openai"), "annotator", f"unknown annotator {self.annotator!r}",
                "use --annotator embedded or --annotator openai")
        if self.annotator == "openai" and not self.annotator_url:
            require(bool(self.llm_base_url) and bool(self.llm_model), "llm_base_url",
                    "the openai annotator needs a server URL and a model name",
                    "pass --llm-base-url http://HOST:PORT/v1 --llm-model NAME")

    def store_path(self, run_dir) -> str:
        return self.label_store or str(Path(run_dir) / "labels.db")

    def task(self, env_name: str) -> str:
        from jaxrl_pref.annotation.backends import task_for_env
        return self.prompt_task or task_for_env(env_name)


def start_annotator(cfg: AnnotatorConfig, run_dir):
    """``(process or None, url)``: the service named by ``--annotator-url``, or a new child process writing
    ``run_dir/annotator.log``."""
    from jaxrl_pref.annotation.client import start_server
    if cfg.annotator_url:
        return None, cfg.annotator_url
    extra = []
    if cfg.annotator == "openai":
        extra = ["--base-url", cfg.llm_base_url, "--model", cfg.llm_model, "--api-key-env", cfg.llm_api_key_env]
    return start_server(cfg.store_path(run_dir), cfg.annotator, log_path=str(Path(run_dir) / "annotator.log"),
                        extra_args=extra)
