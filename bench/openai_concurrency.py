"""4. OpenAI concurrency: requests to a server that answers each after 200 ms, sequential vs. concurrent.

The server (``bench/fault_server.py``) serves requests in parallel, so the ideal time at concurrency
``c`` is ``ceil(n / c) * 200 ms`` and the ideal speed-up over one at a time is ``n / ceil(n / c)``.
The SDK sends ``generate(list)`` through the openai backend with ``max_concurrency`` = 1 (one at a
time, the original's way), 16 and 64. The optimized prompt is injected; example retrieval is off
here (its cost is benchmark 3's), so that the figure is the client's concurrency alone.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from typing import Any

from bench._common import Ratio, Record, finish, log, median, parser, queries, timed
from bench.fault_server import start_process

TARGET = 0.9


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--delay", type=float, default=0.2)
    p.add_argument("--concurrency", default="1,16,64")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.smoke:  # the whole benchmark, in miniature: 8 requests, 50 ms
        args.queries, args.delay, args.reps, levels = 8, 0.05, 1, [1, 8]
    qs = queries(args.queries)

    from auto_model import AutoModel

    server = start_process(args.delay)
    rows: list[list[Any]] = []
    ratios: list[Ratio] = []
    times: dict[int, float] = {}
    try:
        for c in levels:
            model = AutoModel("slow-model", backend="openai", base_url=server.base_url, max_concurrency=c)
            model.generate(qs[:c], optimized_icl=False, max_new_tokens=8)  # warm-up: opens the connections
            samples, cpu = [], []
            peak = 0
            for _ in range(args.reps):
                server.stats(reset=True)
                cpu0 = time.process_time()
                answers, dt = timed(functools.partial(model.generate, qs, optimized_icl=False, max_new_tokens=8))
                cpu.append((time.process_time() - cpu0) / len(qs))
                stats = server.stats()
                if len(answers) != len(qs) or stats["served"] != len(qs):
                    raise RuntimeError(f"{len(answers)} answers, {stats['served']} requests served; expected {len(qs)}")
                peak = max(peak, stats["max_in_flight"])
                samples.append(dt)
            times[c] = median(samples)
            model.close()
            ideal = math.ceil(len(qs) / c) * args.delay
            log(
                f"openai_concurrency: max_concurrency {c}: {times[c]:.3f} s (ideal {ideal:.3f} s), "
                f"peak in flight {peak}"
            )
            rows.append([c, len(qs), times[c], ideal, peak, median(cpu) * 1e3])
    finally:
        server.stop()
    base = times[levels[0]]
    for row in rows:
        c = row[0]
        speedup = base / times[c]
        ideal_speedup = len(qs) / math.ceil(len(qs) / c)
        row += [speedup, ideal_speedup, speedup / ideal_speedup]
        if c > 1:
            ratios.append(Ratio(f"max_concurrency {c}: speed-up / ideal speed-up", speedup / ideal_speedup, TARGET))
    record = Record(
        "openai_concurrency",
        f"4. OpenAI backend concurrency ({len(qs)} requests, server answers after {args.delay * 1000:.0f} ms)",
        {"queries": len(qs), "delay_s": args.delay, "levels": levels, "reps": args.reps},
        [
            "max_concurrency",
            "requests",
            "seconds (median)",
            "ideal seconds",
            "peak in flight",
            "client CPU ms/request",
            "speed-up",
            "ideal speed-up",
            "of ideal",
        ],
        rows,
        ratios,
        notes=[
            "sequential = max_concurrency 1: one request at a time, as the original sent them",
            "client CPU ms/request: this process's CPU time per request (the SDK and the openai client); requests "
            "are dispatched one after another under the interpreter lock, so a burst of c requests leaves about "
            "c x that later than the first",
        ],
    )
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
