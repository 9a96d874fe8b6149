"""9. Serving in-process: concurrent requests micro-batched by ``auto-model serve`` vs. the engine's own batch gain.

The engine's own gain: generated tokens per second of ``AutoModel.generate`` on a list of queries
(one engine call) over the same queries one at a time. The server's gain: tokens per second of the
same queries sent to the server all at once (its micro-batcher puts them in one engine call) over
sent one at a time. Both on the same engine object (the embedded model), greedy, the server in a
thread of this process (uvicorn on 127.0.0.1); the client opens its connections before it sends
the requests, as a client's connection pool has them. The figure is the server's gain over the
engine's.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

from bench._common import Ratio, Record, finish, log, median, parser, queries, smoke_done
from bench.vllm_server import free_port

TARGET = 0.9


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--backend", default="auto", help="the engine: auto (the SDK's: vllm where installed), vllm or transformers"
    )
    p.set_defaults(reps=2)
    args = p.parse_args(argv)
    qs = queries(args.queries)
    if args.smoke:
        plan = f"{len(qs)} queries x {args.new_tokens} tokens, served vs. the engine"
        return smoke_done("server_batching", plan, needs=("fastapi", "uvicorn"))

    import httpx
    import uvicorn

    from auto_model import AutoModel
    from auto_model.server import ServerLimits, create_app

    model = AutoModel(backend=args.backend)
    greedy = {"temperature": 0, "top_p": 1.0, "max_new_tokens": args.new_tokens}

    def engine_single() -> tuple[int, float]:
        t0 = time.perf_counter()
        tokens = sum(model.generate(q, return_details=True, **greedy).completion_tokens for q in qs)
        return tokens, time.perf_counter() - t0

    def engine_batch() -> tuple[int, float]:
        t0 = time.perf_counter()
        tokens = sum(r.completion_tokens for r in model.generate(qs, return_details=True, **greedy))
        return tokens, time.perf_counter() - t0

    port = free_port()
    app = create_app(model, served_name="smol", limits=ServerLimits(max_batch=args.queries))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def body(q: str) -> dict[str, Any]:
        return {"model": "smol", "messages": [{"role": "user", "content": q}], "temperature": 0,
                "max_tokens": args.new_tokens}  # fmt: skip

    def served_single() -> tuple[int, float]:
        t0 = time.perf_counter()
        with httpx.Client(timeout=600) as http:
            tokens = sum(http.post(url, json=body(q)).json()["usage"]["completion_tokens"] for q in qs)
        return tokens, time.perf_counter() - t0

    engine_calls: list[float] = []

    def batches() -> float:
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        return float(
            next(line.split()[1] for line in metrics.splitlines() if line.startswith("auto_model_batch_size_count"))
        )

    def served_together() -> tuple[int, float]:
        async def run() -> tuple[int, float]:
            async with httpx.AsyncClient(timeout=600) as http:
                # Open the connections first (as a client's pool has them): the requests then arrive together.
                await asyncio.gather(*(http.get(f"http://127.0.0.1:{port}/health") for _ in qs))
                t0 = time.perf_counter()
                replies = await asyncio.gather(*(http.post(url, json=body(q)) for q in qs))
                seconds = time.perf_counter() - t0
            return sum(r.json()["usage"]["completion_tokens"] for r in replies), seconds

        before = batches()
        tokens, seconds = asyncio.run(run())
        engine_calls.append(batches() - before)
        return tokens, seconds

    log("server_batching: warm-up")
    model.generate(qs[:2], **greedy)
    served_single()  # also builds the retriever's index and opens the server's paths
    runs: dict[str, list[float]] = {"engine, one at a time": [], "engine, one batch": [],
                                    "server, one at a time": [], "server, all at once": []}  # fmt: skip
    tokens_of: dict[str, int] = {}
    for _ in range(args.reps):
        for name, fn in zip(runs, (engine_single, engine_batch, served_single, served_together), strict=True):
            log(f"server_batching: {name}")
            tokens, seconds = fn()
            tokens_of[name] = tokens
            runs[name].append(tokens / seconds)
    server.should_exit = True
    thread.join(10)
    rate = {name: median(values) for name, values in runs.items()}
    engine_gain = rate["engine, one batch"] / rate["engine, one at a time"]
    server_gain = rate["server, all at once"] / rate["server, one at a time"]
    rows = [[name, tokens_of[name], rate[name]] for name in runs]
    record = Record(
        "server_batching",
        f"9. In-process serving: micro-batching vs. the engine's own batch gain ({len(qs)} queries, "
        f"{args.new_tokens} tokens, {model.backend_name})",
        {"queries": len(qs), "new_tokens": args.new_tokens, "backend": model.backend_name, "reps": args.reps},
        ["run", "tokens generated", "tokens / s (median)"],
        rows,
        [Ratio("server's batch gain / engine's batch gain", server_gain / engine_gain, TARGET)],
        notes=[
            f"engine's batch gain {engine_gain:.2f}x; the server's {server_gain:.2f}x",
            f"engine calls per all-at-once run: {', '.join(f'{c:g}' for c in engine_calls)}",
        ],
    )
    model.close()
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
