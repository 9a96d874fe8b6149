"""8. Serving in front of an upstream: ``auto-model serve --upstream`` vs. the upstream directly (200 ms server).

The proxy is started as users start it (``auto-model serve --upstream URL``, a process of its own)
in front of ``bench/fault_server.py`` (another process), which answers every request after 200 ms.
The load comes from this process (httpx, kept-alive connections), the same way to both.

- **Added latency**: the p50 of one request at a time through the proxy minus the p50 directly,
  requests alternating between the two. The proxy's work per request includes the alignment:
  routing and example retrieval (a query embedding on the CPU), timed by the proxy itself (its
  ``Server-Timing: align`` header) and reported separately; the overhead without it is the p50 of
  each proxied request's time less its alignment, minus the direct p50.
- **Throughput** at 16 and 64 requests in flight: requests per second through the proxy over
  directly; and at 16 through a second proxy whose alignment is the prompt alone (a one-prompt
  artifact and ``--icl 0``: no routing, no retrieval, so no query embedding), which separates the
  proxy's own cost from the embedding's, as the latency does.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import Ratio, Record, finish, log, median, parser, queries, smoke_done, start_serve, stop_process
from bench.fault_server import start_process
from bench.vllm_server import free_port

LATENCY_TARGET_MS = 2.0
THROUGHPUT_TARGET = 0.95


def start_proxy(upstream: str, port: int, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``auto-model serve --upstream`` on 127.0.0.1:port (with ``extra`` flags); returns once ``/health``
    is 200."""
    flags = ["--upstream", upstream, "--model", "fault-model", "--max-concurrency", "128", *extra]
    return start_serve(flags, port, log_path)


def prompt_only_artifact(path: Path) -> Path:
    """A one-prompt artifact (``auto_model.prompt/v1``, no routes) with the default artifact's prompt:
    with ``--icl 0``, a proxy that uses it aligns without embedding the query."""
    from auto_model.artifacts import PromptArtifact, default_artifact, save_prompt_artifact

    default = default_artifact()
    return save_prompt_artifact(PromptArtifact(None, default.system_prompt, "user"), path)


def _body(query: str) -> dict[str, Any]:
    return {"model": "fault-model", "messages": [{"role": "user", "content": query}], "max_tokens": 8}


def latencies(direct: str, proxy: str, qs: list[str]) -> tuple[list[float], list[float], list[float]]:
    """Seconds per request directly and through the proxy, and the proxy's alignment time of each."""
    import httpx

    times: dict[str, list[float]] = {direct: [], proxy: []}
    align: list[float] = []
    with httpx.Client(timeout=30) as http:
        for i, q in enumerate(qs):
            for url in (direct, proxy) if i % 2 == 0 else (proxy, direct):
                t0 = time.perf_counter()
                response = http.post(f"{url}/chat/completions", json=_body(q))
                times[url].append(time.perf_counter() - t0)
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
                ms = align_ms(response)
                if url == proxy and ms is not None:
                    align.append(ms / 1e3)
    return times[direct], times[proxy], align


def align_ms(response: Any) -> float | None:
    """The proxy's alignment time of a response (its ``Server-Timing: align``), or None (direct)."""
    header = response.headers.get("server-timing")
    if not header:
        return None
    return float(dict(part.strip().split(";dur=") for part in header.split(","))["align"])


def throughput(url: str, qs: list[str], in_flight: int) -> tuple[float, float | None]:
    """Requests per second for ``qs``, ``in_flight`` at a time, and the median alignment time of a
    request in milliseconds (waiting for its batch included; None directly)."""
    import httpx

    async def run() -> tuple[float, float | None]:
        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            gate = asyncio.Semaphore(in_flight)
            aligned: list[float] = []

            async def one(q: str) -> None:
                async with gate:
                    response = await http.post(f"{url}/chat/completions", json=_body(q))
                    if response.status_code != 200:
                        raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
                    ms = align_ms(response)
                    if ms is not None:
                        aligned.append(ms)

            await asyncio.gather(*(one(q) for q in qs[:in_flight]))  # warm-up: opens the connections
            aligned.clear()
            t0 = time.perf_counter()
            await asyncio.gather(*(one(q) for q in qs))
            return len(qs) / (time.perf_counter() - t0), median(aligned) if aligned else None

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=40, help="sequential requests per side for the latency")
    p.add_argument("--burst", type=int, default=256, help="requests per throughput measurement")
    p.add_argument("--delay", type=float, default=0.2)
    args = p.parse_args(argv)
    if args.smoke:
        plan = f"{args.requests} sequential + {args.burst} x (16, 64) in flight"
        return smoke_done("server_proxy", plan, needs=("aiohttp", "fastapi", "uvicorn"))

    qs = queries(max(args.requests, args.burst))
    server = start_process(args.delay)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proxy_proc = start_proxy(server.base_url, port, Path(tmp) / "proxy.log")
        proxy = f"http://127.0.0.1:{port}/v1"
        try:
            log("server_proxy: latency, one request at a time")
            latencies(server.base_url, proxy, qs[:5])  # warm-up
            direct_s, proxy_s, align_s = latencies(server.base_url, proxy, qs[: args.requests])
            rates: dict[int, tuple[float, float]] = {}
            waits: dict[int, float] = {}
            for level in (16, 64):
                log(f"server_proxy: throughput at {level} in flight")
                reps = [(throughput(server.base_url, qs[: args.burst], level)[0],
                         throughput(proxy, qs[: args.burst], level)) for _ in range(args.reps)]  # fmt: skip
                rates[level] = (median([r[0] for r in reps]), median([r[1][0] for r in reps]))
                waits[level] = median([r[1][1] or 0.0 for r in reps])
            stop_process(proxy_proc)
            log("server_proxy: throughput at 16 in flight, the prompt alone (no embedding)")
            artifact = prompt_only_artifact(Path(tmp) / "prompt-only.json")
            proxy_proc = start_proxy(server.base_url, port, Path(tmp) / "proxy-prompt.log", "--prompt-path",
                                     str(artifact), "--icl", "0")  # fmt: skip
            plain_reps = [(throughput(server.base_url, qs[: args.burst], 16)[0],
                           throughput(proxy, qs[: args.burst], 16)[0]) for _ in range(args.reps)]  # fmt: skip
            plain = (median([r[0] for r in plain_reps]), median([r[1] for r in plain_reps]))
        finally:
            stop_process(proxy_proc)
            server.stop()
    p50_direct, p50_proxy, p50_align = median(direct_s) * 1e3, median(proxy_s) * 1e3, median(align_s) * 1e3
    added = p50_proxy - p50_direct
    without = median([t - a for t, a in zip(proxy_s, align_s, strict=True)]) * 1e3 - p50_direct
    rows: list[list[Any]] = [
        ["p50 latency, one at a time (ms)", p50_direct, p50_proxy, added],
        ["  of which the alignment: routing + retrieval (ms, the proxy's Server-Timing)", None, p50_align, None],
        ["  added without it (ms)", None, None, without],
    ]
    for level, (direct_rps, proxy_rps) in rates.items():
        rows.append([f"requests/s at {level} in flight", direct_rps, proxy_rps, proxy_rps / direct_rps])
        rows.append([f"  the alignment per request at {level} in flight (ms, p50, its batch's wait included)", None,
                     waits[level], None])  # fmt: skip
    rows.append(["requests/s at 16 in flight, the prompt alone (no routing or retrieval)", plain[0], plain[1],
                 plain[1] / plain[0]])  # fmt: skip
    record = Record(
        "server_proxy",
        f"8. auto-model serve --upstream vs. the upstream directly (server answers after {args.delay * 1000:.0f} ms)",
        {
            "requests": args.requests,
            "burst": args.burst,
            "delay_s": args.delay,
            "reps": args.reps,
            "cpus": os.cpu_count(),
        },  # fmt: skip
        ["measure", "direct", "through the proxy", "added / ratio"],
        rows,
        [
            Ratio(
                "added p50 latency without retrieval",
                without,
                LATENCY_TARGET_MS,
                higher_is_better=False,
                unit=" ms",
            ),  # fmt: skip
            Ratio("throughput at 16 in flight: proxy / direct", rates[16][1] / rates[16][0], THROUGHPUT_TARGET),
            Ratio(
                "throughput at 16 in flight without routing or retrieval: proxy / direct",
                plain[1] / plain[0],
                THROUGHPUT_TARGET,
            ),  # fmt: skip
        ],
        notes=[
            "the proxy, the upstream and the load generator share this machine's cores; the proxy's own work per "
            "request (JSON, routing, retrieval, HTTP both ways) is what bounds it at 64 in flight",
            f"at 64 in flight the ideal is {64 / args.delay:.0f} requests/s",
            "at 16 in flight the requests finish and start again together: each wave's queries are embedded as one "
            "batch on the proxy's alignment thread before they go out, and the requests wait for it (the alignment "
            "row under each throughput); without routing or retrieval nothing is embedded",
        ],
    )
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
