"""FaultServer: an OpenAI-compatible stand-in for a remote model, for the tests and the benchmarks.

It is not a model: a successful answer is ``"echo: <key>"``. It exists for what real servers cannot
be made to do on a schedule:

- **misbehave** — 429 and 500 answers, a hang past the client's timeout, a 200 with truncated JSON,
  a 401 (:meth:`FaultServer.plan`). The schedule is keyed by the request's last user message (chat)
  or its prompt's open query (completions in the SDK's base format; else its last line), so it
  holds under concurrency;
- **answer after an exact delay** (``delay``), serving requests in parallel, so that a client's
  concurrency can be measured against the ideal: ``n`` requests at concurrency ``c`` take
  ``ceil(n / c) * delay``. ``GET /stats`` reports the requests served and the most in flight at
  once (``/stats?reset=1`` also starts the counts again).

A chat request that offers ``tools`` gets a call to the first one. Every request body is kept
(``bodies``), so a test can read what a proxy sent.

It implements ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models``, with
HTTP/1.1 keep-alive and one thread per connection. In a test it runs in a thread (``with
FaultServer() as server``); a benchmark runs it in a process of its own (:func:`start_process`), so
that its Python work does not compete with the client's for one interpreter lock:

    python -m bench.fault_server --port 8011 --delay 0.2

Answers to real models are tested against a real vLLM OpenAI server (tests/test_openai_backend.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from auto_model.flags import ArgumentParser

ACTIONS = ("ok", "429", "500", "hang", "truncated", "401")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # the listen backlog: a burst of connections is never refused


class FaultServer:
    def __init__(self, *, delay: float = 0.0, hang: float = 3.0, port: int = 0):
        self.delay = delay  # seconds every answer takes
        self.hang = hang  # seconds a "hang" lasts (set it past the client's timeout)
        self.schedule: dict[str, list[str]] = {}
        self.attempts: defaultdict[str, int] = defaultdict(int)
        self.intervals: list[tuple[str, float, float]] = []  # (key, start, end) of every answered request
        self.auth_headers: list[str] = []
        self.bodies: list[dict[str, Any]] = []  # every request body, as received
        self.served = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections
            disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/stats"):
                    self._send(200, server.stats(reset="reset=1" in self.path))
                else:
                    self._send(200, {"object": "list", "data": [{"id": "fault-model", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                chat = self.path.endswith("/chat/completions")
                prompt = body.get("prompt")
                key = (
                    _chat_key(body["messages"])
                    if chat
                    else _prompt_key(prompt[0] if isinstance(prompt, list) else prompt)
                )
                with server._lock:
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                    server.bodies.append(body)
                    attempt = server.attempts[key]
                    server.attempts[key] += 1
                    plan = server.schedule.get(key, [])
                    action = plan[attempt] if attempt < len(plan) else "ok"
                    server.in_flight += 1
                    server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
                start = time.monotonic()
                try:
                    time.sleep(server.delay)
                    self._act(action, key, chat, body)
                finally:
                    with server._lock:
                        server.intervals.append((key, start, time.monotonic()))
                        server.in_flight -= 1
                        server.served += 1

            def _act(self, action: str, key: str, chat: bool, body: dict[str, Any]) -> None:
                if action == "hang":
                    time.sleep(server.hang)
                    action = "ok"  # too late: the client has given up on this attempt
                if action in ("429", "500", "401"):
                    note = f"injected {action}"
                    if action == "401":  # as some servers do: the rejected key, repeated back
                        note += f" for key {self.headers.get('Authorization', '')[7:]}"
                    error = {"error": {"message": note, "type": "fault", "code": action}}
                    self._send(int(action), error, {"retry-after-ms": "10"})
                    return
                text = f"echo: {key}"
                if chat and body.get("tools"):  # a tool call to the first tool offered
                    call = {"id": "call_1", "type": "function",
                            "function": {"name": body["tools"][0]["function"]["name"], "arguments": "{}"}}  # fmt: skip
                    called = {"role": "assistant", "content": None, "tool_calls": [call]}
                    choices: list[dict[str, Any]] = [{"index": 0, "message": called, "finish_reason": "tool_calls"}]
                elif chat:
                    message = {"role": "assistant", "content": text}
                    choices = [
                        {"index": i, "message": message, "finish_reason": "stop"} for i in range(body.get("n") or 1)
                    ]
                else:
                    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
                    choices = [{"index": i, "text": f"echo: {_prompt_key(p)}", "finish_reason": "stop",
                                "logprobs": None} for i, p in enumerate(prompts)]  # fmt: skip
                payload = {
                    "id": "x",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": body.get("model", "fault-model"),
                    "choices": choices,
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

        self.httpd = _HTTPServer(("127.0.0.1", port), Handler)
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

    def stats(self, reset: bool = False) -> dict[str, int]:
        """Requests served and the most in flight at once (since the start or the last reset)."""
        with self._lock:
            stats = {"served": self.served, "max_in_flight": self.peak_in_flight}
            if reset:
                self.served = self.peak_in_flight = 0
        return stats

    def reset(self) -> None:
        with self._lock:
            self.schedule.clear()
            self.attempts.clear()
            self.intervals.clear()
            self.auth_headers.clear()
            self.bodies.clear()
            self.served = self.peak_in_flight = 0

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _chat_key(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message (its text parts, for multi-part content)."""
    content = next(m.get("content") for m in reversed(messages) if m.get("role") == "user")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return str(content).strip()


def _prompt_key(prompt: Any) -> str:
    """The open query of a completions prompt in the SDK's base format (the lines between its last
    ``# Query:`` and ``# Answer:``), else its last line."""
    text = str(prompt).rstrip()
    head, found, tail = text.rpartition("# Query:\n")
    if found and "\n\n# Answer:" in tail:
        return tail.split("\n\n# Answer:")[0].strip()
    return text.splitlines()[-1].strip()


class ServerProcess:
    """A :class:`FaultServer` in a child process; ``base_url`` and :meth:`stats` talk to it."""

    def __init__(self, delay: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fault_server", "--port", "0", "--delay", str(delay)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("serving on "):
            self.proc.kill()
            raise RuntimeError(f"the fault server did not start: {line!r}")
        self.base_url = line.split()[2]

    def stats(self, reset: bool = False) -> dict[str, int]:
        root = self.base_url.rsplit("/v1", 1)[0]
        with urllib.request.urlopen(f"{root}/stats{'?reset=1' if reset else ''}", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_process(delay: float = 0.2) -> ServerProcess:
    return ServerProcess(delay)


def main() -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--delay", type=float, default=0.2)
    args = p.parse_args()
    server = FaultServer(delay=args.delay, port=args.port)
    print(f"serving on {server.url} (every answer after {args.delay} s)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
