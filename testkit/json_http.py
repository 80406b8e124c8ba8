"""The JSON-over-HTTP plumbing both API stand-ins share."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any

from services.core.http_api.server import send_json


class JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def send_json(self, status: int, body: dict[str, Any]) -> None:
        send_json(self, status, body)

    def read_json(self) -> Any:
        length = int(self.headers.get("Content-Length", 0))
        return json.loads(self.rfile.read(length) or b"{}")
