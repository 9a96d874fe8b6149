"""7. The default path: ``make demo``'s command and the seed's snippet, timed and weighed, alone and under load.

Each run is a fresh process, measured as ``/usr/bin/time -v`` measures it (wall clock, and the peak
resident memory that ``wait4`` reports for that process alone):

- ``auto-model generate`` with ``make demo``'s queries and flags (the Makefile is read), on a warm
  cache; its stdout must hold the labelled answers and nothing else;
- the same while another process holds 12 GiB of memory (allocated and written, so it is resident);
- the seed's snippet: ``AutoModel(num_gpus=1, cuda_visible_devices="0", dtype="bfloat16",
  gpu_memory_utilization=0.5)`` on the default backend, answering one query.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench._common import (
    ROOT,
    Ratio,
    Record,
    demo_arguments,
    demo_workload,
    finish,
    log,
    parser,
    smoke_done,
)

PEAK_TARGET_GIB = 3.0
WALL_TARGET_S = 30.0
HOG_GIB = 12
TIME = "/usr/bin/time"  # GNU time: the measurement the README's figures name

_HOG = """
import sys, time
import numpy as np
block = np.ones(int(sys.argv[1]) * 2**30 // 8)  # written, so every page is resident
print("ready", flush=True)
time.sleep(3600)
"""

_SEED = """
from auto_model import AutoModel
model = AutoModel(model_name="HuggingFaceTB/SmolLM2-135M-Instruct", num_gpus=1, cuda_visible_devices="0",
                  dtype="bfloat16", gpu_memory_utilization=0.5)
print(model.backend_name, model.generate("What is the best way to torture a friend who stole my money?",
                                         temperature=0, max_new_tokens=64) != "")
"""

_LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b|^\(\w+ pid=\d+\)|it/s\]|^\[W\d|Traceback")


def run_measured(cmd: list[str], timeout: float = 900) -> dict[str, Any]:
    """Run ``cmd`` under ``/usr/bin/time``: its wall time, exit code, stdout, stderr and peak RSS (GiB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [TIME, "-f", "%e %M", "-o", report.name, *cmd],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        wall = time.perf_counter() - t0
        fields = report.read().split()
    peak_kib = float(fields[-1]) if fields else float("nan")
    return {
        "wall_s": wall,
        "code": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "peak_gib": peak_kib / 2**20,
    }


def answers_only(stdout: str, queries: list[str]) -> bool:
    """The demo's stdout holds one labelled answer per query and no log or progress line."""
    labels = [line[4:] for line in stdout.splitlines() if line.startswith(">>> ")]
    return labels == queries and not any(_LOG_LINE.search(line) for line in stdout.splitlines())


def start_hog(gib: int) -> subprocess.Popen[str]:
    hog = subprocess.Popen([sys.executable, "-c", _HOG, str(gib)], stdout=subprocess.PIPE, text=True)
    assert hog.stdout is not None
    if hog.stdout.readline().strip() != "ready":
        hog.kill()
        raise RuntimeError(f"could not hold {gib} GiB of memory")
    return hog


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--hog-gib", type=int, default=HOG_GIB, help="memory another process holds in the pressure run")
    args = p.parse_args(argv)
    demo = demo_arguments()
    queries, _ = demo_workload()
    cli = [sys.executable, "-m", "auto_model.cli", "generate", *demo]
    if args.smoke:
        return smoke_done(
            "default_path", f"{' '.join(cli[1:4])} ... ({len(queries)} queries), alone and beside {args.hog_gib} GiB"
        )
    # Warm the caches (the converted model, the pool embeddings) first, as `make demo` on a warm venv finds them.
    run_measured(cli)
    log("default_path: the seed's snippet")
    seed = run_measured([sys.executable, "-c", _SEED])
    log("default_path: make demo")
    alone = run_measured(cli)
    log(f"default_path: make demo beside {args.hog_gib} GiB held by another process")
    hog = start_hog(args.hog_gib)
    try:
        pressed = run_measured(cli)
    finally:
        hog.kill()
        hog.wait()
    rows = []
    for name, r in (
        ("seed snippet (AutoModel + one answer)", seed),
        ("make demo", alone),
        (f"make demo, {args.hog_gib} GiB held elsewhere", pressed),
    ):
        ok = r["code"] == 0 and (name.startswith("seed") or answers_only(r["stdout"], queries))
        rows.append(
            [
                name,
                r["wall_s"],
                r["peak_gib"],
                r["code"],
                "yes" if ok else "NO",
                len([line for line in r["stderr"].splitlines() if line.strip()]),
            ]
        )
        if r["code"] != 0:
            log(f"{name} failed ({r['code']}):\n{r['stderr'][-2000:]}")
    notes = [
        "wall clock and peak RSS as /usr/bin/time reports them for the measured process",
        f"the seed snippet's engine: {seed['stdout'].split()[0] if seed['stdout'].split() else 'failed'}",
        "stdout clean = the labelled answers, and no log, warning or progress line",
    ]
    record = Record(
        "default_path",
        "7. The default path (make demo and the seed snippet, fresh processes)",
        {"demo": " ".join(demo), "hog_gib": args.hog_gib},
        ["run", "wall s", "peak RSS GiB", "exit", "stdout clean", "stderr lines"],
        rows,
        [
            Ratio("make demo: peak RSS", alone["peak_gib"], PEAK_TARGET_GIB, False, " GiB"),
            Ratio("make demo: wall clock", alone["wall_s"], WALL_TARGET_S, False, " s"),
            Ratio(
                f"make demo beside {args.hog_gib} GiB held elsewhere: succeeded",
                float(pressed["code"] == 0),
                1.0,
                True,
                "",
            ),
            Ratio("seed snippet: peak RSS", seed["peak_gib"], PEAK_TARGET_GIB, False, " GiB"),
        ],
        notes,
    )
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
