"""13. Streaming in-process: ``auto-model serve`` (vLLM's asynchronous engine) vs. vLLM's own OpenAI server.

Three servers of the embedded model (float32, eager, the same KV cache size), started in turn as
users start them, each alone on the machine while it is measured: vLLM's own OpenAI server,
``auto-model serve`` (``vllm-async``: continuous batching, token streams) and ``auto-model serve
--backend vllm`` (the offline engine behind the micro-batcher). The load is the same for each:
``--clients`` streaming clients at a time (16 and 64), each sending its requests one after
another, twice as many requests as clients, greedy, ``--new-tokens`` at most.

The alignment is applied for both: ``auto-model serve`` gets each question as a chat message and
aligns it itself (routing, retrieval, prompt: its own work, counted as serving), vLLM's server gets
the conversation that alignment makes (this process's :class:`~auto_model.aligner.Aligner`, the
system prompt and retrieved examples as messages), so both engines see the same prompt. The answer
check and the artifact's decoding settings and loop cut are off for the measured requests
(``auto_model`` overrides): vLLM's server has none of them, and only the serving should differ.

Figures: completion tokens per second over the run's wall time, and the p50 of the time to the
first streamed text; ratios of ``auto-model serve`` to vLLM's server (targets: throughput >= 0.95x,
time to first token <= 1.1x) and of the micro-batched path to the continuous one.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import Ratio, Record, finish, log, median, parser, queries, smoke_done, start_serve, stop_process
from bench.vllm_server import VLLMServer, free_port

THROUGHPUT_TARGET = 0.95
TTFT_TARGET = 1.1
KEY = "sk-bench-streaming-0001"
#: what the measured requests switch off in ``auto-model serve`` (vLLM's server has none of it)
PLAIN = {"check_answers": False, "cut_loops": False, "optimized_decoding": False}


def aligned_conversations(questions: list[str], base_url: str) -> list[tuple[list[dict[str, str]], list[str]]]:
    """Each question's conversation as ``auto-model serve`` aligns it (system prompt, examples, the
    question), with the stop strings its format adds: what vLLM's server gets."""
    from auto_model.aligner import Aligner
    from auto_model.backends.openai import server_target
    from auto_model.constants import DEFAULT_MODEL
    from auto_model.options import GenerationOptions

    aligner = Aligner.for_model(DEFAULT_MODEL, None, None, None, server_target(DEFAULT_MODEL, base_url, "chat"))
    prompts = aligner.chat_prompts([[{"role": "user", "content": q}] for q in questions], GenerationOptions())
    return [(list(p.prompt), list(p.stop)) for p in prompts]  # type: ignore[arg-type]


def load(url: str, bodies: list[dict[str, Any]], clients: int, headers: dict[str, str]) -> tuple[float, float, int]:
    """Stream ``bodies`` from ``clients`` clients at a time: completion tokens per second over the
    wall time, the p50 seconds to the first text, and the tokens."""
    import httpx

    async def run() -> tuple[float, float, int]:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        firsts: list[float] = []
        tokens = [0]
        async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as http:
            pending = list(bodies)

            async def client() -> None:
                while pending:
                    body = pending.pop()
                    t0 = time.perf_counter()
                    first = None
                    async with http.stream("POST", f"{url}/chat/completions", json=body) as response:
                        if response.status_code != 200:
                            raise RuntimeError(
                                f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                            )
                        async for line in response.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue

                            event = json.loads(line[6:])
                            if event.get("usage"):
                                tokens[0] += event["usage"]["completion_tokens"]
                            choices = event.get("choices") or []
                            if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                                first = time.perf_counter() - t0
                    firsts.append(first if first is not None else time.perf_counter() - t0)

            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            seconds = time.perf_counter() - t0
        return tokens[0] / seconds, median(firsts), tokens[0]

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    p.add_argument("--new-tokens", type=int, default=64)
    p.set_defaults(reps=1)
    args = p.parse_args(argv)
    most = max(args.clients) * 2
    questions = queries(most)
    if args.smoke:
        plan = f"{args.clients} streaming clients x {args.new_tokens} tokens, 3 servers"
        return smoke_done("server_streaming", plan, needs=("fastapi", "vllm"))

    from auto_model.constants import DEFAULT_MODEL
    from auto_model.resolve import materialize_gguf, resolve_model

    folder = materialize_gguf(resolve_model(DEFAULT_MODEL).path)
    ours = [{"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": q}], "temperature": 0,
             "max_tokens": args.new_tokens, "stream": True, "stream_options": {"include_usage": True},
             "auto_model": PLAIN} for q in questions]  # fmt: skip
    results: dict[str, dict[int, tuple[float, float, int]]] = {}
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with tempfile.TemporaryDirectory() as tmp:
        log("server_streaming: vLLM's OpenAI server")
        vllm_server = VLLMServer(folder, DEFAULT_MODEL, Path(tmp) / "vllm.log", dtype="float32")
        vllm_server.start()
        try:
            theirs = [{"model": DEFAULT_MODEL, "messages": messages, "stop": stop or None, "temperature": 0,
                       "max_tokens": args.new_tokens, "stream": True, "stream_options": {"include_usage": True}}
                      for messages, stop in aligned_conversations(questions, vllm_server.url)]  # fmt: skip
            load(vllm_server.url, theirs[:8], 4, {})  # warm-up
            results["vLLM's OpenAI server"] = {n: load(vllm_server.url, theirs[: 2 * n], n, {}) for n in args.clients}
        finally:
            vllm_server.stop()
        for name, extra in (
            ("auto-model serve (vllm-async)", ()),
            ("auto-model serve --backend vllm", ("--backend", "vllm")),
        ):
            log(f"server_streaming: {name}")
            for attempt in range(3):  # the port may be taken meanwhile (the engine process opens ports too)
                port = free_port()
                try:
                    flags = ["--api-key", KEY, "--unchecked-key", KEY, "--allow-alignment-override", "--max-queue",
                             "1024", "--dtype", "float32", *extra]  # fmt: skip
                    proc = start_serve(flags, port, Path(tmp) / f"serve-{len(results)}.log", timeout=300, env=env)
                    break
                except RuntimeError as exc:
                    if "address already in use" not in str(exc) or attempt == 2:
                        raise
            url = f"http://127.0.0.1:{port}/v1"
            try:
                headers = {"authorization": f"Bearer {KEY}"}
                load(url, ours[:8], 4, headers)  # warm-up: the retriever's index, the paths
                results[name] = {n: load(url, ours[: 2 * n], n, headers) for n in args.clients}
            finally:
                stop_process(proc, timeout=30)
    names = list(results)
    rows = [[name, n, *results[name][n]] for name in names for n in args.clients]
    vllm_name, async_name, batched_name = names
    ratios = []
    for n in args.clients:
        ratios.append(Ratio(f"throughput at {n} clients, auto-model serve / vLLM's server",
                            results[async_name][n][0] / results[vllm_name][n][0], THROUGHPUT_TARGET))  # fmt: skip
        first = results[async_name][n][1] / results[vllm_name][n][1]
        ratios.append(Ratio(f"time to first token p50 at {n} clients, auto-model serve / vLLM's server", first,
                            TTFT_TARGET, higher_is_better=False))  # fmt: skip
    notes = [f"time to first token p50 at {n} clients: the micro-batched path's is "
             f"{results[batched_name][n][1] / results[async_name][n][1]:.2f}x the continuous one's, throughput "
             f"{results[batched_name][n][0] / results[async_name][n][0]:.2f}x" for n in args.clients]  # fmt: skip
    record = Record(
        "server_streaming",
        f"13. Streaming: auto-model serve (vllm-async) vs. vLLM's OpenAI server ({args.new_tokens} tokens, greedy)",
        {"clients": args.clients, "new_tokens": args.new_tokens, "requests": [2 * n for n in args.clients]},
        ["server", "streaming clients", "completion tokens / s", "time to first token p50 (s)", "tokens"],
        rows,
        ratios,
        notes=notes,
    )
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
