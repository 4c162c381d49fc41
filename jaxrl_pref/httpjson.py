"""What the project's local HTTP services share (the annotator service, the OpenAI-compatible LLM server): a JSON
handler (quiet logs, ``send_json(code, obj)``) and the port file a starter reads the bound port from."""
from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path


def write_port_file(path: str, port: int) -> None:
    """Writes ``port`` to ``path`` atomically (a reader never sees a half-written file)."""
    tmp = Path(path + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


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
