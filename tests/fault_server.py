"""FaultServer: a fault injector speaking the OpenAI HTTP API, for testing failure handling.

It is not a model: a successful answer is ``"echo: <key>"``. What it exists for is misbehaving on
a schedule that real servers cannot be made to follow: 429 and 500 answers, a hang past the
client's timeout, a 200 with truncated JSON, a 401. The schedule is keyed by the request's last
user message (chat) or its prompt's last line (completions), so it holds under concurrency.
Answers to real models are tested against a real vLLM OpenAI server (test_openai_backend.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ACTIONS = ("ok", "429", "500", "hang", "truncated", "401")


class FaultServer:
    def __init__(self, *, delay: float = 0.0, hang: float = 3.0):
        self.delay = delay  # seconds every answer takes
        self.hang = hang  # seconds a "hang" lasts (set it past the client's timeout)
        self.schedule: dict[str, list[str]] = {}
        self.attempts: defaultdict[str, int] = defaultdict(int)
        self.intervals: list[tuple[str, float, float]] = []  # (key, start, end) of every answered request
        self.auth_headers: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "fault-model", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.auth_headers.append(self.headers.get("Authorization", ""))
                chat = self.path.endswith("/chat/completions")
                key = body["messages"][-1]["content"] if chat else body["prompt"].rstrip().splitlines()[-1]
                key = key.strip()
                with server._lock:
                    attempt = server.attempts[key]
                    server.attempts[key] += 1
                    plan = server.schedule.get(key, [])
                    action = plan[attempt] if attempt < len(plan) else "ok"
                start = time.monotonic()
                try:
                    time.sleep(server.delay)
                    self._act(action, key, chat)
                finally:
                    with server._lock:
                        server.intervals.append((key, start, time.monotonic()))

            def _act(self, action: str, key: str, chat: bool) -> None:
                if action == "hang":
                    time.sleep(server.hang)
                    action = "ok"  # too late: the client has given up on this attempt
                if action in ("429", "500", "401"):
                    error = {"error": {"message": f"injected {action}", "type": "fault", "code": action}}
                    self._send(int(action), error, {"retry-after-ms": "10"})
                    return
                text = f"echo: {key}"
                choice = (
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    if chat
                    else {"index": 0, "text": text, "finish_reason": "stop"}
                )
                payload = {
                    "id": "x",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": 0,
                    "model": "fault-model",
                    "choices": [choice],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
                }
                if action == "truncated":
                    raw = json.dumps(payload).encode()
                    self._send_raw(200, raw[: len(raw) // 2])
                else:
                    self._send(200, payload)

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                self._send_raw(status, json.dumps(payload).encode(), headers)

            def _send_raw(self, status: int, raw: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def plan(self, schedule: dict[str, list[str]]) -> None:
        """Set what the attempts for each key get, e.g. ``plan({"q1": ["429", "429"]})`` (then "ok")."""
        for actions in schedule.values():
            assert all(a in ACTIONS for a in actions), actions
        self.schedule.update(schedule)

    def max_in_flight(self, keys: set[str]) -> int:
        """The most requests for ``keys`` that the server was handling at the same moment."""
        events = sorted((t, d) for k, a, b in self.intervals if k in keys for t, d in ((a, 1), (b, -1)))
        level = peak = 0
        for _, delta in events:
            level += delta
            peak = max(peak, level)
        return peak

    def reset(self) -> None:
        with self._lock:
            self.schedule.clear()
            self.attempts.clear()
            self.intervals.clear()
            self.auth_headers.clear()

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
