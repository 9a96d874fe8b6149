"""6. Cold start: ``import auto_model`` and the heavy modules it loads; engine start and first answers per engine.

Every figure comes from a fresh Python process. ``import auto_model`` is timed inside the process
(interpreter start-up excluded), as the median of ``--reps`` processes. For each engine, from the
start of ``AutoModel(...)``: the engine's start, the first token of a first answer (one new token;
this ``generate`` also loads the embedder and builds the example index), then the answers
``make demo`` asks for (its two queries, greedy, up to 256 new tokens each, one batch), and the
process's peak memory. Engines: transformers, vLLM as the SDK starts it on a CPU (eager), vLLM
compiled (``enforce_eager=False``, torch.compile at every start), and the openai backend against a
real vLLM OpenAI server on 127.0.0.1 (started first; its start-up is reported, not counted).

The decoding rates give the break-even job size between the two local engines, which the command
line's engine rule uses (docs/usage.md, "Which engine a command line uses").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from auto_model.backends import CLI_TRANSFORMERS_MAX_TOKENS
from bench._common import (
    ROOT,
    Ratio,
    Record,
    demo_workload,
    finish,
    log,
    median,
    parser,
)
from bench.vllm_server import VLLMServer

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


def peak_gib():  # this process image's peak RSS (getrusage's ru_maxrss would include a forking parent's)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 2**20


backend, url, kwargs, demo = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3]), json.loads(sys.argv[4])
t0 = time.perf_counter()
from auto_model import AutoModel
if backend == "openai":
    model = AutoModel("HuggingFaceTB/SmolLM2-135M-Instruct", backend="openai", base_url=url, **kwargs)
else:
    model = AutoModel(backend=backend, **kwargs)
t1 = time.perf_counter()
answer = model.generate("What is the capital of France?", temperature=0, max_new_tokens=1, return_details=True)
t2 = time.perf_counter()
answers = model.generate(demo["queries"], temperature=0, max_new_tokens=demo["max_new_tokens"], return_details=True)
t3 = time.perf_counter()
tokens = sum(a.completion_tokens for a in answers)
print(json.dumps({"load_s": t1 - t0, "first_s": t2 - t1, "ttft_s": t2 - t0, "answers_s": t3 - t2,
                  "start_answers_s": (t1 - t0) + (t3 - t2), "tokens": tokens, "tokens_per_s": tokens / (t3 - t2),
                  "peak_rss_gb": peak_gib()}))
model.close()
"""

#: The engines measured: (row name, backend, AutoModel keyword arguments).
ENGINES = {
    "transformers": ("transformers", {}),
    "vllm": ("vllm", {}),
    "vllm-compiled": ("vllm", {"enforce_eager": False}),
    "openai": ("openai", {}),
}


def _python(code: str, *argv: str, timeout: float = 900) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if out.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _start_vllm_server() -> VLLMServer:
    from auto_model.backends.vllm import engine_dtype
    from auto_model.constants import DEFAULT_MODEL
    from auto_model.resolve import materialize_gguf, resolve_model

    folder = materialize_gguf(resolve_model(DEFAULT_MODEL).path)
    # The dtype the SDK's own vLLM engine gets here (the server's "auto" is software bfloat16 on CPUs without it).
    log_path = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "server.log"
    return VLLMServer(folder, DEFAULT_MODEL, log_path, dtype=engine_dtype("auto")).start(timeout=600)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(reps=5)
    p.add_argument("--backends", default=",".join(ENGINES), help=f"engines to measure: {', '.join(ENGINES)}")
    args = p.parse_args(argv)
    imports = [_python(_IMPORT) for _ in range(1 if args.smoke else args.reps)]
    import_ms = median([r["ms"] for r in imports])
    heavy = sorted({m for r in imports for m in r["heavy"]})
    if args.smoke:
        print(
            f"cold_start: starts (smoke): import auto_model {import_ms:.0f} ms, heavy modules loaded: {heavy or 'none'}"
        )
        return 0
    queries, new_tokens = demo_workload()
    demo = {"queries": queries, "max_new_tokens": new_tokens}
    rows: list[list[Any]] = [
        [
            f"import auto_model (median of {len(imports)} processes)",
            import_ms / 1000,
            None,
            None,
            None,
            None,
            None,
            ", ".join(heavy) or "none",
        ]
    ]
    notes = []
    measured: dict[str, dict[str, Any]] = {}
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if name not in ENGINES:
            raise SystemExit(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
        backend, kwargs = ENGINES[name]
        url, server = "", None
        if backend == "openai":
            server = _start_vllm_server()
            url = server.url
            notes.append(f"the vLLM OpenAI server took {server.ready_s:.1f} s to be ready (not counted)")
        try:
            log(f"cold_start: {name}")
            r = measured[name] = _python(_TTFT, backend, url, json.dumps(kwargs), json.dumps(demo))
        finally:
            if server is not None:
                server.stop()
        rows.append(
            [
                name,
                r["load_s"],
                r["ttft_s"],
                r["answers_s"],
                r["start_answers_s"],
                r["tokens_per_s"],
                r["peak_rss_gb"],
                "",
            ]
        )
    ratios = [
        Ratio("import auto_model", import_ms, IMPORT_TARGET_MS, False, " ms"),
        Ratio("heavy modules loaded by import auto_model", float(len(heavy)), 0.0, False, ""),
    ]
    if "transformers" in measured and "vllm" in measured:
        tf, vl = measured["transformers"], measured["vllm"]
        gain = 1 / tf["tokens_per_s"] - 1 / vl["tokens_per_s"]  # seconds saved per token on vLLM
        extra = vl["load_s"] - tf["load_s"]
        break_even = extra / gain if gain > 0 else float("inf")
        notes.append(
            f"break-even between the local engines: vLLM starts {extra:.1f} s later and decodes "
            f"{vl['tokens_per_s'] / tf['tokens_per_s']:.2f}x faster here, so it wins from about "
            f"{break_even:.0f} new tokens per run (the command line's rule: transformers up to "
            f"{CLI_TRANSFORMERS_MAX_TOKENS})"
        )
        ratios.append(
            Ratio(
                "make demo's answers, engine start included: vLLM / transformers seconds",
                vl["start_answers_s"] / tf["start_answers_s"],
                1.0,
                False,
                "x",
            )
        )
    if "vllm" in measured and "vllm-compiled" in measured:
        eager, compiled = measured["vllm"], measured["vllm-compiled"]
        compile_cost = compiled["load_s"] - eager["load_s"]
        saved = 1 / eager["tokens_per_s"] - 1 / compiled["tokens_per_s"]
        payback = f"{compile_cost / saved:,.0f} new tokens" if saved > 0 else "never (no faster decoding)"
        notes.append(
            f"torch.compile costs {compile_cost:.1f} s per start and decodes "
            f"{compiled['tokens_per_s'] / eager['tokens_per_s']:.2f}x "
            f"as fast as eager: it pays back after {payback} in one run"
        )
    notes.append(
        f"answers = make demo's {len(queries)} queries, greedy, up to {new_tokens} new tokens each, one batch; "
        "first token = engine start + a one-token answer (the embedder and the example index load here)"
    )
    record = Record(
        "cold_start",
        "6. Cold start (fresh processes)",
        {"reps": args.reps, "backends": args.backends},
        [
            "engine",
            "start s",
            "first token s",
            "answers s",
            "start + answers s",
            "answer tokens/s",
            "peak RSS GiB",
            "heavy modules",
        ],
        rows,
        ratios,
        notes,
    )
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
