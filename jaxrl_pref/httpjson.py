"""The JSON-over-HTTP handler the project's local services share (the annotator service, the OpenAI-compatible LLM
server): quiet logs, ``send_json(code, obj)``."""
from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


class JSONHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet: requests are frequent
        pass

    def send_json(self, code: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
