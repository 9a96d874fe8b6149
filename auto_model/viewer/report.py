"""An evaluation report (``report.json`` of ``auto-model-eval``) as one self-contained HTML page.

``report_html(report)`` shows what ``report.md`` and ``report.png`` show — the configurations, the
judge scores and proxies per configuration, the pairwise table, usage — with the charts drawn as
inline SVG, then every item with its answers side by side, one column per configuration, each with
its proxies (refusal, clean end, repetition, words, route) and judge scores with their reasons.
The items filter by kind, tag, text, and "configurations disagree on refusal", with a few lines of
inline script; nothing is fetched, so the page opens offline.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from auto_model.files import atomic_write_text
from auto_model.viewer.page import document, fmt

COLOURS = ("#2a7ae2", "#e2892a", "#3aa35b", "#c23b3b", "#8a5cc2", "#8c6d46", "#d45fb0", "#6f6f6f", "#b8b22a", "#2ab4c2")
PROXIES = (
    ("refusal", "refusal_rate", "safety answers that refuse"),
    ("over-refusal", "over_refusal_rate", "regular answers that refuse"),
    ("clean end", "clean_end_rate", "answers that ended by themselves (not at the limit, not cut at a loop)"),
    ("loops", "loop_rate", "answers that loop, or were cut where they started to"),
    ("cut", "cut_rate", "answers the SDK cut at a loop"),
    ("empty", "empty_rate", "answers with no text"),
)

STYLE = """
body{max-width:none;margin:1.5em 2em}
.legend span{display:inline-block;margin-right:1em}
.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em;border-radius:2px}
.charts{display:flex;flex-wrap:wrap;gap:1.5em}.charts figure{margin:0}.charts figcaption{font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
form.filters{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1}
form.filters label{margin-right:1em}#f-count{color:#555}
article.item{border:1px solid #ddd;border-radius:6px;margin:.6em 0;padding:.4em .6em}
article.item header{color:#555}article.item header b{color:#222}
.query{background:#eef3fb}
.answers{display:grid;gap:.6em;overflow-x:auto}
.answer{min-width:0}.answer pre{max-height:18em;overflow:auto;margin:.2em 0}
.cfg{font-weight:600}
.badge{display:inline-block;font-size:.8em;padding:0 .4em;border-radius:3px;background:#eee;margin:.1em .2em .1em 0}
.empty{color:#888}.good{background:#d4f7d4}.bad{background:#fbd3d3}
details.judge summary{cursor:pointer;font-size:.9em}
.answer table.scores{font-size:.85em;width:100%}.answer table.scores td:nth-child(-n+2){white-space:nowrap;width:1%}
"""

SCRIPT = """
const one = s => document.querySelector(s);
const items = [...document.querySelectorAll('article.item')];
function apply() {
  const kind = one('#f-kind').value, tag = one('#f-tag').value;
  const text = one('#f-text').value.trim().toLowerCase(), differ = one('#f-differ').checked;
  let shown = 0;
  for (const item of items) {
    const show = (!kind || item.dataset.kind === kind)
      && (!tag || item.dataset.tags.split(' ').includes(tag))
      && (!text || item.textContent.toLowerCase().includes(text))
      && (!differ || item.dataset.differ === '1');
    item.hidden = !show;
    shown += show;
  }
  one('#f-count').textContent = shown + ' of ' + items.length + ' items';
}
for (const id of ['#f-kind', '#f-tag', '#f-text', '#f-differ']) one(id).addEventListener('input', apply);
apply();
"""


def _rate(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def bar_chart(
    title: str, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]], top: float, unit: str = ""
) -> str:
    """A grouped bar chart as inline SVG: one group per label, one bar per series (hover: the value)."""
    width, height, left, bottom = max(320, 70 * len(groups) * max(1, len(series)) // 3 + 60), 220, 36, 30
    plot_w, plot_h = width - left - 8, height - bottom - 10
    band = plot_w / max(1, len(groups))
    bar = band * 0.8 / max(1, len(series))
    parts = [f'<svg role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" font-size="11">']  # fmt: skip
    for tick in range(5):
        mark = top * tick / 4
        y = 10 + plot_h - plot_h * tick / 4
        parts.append(f'<line x1="{left}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{mark:g}{unit}</text>')  # fmt: skip
    for g, group in enumerate(groups):
        x0 = left + g * band + band * 0.1
        for s, (name, values) in enumerate(series):
            value = values[g]
            if value is None:
                continue
            h = plot_h * min(value, top) / top
            parts.append(f'<rect class="bar" x="{x0 + s * bar:.1f}" y="{10 + plot_h - h:.1f}" width="{bar:.1f}" '
                         f'height="{h:.1f}" fill="{COLOURS[s % len(COLOURS)]}"><title>{html.escape(name)}: '
                         f"{value:.3g}{unit}</title></rect>")  # fmt: skip
        parts.append(f'<text x="{left + (g + 0.5) * band:.1f}" y="{height - 12}" text-anchor="middle">'
                     f"{html.escape(group)}</text>")  # fmt: skip
    parts.append("</svg>")
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{''.join(parts)}</figure>"


def _legend(names: Sequence[str]) -> str:
    return '<p class="legend">' + "".join(
        f'<span><i style="background:{COLOURS[i % len(COLOURS)]}"></i>{html.escape(n)}</span>'
        for i, n in enumerate(names)
    ) + "</p>"  # fmt: skip


def _examples(config: Mapping[str, Any]) -> Any:
    """A configuration's examples per request ("auto": the artifact's number for each route)."""
    return (
        "auto"
        if "num_optimized_icl" in config and config["num_optimized_icl"] is None
        else config.get("num_optimized_icl")
    )


def _configs_table(configs: Sequence[Mapping[str, Any]]) -> str:
    e = html.escape
    rows = []
    for c in configs:
        prompt = "off" if not c.get("optimized_prompt", True) else c.get("prompt_path") or "optimized"
        if c.get("system_prompt"):
            prompt = "given"
        used = c.get("system_prompt_used")
        rows.append(
            f"<tr><td>{e(c['name'])}</td><td>{e(str(c.get('engine') or c.get('model')))}</td><td>{e(str(prompt))}</td>"
            f"<td class=num>{fmt(_examples(c))}</td><td class=num>{fmt(c.get('best_of', 1))}</td>"
            f"<td class=num>{fmt(c.get('temperature'))}</td><td>"
            + (f"<details><summary>{len(used.split())} words</summary><pre>{e(used)}</pre></details>"
               if used else "none")
            + "</td></tr>"
        )  # fmt: skip
    head = "<tr><th>config</th><th>engine</th><th>prompt</th><th>examples</th><th>best of</th><th>temperature</th>"
    return f'<table class="configs">{head}<th>system prompt used</th></tr>{"".join(rows)}</table>'


def _summary_table(summary: Sequence[Mapping[str, Any]], judged: bool) -> str:
    aspects = list(summary[0]["aspects"]) if summary and judged else []
    head = ["config", "n", *aspects, *(["judge failures"] if judged else []), *(p for p, _, _ in PROXIES)]
    head += ["repetition", "words", "prompt tokens", "completion tokens"]
    rows = []
    for s in summary:
        cells = [
            str(s["n"]),
            *(fmt(s["aspects"][a]) for a in aspects),
            *([f"{s['judge_failures']}/{s['judged']}"] if judged else []),
            *(_rate(s.get(key)) for _, key, _ in PROXIES),
            fmt(s["repetition"]),
            *("–" if s.get(k) is None else f"{s[k]:.1f}" for k in ("words", "prompt_tokens", "completion_tokens")),
        ]
        rows.append(f"<tr><td>{html.escape(s['config'])}</td>" + "".join(f"<td class=num>{c}</td>" for c in cells))
    return (f'<table class="summary"><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr>'
            f'{"</tr>".join(rows)}</tr></table>')  # fmt: skip


def _preference_table(report: Mapping[str, Any]) -> str:
    e = html.escape
    rewards = {s["config"]: s.get("reward") for s in report.get("summary") or []}
    rows = []
    for p in report["preference"]:
        low, high = p.get("ci95") or (None, None)
        rows.append(
            f"<tr><td>{e(p['config'])}</td><td>{e(p['baseline'])}</td><td class=num>{p['win']}</td>"
            f"<td class=num>{p['tie']}</td><td class=num>{p['loss']}</td><td class=num>{_rate(p['win_rate'])}</td>"
            f"<td class=num>{_rate(low)} – {_rate(high)}</td><td class=num>{fmt(rewards.get(p['config']))}</td></tr>"
        )
    head = ("<tr><th>config</th><th>against</th><th>wins</th><th>ties</th><th>losses</th><th>win rate (ties half)</th>"
            "<th>95% interval</th><th>mean reward</th></tr>")  # fmt: skip
    return f'<table class="preference">{head}{"".join(rows)}</table>'


def _pairwise_table(pairwise: Sequence[Mapping[str, Any]]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(p['a'])}</td><td>{e(p['b'])}</td><td class=num>{p['win']}</td><td class=num>{p['tie']}</td>"
        f"<td class=num>{p['loss']}</td><td class=num>{p['n']}</td></tr>"
        for p in pairwise
    )
    return ('<table class="pairwise"><tr><th>A</th><th>B</th><th>A wins</th><th>ties</th><th>B wins</th><th>n</th>'
            f"</tr>{rows}</table>")  # fmt: skip


def _judge(record: Mapping[str, Any]) -> str:
    e = html.escape
    judge = record.get("judge")
    if not judge:
        return ""
    scores = judge.get("scores")
    if not scores:
        return f'<div class="failed judge-failure">judge failure: {e(str(judge.get("error") or "no score"))}</div>'
    mean = fmean(s["score"] for s in scores.values())
    rows = "".join(
        f"<tr><td>{e(a)}</td><td class=num>{fmt(s.get('score'))}</td><td>{e(s.get('rationale') or '')}</td></tr>"
        for a, s in scores.items()
    )
    return (f'<details class="judge"><summary>judge {mean:.2f}</summary><table class="scores"><tr><th>aspect</th>'
            f"<th>score</th><th>reason</th></tr>{rows}</table></details>")  # fmt: skip


def _answer(record: Mapping[str, Any]) -> str:
    e = html.escape
    badges = []
    proxies = record.get("proxies")
    if proxies:
        refusal = proxies["refusal"]
        wanted = record["kind"] == "safety"
        label = {"refusal": "refuses", "partial": "partly refuses"}.get(refusal, "answers")
        good = (refusal == "refusal") == wanted
        badges.append(f'<span class="badge refusal {"good" if good else "bad"}">{label}</span>')
        if record.get("looped"):
            badges.append('<span class="badge bad">cut at a loop</span>')
        elif proxies.get("loops"):
            badges.append('<span class="badge bad">loops</span>')
        badges.append('<span class="badge">ended</span>' if proxies["ended_cleanly"]
                      else '<span class="badge bad">length limit</span>' if record.get("finish_reason") == "length"
                      else "")  # fmt: skip
        badges.append(f'<span class="badge">repetition {proxies["repetition"]:.2f}</span>')
        badges.append(f'<span class="badge">{proxies["words"]} words</span>')
    if record.get("route"):
        badges.append(f'<span class="badge">route {e(record["route"])}</span>')
    if record.get("reward") is not None:
        badges.append(f'<span class="badge">reward {record["reward"]:.2f}</span>')
    if record.get("generation_error"):
        body = f'<div class="failed">generation failed: {e(record["generation_error"])}</div>'
    elif record.get("answer"):
        body = f"<pre>{e(record['answer'])}</pre>"
    else:
        body = '<pre class="empty">(no text)</pre>'
    return (f'<div class="answer" data-config="{e(record["config"])}"><div class="cfg">{e(record["config"])}</div>'
            f'<div>{"".join(badges)}</div>{body}{_judge(record)}</div>')  # fmt: skip


def _items(records: Sequence[Mapping[str, Any]], configs: Sequence[str]) -> str:
    e = html.escape
    by_item: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in records:
        by_item.setdefault(r["id"], {})[r["config"]] = r
    tags = sorted({t for r in records for t in r.get("tags") or ()})
    kinds = sorted({r["kind"] for r in records})
    options = lambda values: "".join(f'<option value="{e(v)}">{e(v)}</option>' for v in values)  # noqa: E731
    filters = (
        '<form class="filters" onsubmit="return false">'
        f'<label>kind <select id="f-kind"><option value="">all</option>{options(kinds)}</select></label>'
        f'<label>tag <select id="f-tag"><option value="">all</option>{options(tags)}</select></label>'
        '<label>text <input id="f-text" type="search" placeholder="query or answer"></label>'
        '<label><input id="f-differ" type="checkbox"> only where the configurations disagree on refusal</label>'
        '<span id="f-count"></span></form>'
    )
    articles = []
    columns = f"grid-template-columns:repeat({len(configs)},minmax(260px,1fr))"
    for item_id, answers in by_item.items():
        first = next(iter(answers.values()))
        refusals = {(a.get("proxies") or {}).get("refusal") == "refusal" for a in answers.values()}
        tag_list = " ".join(first.get("tags") or ())
        cells = "".join(_answer(answers[c]) for c in configs if c in answers)
        articles.append(
            f'<article class="item" id="item-{e(item_id)}" data-kind="{e(first["kind"])}" data-tags="{e(tag_list)}" '
            f'data-differ="{int(len(refusals) > 1)}"><header><b>{e(item_id)}</b> · {e(first["kind"])}'
            f'{" · " + e(tag_list) if tag_list else ""}</header><pre class="query">{e(first.get("query") or "")}</pre>'
            f'<div class="answers" style="{columns}">{cells}</div></article>'
        )  # fmt: skip
    return filters + "".join(articles)


def report_html(report: Mapping[str, Any]) -> str:
    """The page for an evaluation report (the dict of ``report.json``); see the module docstring."""
    e = html.escape
    summary = report.get("summary") or []
    names = [s["config"] for s in summary]
    judge = report.get("judge")
    usage = (report.get("usage") or {}).get("total") or {}
    meta = [
        f"eval set <b>{e(str(report.get('eval_set')))}</b> ({report.get('items')} items)",
        f"judge <b>{e(judge['model'])}</b> ({e(str(judge.get('backend')))}, temperature 0)" if judge else "no judge",
        f"{usage.get('calls', 0)} requests sent, {usage.get('cached', 0)} from cache, "
        f"{usage.get('failed', 0)} failed, {report.get('seconds', 0)} s",
        f"written {e(str(report.get('created', '')))}",
    ]
    body = [f'<h1>Evaluation report</h1><p class="meta">{" · ".join(meta)}</p>', "<h2>Configurations</h2>"]
    body.append(_configs_table(report.get("configs") or []))
    body.append("<h2>Charts</h2>" + _legend(names) + '<div class="charts">')
    if judge and summary:
        aspects = list(summary[0]["aspects"])
        body.append(bar_chart("Judge scores (1-5)", aspects,
                              [(s["config"], [s["aspects"][a] for a in aspects]) for s in summary], 5))  # fmt: skip
    body.append(bar_chart("Proxies (% of answers)", [p for p, _, _ in PROXIES],
                          [(s["config"], [None if s.get(k) is None else 100 * s[k] for _, k, _ in PROXIES])
                           for s in summary], 100, "%"))  # fmt: skip
    body.append("</div><h2>Scores and proxies</h2>" + _summary_table(summary, bool(judge)))
    body.append(
        '<p class="meta">'
        + (
            "Aspect means are over the items the judge scored (1-5); judge failures: unreadable judgements / "
            "answers judged. "
            if judge
            else ""
        )
        + "; ".join(f"{p}: {why}" for p, _, why in PROXIES)
        + "; repetition: mean share of repeated 3-grams; words: mean answer length.</p>"
    )
    if report.get("preference"):
        body.append(f"<h2>Preference of a reward model ({e(str(report.get('reward_model')))}, regular items)</h2>"
                    + _preference_table(report))  # fmt: skip
    if judge and report.get("pairwise"):
        body.append("<h2>Pairwise (judge scores on the same items)</h2>" + _pairwise_table(report["pairwise"]))
    failures = [s for s in summary if s["generation_failures"]]
    if failures:
        body.append('<p class="failed">Generation failures: '
                    + ", ".join(f"{e(s['config'])} {s['generation_failures']}" for s in failures) + "</p>")  # fmt: skip
    body.append("<h2>Answers</h2>" + _items(report.get("records") or [], names))
    return document("Evaluation report", "".join(body), style=STYLE, script=SCRIPT)


def write_report_html(report_json: str | Path, output: str | Path | None = None) -> Path:
    """Render a ``report.json`` to ``output`` (default: ``report.html`` beside it)."""
    from auto_model.errors import InvalidRequestError

    source = Path(report_json)
    if source.is_dir():
        source = source / "report.json"
    if not source.is_file():
        raise InvalidRequestError(f"{report_json} is not an evaluation report: give auto-model-eval's --output "
                                  "folder or its report.json.")  # fmt: skip
    target = Path(output) if output else source.with_name("report.html")
    atomic_write_text(target, report_html(json.loads(source.read_text(encoding="utf-8"))))
    return target
