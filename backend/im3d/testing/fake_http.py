"""The base of the small fake HTTP servers tests talk to (a lying backend, a Hub double, ...)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet request handler (no access log on stderr) that can answer with a JSON body."""

    def log_message(self, *args) -> None:
        pass

    def send_json(self, status: int, body: object, headers: dict | None = None) -> None:
        """Send `body` as JSON with `status` and any extra `headers` (no body for HEAD)."""
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
