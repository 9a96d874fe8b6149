"""6. Cold start: ``import auto_model`` and the heavy modules it loads; time to first token per backend.

Every figure comes from a fresh Python process. ``import auto_model`` is timed inside the process
(interpreter start-up excluded), as the median of ``--reps`` processes. Time to first token is
measured from the start of ``AutoModel(...)`` to the first token of the first answer: engine load,
then the first ``generate`` (which also loads the embedder and builds the example index) with one
new token; vLLM is loaded as a user gets it (torch.compile included). The openai backend talks to a
real vLLM OpenAI server on 127.0.0.1 (``--enforce-eager``), started first (its start-up is reported,
not counted).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._common import ROOT, Ratio, Record, finish, log, median, parser

HEAVY = ("torch", "transformers", "vllm", "faiss", "sentence_transformers", "openai", "numpy", "matplotlib")
IMPORT_TARGET_MS = 150.0

_IMPORT = f"""
import time, json, sys
t0 = time.perf_counter()
import auto_model
from auto_model import AutoModel
dt = time.perf_counter() - t0
print(json.dumps({{"ms": dt * 1000, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""

_TTFT = """
import time, json, sys, logging
logging.disable(logging.WARNING)
backend, url = sys.argv[1], sys.argv[2] or None
t0 = time.perf_counter()
from auto_model import AutoModel
kwargs = {"base_url": url} if backend == "openai" else {}
model = AutoModel(backend=backend, **kwargs) if backend != "openai" else AutoModel("HuggingFaceTB/SmolLM2-135M-Instruct", backend="openai", **kwargs)
t1 = time.perf_counter()
answer = model.generate("What is the capital of France?", temperature=0, max_new_tokens=1, return_details=True)
t2 = time.perf_counter()
answer2 = model.generate("Name a prime number.", temperature=0, max_new_tokens=1, return_details=True)
t3 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "first_s": t2 - t1, "ttft_s": t2 - t0, "warm_s": t3 - t2,
                  "tokens": answer.completion_tokens}))
model.close()
"""


def _python(code: str, *argv: str, timeout: float = 900) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_vllm_server() -> tuple[subprocess.Popen[bytes], str, float, Path]:
    from auto_model.backends.vllm import engine_dtype
    from auto_model.constants import DEFAULT_MODEL
    from auto_model.resolve import materialize_gguf, resolve_model

    folder = materialize_gguf(resolve_model(DEFAULT_MODEL).path)
    # The dtype the SDK's own vLLM engine gets here (the server's "auto" is software bfloat16 on CPUs without it).
    dtype = engine_dtype("auto")
    port = _free_port()
    log_path = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", DEFAULT_MODEL, "--max-model-len", "2048", "--dtype", dtype, "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.perf_counter()
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - t0, log_path
        except OSError:
            pass
        if time.perf_counter() - t0 > 600:
            proc.kill()
            raise RuntimeError(f"the vLLM server was not ready after 600 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(reps=5)
    p.add_argument("--backends", default="transformers,vllm,openai")
    args = p.parse_args(argv)
    imports = [_python(_IMPORT) for _ in range(1 if args.smoke else args.reps)]
    import_ms = median([r["ms"] for r in imports])
    heavy = sorted({m for r in imports for m in r["heavy"]})
    if args.smoke:
        print(f"cold_start: starts (smoke): import auto_model {import_ms:.0f} ms, heavy modules loaded: {heavy or 'none'}")
        return 0
    rows: list[list[Any]] = [["import auto_model (median of %d processes)" % len(imports), import_ms / 1000, None, None,
                              None, ", ".join(heavy) or "none"]]
    notes = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        url, server = "", None
        if backend == "openai":
            server, url, ready_s, _ = _start_vllm_server()
            notes.append(f"the vLLM OpenAI server took {ready_s:.1f} s to be ready (not counted)")
        try:
            log(f"cold_start: {backend}")
            r = _python(_TTFT, backend, url)
        finally:
            if server is not None:
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
        rows.append([f"time to first token: {backend}", r["ttft_s"], r["load_s"], r["first_s"], r["warm_s"], ""])
    notes.append("first generate = embedder load + example index + the request; warm = the next request")
    record = Record(
        "cold_start", "6. Cold start (fresh processes)",
        {"reps": args.reps, "backends": args.backends},
        ["what", "seconds", "engine load s", "first generate s", "warm generate s", "heavy modules"], rows,
        [Ratio("import auto_model", import_ms, IMPORT_TARGET_MS, False, " ms"),
         Ratio("heavy modules loaded by import auto_model", float(len(heavy)), 0.0, False, "")],
        notes,
    )
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
