"""BENCHMARKS.md and the throughput plot, from one run's records."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import fmt


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join("" if v is None else fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _target(ratio: dict[str, Any]) -> str:
    return f"{'>=' if ratio['higher_is_better'] else '<='} {fmt(ratio['target'])}{ratio['unit']}"


def render_plot(records: Sequence[dict[str, Any]], path: Path) -> bool:
    """Throughput vs. batch size for every series measured; False when there is nothing to plot."""
    series: dict[str, dict[int, float]] = {}
    for record in records:
        for point in record.get("points", []):
            series.setdefault(point["series"], {})[int(point["batch"])] = float(point["tokens_per_s"])
    if not series:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)  # its own canvas: the process's matplotlib backend is left alone
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, values in sorted(series.items()):
        batches = sorted(values)
        ax.plot(batches, [values[b] for b in batches], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests per engine call (batch size)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Throughput vs. batch size (SmolLM2-135M-Instruct, CPU)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def _machine_line(machine: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in machine.items() if v is not None)


def write_report(
    records: Sequence[dict[str, Any]],
    output: Path,
    plot: Path,
    command: str,
    total_s: float | None,
    *,
    newest: bool = False,
) -> None:
    """BENCHMARKS.md from one full run's records, or (``newest``) from the newest record of each
    benchmark, each section then naming its own run and machine."""
    machine = records[0]["machine"] if records else {}
    when = records[-1]["time"] if records else ""
    if newest:
        intro = [
            "Each section holds the newest record of its benchmark in `bench/results.jsonl` and names the run and",
            "machine it comes from (`python -m bench --only NAME --update` reruns one and rewrites this file;",
            f"`{command}` reruns all of them).",
        ]
    else:
        intro = [
            f"Figures of the latest full run of `{command}`, {when[:10]}, {(total_s or 0) / 60:.0f} minutes in all.",
            "Every figure below comes from that run; `bench/results.jsonl` keeps the records of every run.",
            "Reproduce with `make bench` (it sets up `.venv` first) or `python -m bench`;",
            "`python -m bench --only NAME` runs one benchmark without touching this file.",
            "",
            "Machine: " + _machine_line(machine),
        ]
    lines = ["# Benchmarks", "", *intro, "", "## Summary", ""]
    summary = []
    for record in records:
        for ratio in record["ratios"]:
            summary.append(
                [
                    record["title"].split(":")[0].split(" (")[0],
                    ratio["name"],
                    f"{fmt(ratio['value'])}{ratio['unit']}",
                    _target(ratio),
                    "met" if ratio["met"] else "**missed**",
                ]
            )
    lines += [_md_table(["benchmark", "figure", "measured", "target", ""], summary), ""]
    if render_plot(records, plot):
        lines += ["![throughput vs. batch size](bench/throughput.png)", ""]
    for record in records:
        lines += [f"## {record['title']}", "", _md_table(record["headers"], record["rows"]), ""]
        for ratio in record["ratios"]:
            lines.append(
                f"- **{ratio['name']}: {fmt(ratio['value'])}{ratio['unit']}** (target {_target(ratio)}: "
                f"{'met' if ratio['met'] else 'missed'})"
            )
        for note in record["notes"]:
            lines.append(f"- {note}")
        params = ", ".join(f"{k} {v}" for k, v in record["params"].items())
        lines += [f"- parameters: {params}"]
        if newest:
            lines += [
                f"- run: {record['time'][:16].replace('T', ' ')} UTC; machine: {_machine_line(record['machine'])}"
            ]
        lines += [""]
    output.write_text("\n".join(lines), encoding="utf-8")


def newest_records(results: Path, order: Sequence[str]) -> list[dict[str, Any]]:
    """The newest record of each benchmark in ``results`` (a JSONL file), in ``order``."""
    import json

    newest: dict[str, dict[str, Any]] = {}
    for line in results.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            newest[record["benchmark"]] = record
    return [newest[name] for name in order if name in newest]
