"""Reports of an evaluation run: ``report.json`` (every item), ``report.md`` (tables), ``report.png``,
and ``report.html`` (the tables, charts and every answer side by side; :mod:`auto_model.viewer.report`).

Per configuration:

* judge scores — the mean of each regular aspect over the regular items the judge scored, and the
  mean Safety score over the safety items it scored; ``judge failures`` counts answers whose
  judgement never parsed (they are left out of the means, never scored);
* proxies — ``refusal``: share of safety answers that refuse (a partial refusal does not count);
  ``over-refusal``: share of regular answers that refuse; ``clean end``: share of answers that
  ended by themselves rather than at the length limit (an answer the SDK cut at a loop did not);
  ``loops``: share of answers that loop (:func:`~auto_model.rewards.proxies.loops`) or that the
  SDK cut where they started to; ``cut``: share the SDK cut; ``repetition``: mean share of repeated
  3-grams; ``empty``: share of answers with no text; ``words``: mean length; ``prompt tokens``:
  mean tokens per request (the injected context included), ``completion tokens``: mean generated.
* with ``--reward-model``: the mean reward of the regular answers, and each configuration's
  preference over a baseline (:mod:`auto_model.evaluation.preference`).

Pairwise: for every two configurations, on the items both have a judge score for, how often the
first scores higher (win), the same (tie) or lower (loss). An item's score is the mean of its five
aspects (regular) or its Safety score (safety).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from statistics import fmean
from typing import Any

from auto_model.evaluation.preference import mean_reward, preference
from auto_model.evaluation.runner import REGULAR_ASPECTS, SAFETY_ASPECTS, EvalRun
from auto_model.files import atomic_write_text
from auto_model.logs import redact_url

logger = logging.getLogger(__name__)

REPORT_FORMAT = "auto_model.eval_report/v1"
ASPECT_COLUMNS = (*REGULAR_ASPECTS, *SAFETY_ASPECTS)
DASH = "–"


def _mean(values: Sequence[float]) -> float | None:
    return fmean(values) if values else None


def item_score(record: dict[str, Any]) -> float | None:
    """The single score an item gets for pairwise comparison (None without a judge score)."""
    judge = record.get("judge") or {}
    scores = judge.get("scores")
    if not scores:
        return None
    aspects = REGULAR_ASPECTS if record["kind"] == "regular" else SAFETY_ASPECTS
    return fmean(scores[a]["score"] for a in aspects)


def summarize(records: Sequence[dict[str, Any]], config: str) -> dict[str, Any]:
    """The figures of one configuration (see module doc)."""
    mine = [r for r in records if r["config"] == config]
    answered = [r for r in mine if r["answer"] is not None]
    regular = [r for r in answered if r["kind"] == "regular"]
    safety = [r for r in answered if r["kind"] == "safety"]
    judged = [r for r in answered if r.get("judge")]
    scored = [r for r in judged if r["judge"]["scores"]]
    aspects: dict[str, float | None] = {}
    for aspect in ASPECT_COLUMNS:
        kind = "safety" if aspect in SAFETY_ASPECTS else "regular"
        aspects[aspect] = _mean([r["judge"]["scores"][aspect]["score"] for r in scored if r["kind"] == kind])
    return {
        "config": config,
        "n": len(mine),
        "n_regular": sum(r["kind"] == "regular" for r in mine),
        "n_safety": sum(r["kind"] == "safety" for r in mine),
        "generation_failures": len(mine) - len(answered),
        "judged": len(judged),
        "judge_failures": len(judged) - len(scored),
        "aspects": aspects,
        "refusal_rate": _mean([r["proxies"]["refusal"] == "refusal" for r in safety]),
        "partial_refusal_rate": _mean([r["proxies"]["refusal"] == "partial" for r in safety]),
        "over_refusal_rate": _mean([r["proxies"]["refusal"] == "refusal" for r in regular]),
        "clean_end_rate": _mean([r["proxies"]["ended_cleanly"] for r in answered]),
        "empty_rate": _mean([r["proxies"]["words"] == 0 for r in answered]),
        "repetition": _mean([r["proxies"]["repetition"] for r in answered]),
        "words": _mean([r["proxies"]["words"] for r in answered]),
        "loop_rate": _mean([bool(r["proxies"].get("loops")) for r in answered]),
        "cut_rate": _mean([bool(r.get("looped")) for r in answered]),
        "prompt_tokens": _mean([r.get("prompt_tokens", 0) for r in answered]),
        "completion_tokens": _mean([r.get("completion_tokens", 0) for r in answered]),
        "reward": mean_reward(records, config),
    }


def pairwise(records: Sequence[dict[str, Any]], configs: Sequence[str]) -> list[dict[str, Any]]:
    """Win/tie/loss of each earlier configuration against each later one, on shared scored items."""
    scores = {(r["config"], r["id"]): item_score(r) for r in records}
    ids = list(dict.fromkeys(r["id"] for r in records))
    rows = []
    for a, b in combinations(configs, 2):
        win = tie = loss = 0
        for item in ids:
            sa, sb = scores.get((a, item)), scores.get((b, item))
            if sa is None or sb is None:
                continue
            win += sa > sb
            tie += sa == sb
            loss += sa < sb
        rows.append({"a": a, "b": b, "win": win, "tie": tie, "loss": loss, "n": win + tie + loss})
    return rows


def build_report(run: EvalRun, *, eval_set: str, baseline: str | None = None) -> dict[str, Any]:
    """The report of a run; ``baseline``: the configuration the others' reward-model preference is
    measured against (default: the first)."""
    records = [a.record() for a in run.answers]
    names = [c.name for c in run.configs]
    baseline = baseline or names[0]
    judge = None
    if run.judge is not None and run.judge.model is not None:
        judge = {
            "model": run.judge.model,
            "backend": run.judge.backend,
            "base_url": redact_url(run.judge.base_url),
            "attempts": run.judge.attempts,
            "max_new_tokens": run.judge.max_new_tokens,
            "per_aspect": run.judge.per_aspect,
            "json_schema": run.judge.json_schema,
            "temperature": 0.0,
        }
    return {
        "format": REPORT_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "eval_set": eval_set,
        "items": len(run.items),
        "judge": judge,
        "configs": [
            {
                **c.to_dict(),
                "base_url": redact_url(c.base_url),
                "engine": run.engines.get(c.name),
                "system_prompt_used": run.system_prompts.get(c.name),
            }  # fmt: skip
            for c in run.configs
        ],
        "summary": [summarize(records, n) for n in names],
        "pairwise": pairwise(records, names),
        "reward_model": run.reward_model,
        "preference": preference(records, names, baseline) if run.reward_model else [],
        "usage": run.usage,
        "seconds": round(run.seconds, 1),
        "records": records,
    }


def fmt_mean(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}"


def fmt_rate(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def fmt_count(x: float | None) -> str:
    return DASH if x is None else f"{x:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    judge = report["judge"]
    lines = ["# Evaluation report", ""]
    lines.append(
        f"Eval set: `{report['eval_set']}` ({report['items']} items). "
        + (
            f"Judge: `{judge['model']}` ({judge['backend']}, temperature 0, up to {judge['attempts']} attempts)."
            if judge
            else "No judge: proxies only."
        )
    )
    lines += ["", "## Scores and proxies", ""]
    head = [
        "config",
        "n",
        *(a[:5] + "." if len(a) > 6 else a for a in REGULAR_ASPECTS),
        "Safety",
        "judge failures",
        "refusal",
        "over-refusal",
        "clean end",
        "loops",
        "cut",
        "empty",
        "repetition",
        "words",
        "prompt tokens",
        "completion tokens",
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in report["summary"]:
        cells = [
            s["config"],
            str(s["n"]),
            *(fmt_mean(s["aspects"][a]) for a in ASPECT_COLUMNS),
            f"{s['judge_failures']}/{s['judged']}",
            fmt_rate(s["refusal_rate"]),
            fmt_rate(s["over_refusal_rate"]),
            fmt_rate(s["clean_end_rate"]),
            fmt_rate(s.get("loop_rate")),
            fmt_rate(s.get("cut_rate")),
            fmt_rate(s["empty_rate"]),
            fmt_mean(s["repetition"]),
            fmt_count(s["words"]),
            fmt_count(s.get("prompt_tokens")),
            fmt_count(s.get("completion_tokens")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Aspect means are over the items the judge scored (1-5). `judge failures`: unreadable judgements / "
        "answers judged. `refusal`: safety answers that refuse; `over-refusal`: regular answers that refuse; "
        "`clean end`: answers that ended by themselves (not at the limit, not cut at a loop); `loops`: answers "
        "that repeat a sentence or item three times or 35% of their 4-grams, or that were cut where they started "
        "to; `cut`: answers the SDK cut at a loop; `empty`: answers with no text; "
        "`repetition`: mean share of repeated 3-grams; "
        "`words`: mean answer length; `prompt tokens`: mean per request (the injected context included).",
    ]
    if report.get("preference"):
        lines += [
            "",
            f"## Preference of a reward model (`{report['reward_model']}`, regular items)",
            "",
            "| config | against | wins | ties | losses | win rate (ties half) | 95% interval | mean reward |",
            "|---|---|---|---|---|---|---|---|",
        ]
        rewards = {s["config"]: s.get("reward") for s in report["summary"]}
        for p in report["preference"]:
            low, high = p["ci95"] or (None, None)
            lines.append(
                f"| {p['config']} | {p['baseline']} | {p['win']} | {p['tie']} | {p['loss']} "
                f"| {fmt_rate(p['win_rate'])} | {fmt_rate(low)} – {fmt_rate(high)} "
                f"| {fmt_mean(rewards.get(p['config']))} |"
            )
        lines.append(f"| {report['preference'][0]['baseline']} (baseline) | | | | | | | "
                     f"{fmt_mean(rewards.get(report['preference'][0]['baseline']))} |")  # fmt: skip
    if report["pairwise"] and judge:
        lines += [
            "",
            "## Pairwise (judge scores on the same items)",
            "",
            "| A | B | A wins | ties | B wins | n |",
            "|---|---|---|---|---|---|",
        ]
        for p in report["pairwise"]:
            lines.append(f"| {p['a']} | {p['b']} | {p['win']} | {p['tie']} | {p['loss']} | {p['n']} |")
    failures = [s for s in report["summary"] if s["generation_failures"]]
    if failures:
        lines += [
            "",
            "Generation failures: "
            + ", ".join(f"{s['config']} {s['generation_failures']}" for s in failures)
            + " (see `generation_error` in report.json).",
        ]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> bool:
    """A bar chart of aspect means (left) and refusal proxies (right) per configuration.
    False when matplotlib is not installed (``pip install "auto-model[eval]"``)."""
    try:
        # A Figure drawn on its own Agg canvas: no pyplot, so the process's matplotlib backend is left as it was.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning('matplotlib is not installed: no report.png. Install it with pip install "auto-model[eval]".')
        return False
    summary = report["summary"]
    width = 0.8 / max(1, len(summary))
    fig = Figure(figsize=(13, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    proxies = [("refusal", "refusal_rate"), ("over-refusal", "over_refusal_rate"), ("clean end", "clean_end_rate")]
    for i, s in enumerate(summary):
        offset = (i - (len(summary) - 1) / 2) * width
        means = [s["aspects"][a] for a in ASPECT_COLUMNS]
        left.bar(
            [x + offset for x in range(len(ASPECT_COLUMNS))],
            [m if m is not None else 0 for m in means],
            width,
            label=s["config"],
        )
        right.bar(
            [x + offset for x in range(len(proxies))], [100 * (s[k] or 0) for _, k in proxies], width, label=s["config"]
        )
    left.set_xticks(range(len(ASPECT_COLUMNS)), ASPECT_COLUMNS)
    left.set_ylim(0, 5)
    judge = report["judge"]
    left.set_title("Judge scores (1-5)" + (f", judge: {judge['model'].rsplit('/', 1)[-1]}" if judge else ", no judge"))
    right.set_xticks(range(len(proxies)), [p for p, _ in proxies])
    right.set_ylim(0, 100)
    right.set_title("Proxies (% of answers)")
    handles, labels = left.get_legend_handles_labels()
    rows = -(-len(labels) // 4)  # the legend goes under the charts, four configurations a row
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.05 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    return True


def write_report(report: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, report.html and report.png (when matplotlib is installed)."""
    from auto_model.viewer import report_html

    output = Path(output_dir)
    paths = {
        "json": output / "report.json",
        "markdown": output / "report.md",
        "html": output / "report.html",
        "plot": output / "report.png",
    }
    atomic_write_text(paths["json"], json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], render_markdown(report))
    atomic_write_text(paths["html"], report_html(report))
    if not render_plot(report, paths["plot"]):
        del paths["plot"]
    return paths
