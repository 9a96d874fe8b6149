"""An OpenAI-compatible server that answers every request after a fixed delay, serving requests in parallel.

It stands in for a remote model whose latency is known exactly, so that the client's concurrency
can be measured against the ideal: ``n`` requests at concurrency ``c`` take ``ceil(n / c) * delay``.
It implements ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models``, with
HTTP/1.1 keep-alive, one thread per connection. ``GET /stats`` reports the requests served and the
most that were in flight at once (``/stats?reset=1`` also starts the counts again).

It runs in a process of its own (:func:`start_process`), so that its Python work does not compete
with the client's for one interpreter lock.

    python -m bench.slow_server --port 8011 --delay 0.2
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from auto_model.flags import ArgumentParser


class SlowServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # the listen backlog: a burst of connections is never refused

    def __init__(self, port: int = 0, delay: float = 0.2):
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.served = 0
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections
    disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart (delayed ACK)
    server: SlowServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/stats"):
            server = self.server
            with server._lock:
                stats = {"served": server.served, "max_in_flight": server.max_in_flight}
                if "reset=1" in self.path:
                    server.served = server.max_in_flight = 0
            self._send(200, stats)
        elif self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": "slow-model", "object": "model", "owned_by": "bench"}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        server = self.server
        with server._lock:
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            time.sleep(server.delay)
        finally:
            with server._lock:
                server.in_flight -= 1
                server.served += 1
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
        common = {
            "id": "cmpl-bench",
            "created": int(time.time()),
            "model": request.get("model", "slow-model"),
            "usage": usage,
        }
        if self.path.endswith("/chat/completions"):
            self._send(
                200,
                {
                    **common,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "A short answer."},
                        }
                    ],
                },
            )
        elif self.path.endswith("/completions"):
            self._send(
                200,
                {
                    **common,
                    "object": "text_completion",
                    "choices": [{"index": 0, "finish_reason": "stop", "text": "A short answer.", "logprobs": None}],
                },
            )
        else:
            self._send(404, {"error": {"message": "not found"}})


class ServerProcess:
    """A :class:`SlowServer` in a child process; ``base_url`` and ``stats()`` talk to it."""

    def __init__(self, delay: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.slow_server", "--port", "0", "--delay", str(delay)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("serving on "):
            self.proc.kill()
            raise RuntimeError(f"the slow server did not start: {line!r}")
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
    server = SlowServer(args.port, args.delay)
    print(f"serving on {server.base_url} (every answer after {args.delay} s)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


if __name__ == "__main__":
    main()
