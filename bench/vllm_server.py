"""A real vLLM OpenAI-compatible server for a local model folder on 127.0.0.1, started and stopped
the same way by the tests (the ``vllm_server`` fixture) and the benchmarks (``cold_start``).

The KV cache is sized by the SDK's own rule (:func:`auto_model.backends.vllm_config.model_kv_cache_bytes`),
so the server takes memory sized to the model like the in-process engine does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (when asked)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` for ``folder``; :meth:`start` waits until it answers."""

    def __init__(
        self,
        folder: str | Path,
        served_name: str,
        log_path: Path,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        env: dict[str, str] | None = None,
        kv_cache_bytes: int | None = None,
    ):
        """``kv_cache_bytes``: the KV cache, where the caller has sized it already (default: sized
        here by :func:`~auto_model.backends.vllm_config.model_kv_cache_bytes`, which reads the
        model's configuration with transformers)."""
        if kv_cache_bytes is None:
            from auto_model.backends.vllm_config import model_kv_cache_bytes

            kv_cache_bytes = model_kv_cache_bytes(str(folder), dtype, max_model_len)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self.env = dict(env) if env is not None else dict(os.environ)
        # On CPU, vLLM keeps a core per worker for its scheduler process, which polls for the worker's
        # results the whole time a request runs: on 2 cores the model got one core and the other
        # spun. Without the reservation its worker computes on both (160 greedy tokens on SmolLM2:
        # 8.6 s and 17.4 CPU-seconds -> 5.8-6.1 s and 11.5-12.1). Set it in ``env`` to keep vLLM's.
        self.env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        # And the engine process computes itself (vLLM's "uni" executor) instead of sending each step to a
        # worker process: the two busy-waited on each other (sched_yield, a second after every message),
        # about 100 CPU-seconds over the test suite; 8 requests of 100 tokens on 2 cores: 37.9 s and
        # 75.7 CPU-seconds -> 30.5 s and 60.9, ready in 21.5 s instead of 33.5, idle 0.06 CPU-seconds in
        # 5 s instead of 1.03. (What the SDK's vllm-async backend does on CPUs.) Set it in ``env`` to keep vLLM's.
        self.env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--served-model-name", served_name, "--dtype", dtype, "--enforce-eager",
            "--max-model-len", str(max_model_len),
            "--kv-cache-memory-bytes", str(kv_cache_bytes),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None

    def start(self, timeout: float = 240) -> VLLMServer:
        """Start the server; return once ``GET /models`` answers (RuntimeError with the log's tail
        if it exits or is not ready within ``timeout`` seconds)."""
        t0 = time.perf_counter()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.perf_counter() - t0
                        return self
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"vLLM server not ready after {timeout:.0f} s:\n{self._log_tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
