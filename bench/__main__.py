"""Run the benchmarks: ``python -m bench`` (or ``make bench``).

Each benchmark runs in a fresh process, prints its table and the ratio it exists for, and appends a
JSON record to ``bench/results.jsonl``. When every benchmark of a full run has finished,
``BENCHMARKS.md`` and ``bench/throughput.png`` are rewritten from this run's records. A benchmark
that fails is reported and the others still run (exit status 1).

    python -m bench                      # all of them
    python -m bench --only overhead      # one (comma-separated for several); BENCHMARKS.md is kept
    python -m bench --only cold_start --update   # one, then BENCHMARKS.md from each benchmark's newest record
    python -m bench --smoke              # check that each one starts (seconds; used by the tests)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from auto_model.flags import ArgumentParser

BENCHMARKS = ("batch_engine", "batch_loop", "overhead", "openai_concurrency", "trainer", "cold_start", "default_path",
              "server_proxy", "server_batching", "server_streaming", "best_of", "replicas",
              "alignment_tax", "stream_sharing")  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m bench", description="Run the auto-model benchmarks.")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--smoke", action="store_true", help="only check that each benchmark starts")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="the report to rewrite after a full run")
    p.add_argument(
        "--update",
        action="store_true",
        help="with --only: rewrite the report from the newest record of each benchmark (each section names its run)",
    )
    args = p.parse_args(argv)
    names = BENCHMARKS if args.only is None else tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        record_file = Path(tmp) / "records.jsonl"
        started = time.perf_counter()
        if args.smoke:  # quick starts, as many at once as there are cores; their output in order
            from concurrent.futures import ThreadPoolExecutor

            def smoke(name: str) -> tuple[str, subprocess.CompletedProcess[str], float]:
                t0 = time.perf_counter()
                cmd = [sys.executable, "-m", f"bench.{name}", "--smoke"]
                done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                return name, done, time.perf_counter() - t0

            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                for name, done, seconds in pool.map(smoke, names):
                    print(f"\n=== {name}: -m bench.{name}\n{done.stdout}{done.stderr}", end="", flush=True)
                    print(f"=== {name}: exit {done.returncode} after {seconds:.0f} s", flush=True)
                    if done.returncode != 0:
                        failed.append(name)
        for name in () if args.smoke else names:
            cmd = [sys.executable, "-m", f"bench.{name}", "--record", str(record_file)]
            print(f"\n=== {name}: {shlex.join(cmd[1:3])}", flush=True)
            t0 = time.perf_counter()
            code = subprocess.call(cmd, cwd=ROOT, env=env)
            print(f"=== {name}: exit {code} after {time.perf_counter() - t0:.0f} s", flush=True)
            if code != 0:
                failed.append(name)
        total = time.perf_counter() - started
        records = [json.loads(line) for line in record_file.read_text().splitlines()] if record_file.exists() else []
    if args.smoke:
        print(
            f"\nsmoke: {len(names) - len(failed)} of {len(names)} benchmarks start"
            + (f"; failed: {failed}" if failed else "")
        )
        return 1 if failed else 0
    if records:
        with RESULTS.open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    if args.only is None and not failed:
        from bench.report import write_report

        command = "make bench" if os.environ.get("MAKELEVEL") else "python -m bench"
        write_report(records, Path(args.output), ROOT / "bench" / "throughput.png", command, total)
        print(f"\nwrote {args.output} and bench/throughput.png ({total / 60:.1f} min in all)")
    elif args.update and not failed:
        from bench.report import newest_records, write_report

        write_report(
            newest_records(RESULTS, BENCHMARKS),
            Path(args.output),
            ROOT / "bench" / "throughput.png",
            "make bench",
            None,
            newest=True,
        )
        print(f"\nwrote {args.output} from the newest record of each benchmark")
    elif failed:
        print(f"\nfailed: {', '.join(failed)}; {args.output} is left as it was")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
