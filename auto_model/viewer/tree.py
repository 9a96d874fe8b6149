"""The DRPO search tree as one self-contained HTML page.

``tree_html(run)`` renders a run's ``output.json`` (what ``auto-model-train`` writes to
``LOG_DIR/algo_output/``): level by level, every candidate prompt with the action that made it
(``init``, ``rewrite``, ``keep`` or ``carry``), a word-level diff against its parent, the query and
the answer it was scored on, its aspect scores with their reasons, judge failures and the
optimizer's rejected rewrites. The best path is highlighted and open; every node collapses and
expands (``<details>``). The page is plain HTML and CSS, with no script: it opens at once, offline.
"""

from __future__ import annotations

import difflib
import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from auto_model.files import atomic_write_text
from auto_model.viewer.page import document, fmt

STYLE = """
details{border:1px solid #ddd;border-radius:6px;margin:.35em 0;padding:.2em .6em;background:#fff}
details.best{border:2px solid #2a7ae2;background:#f3f8ff}
summary{cursor:pointer}summary .reward{font-weight:600}summary .tag{font-size:.85em;color:#2a7ae2}
.action{display:inline-block;min-width:4.5em;color:#555}
ins{background:#d4f7d4;text-decoration:none}del{background:#fbd3d3}
"""


def word_diff(before: str, after: str) -> str:
    """``after`` against ``before``, word by word, as HTML (``<ins>`` added, ``<del>`` removed)."""
    old, new = re.split(r"(\s+)", before), re.split(r"(\s+)", after)
    out = []
    for op, a, b, c, d in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op in ("delete", "replace"):
            out.append(f"<del>{html.escape(''.join(old[a:b]))}</del>")
        if op in ("insert", "replace"):
            out.append(f"<ins>{html.escape(''.join(new[c:d]))}</ins>")
        if op == "equal":
            out.append(html.escape("".join(old[a:b])))
    return "".join(out)


def _node(node: Mapping[str, Any], parent: Mapping[str, Any] | None, best: bool) -> str:
    e = html.escape
    evaluation = node.get("evaluation") or {}
    scores = evaluation.get("scores") or {}
    reward = node.get("reward")
    state = "failed" if reward is None and node.get("error") else ""
    summary = (
        f'<summary><span class="action">{e(node["action"])}</span> node {node["id"]} · '
        f'<span class="reward {state}">{"no score" if reward is None else f"reward {fmt(reward)}"}</span>'
        + (' <span class="tag">best path</span>' if best else "")
        + "</summary>"
    )
    parts = [summary]
    if parent is not None and parent.get("prompt") != node.get("prompt"):
        parts.append(f"<div>prompt, against node {parent['id']}:</div><pre class=\"prompt\">"
                     f"{word_diff(parent.get('prompt') or '', node.get('prompt') or '')}</pre>")  # fmt: skip
    else:
        parts.append(f'<div>prompt{" (unchanged)" if parent is not None else ""}:</div>'
                     f'<pre class="prompt">{e(node.get("prompt") or "")}</pre>')  # fmt: skip
    if node.get("note"):
        parts.append(f'<div class="move">move: {e(node["note"])}</div>')
    if node.get("decoding") or node.get("examples") is not None:
        settings = ", ".join(f"{k} {v:g}" for k, v in (node.get("decoding") or {}).items()) or "none"
        tokens = node.get("prompt_tokens")
        parts.append(f"<div>decoding: {e(settings)} · examples per request: {fmt(node.get('examples'))}"
                     + (f" · prompt tokens {tokens:.0f}" if tokens is not None else "") + "</div>")  # fmt: skip
    answers = node.get("answers") or []
    if len(answers) > 1:  # a level of several queries: each with its answer and reward
        for a in answers:
            parts.append(f"<div>query (reward {fmt(a.get('reward'))}):</div><pre>{e(a.get('query') or '')}</pre>"
                         f"<pre>{e(a.get('answer') or '')}</pre>")  # fmt: skip
    else:
        parts.append(f"<div>query:</div><pre>{e(node.get('query') or '')}</pre>")
        parts.append(f"<div>answer:</div><pre>{e(node.get('answer') or '(none)')}</pre>")
    if scores:
        rows = "".join(
            f"<tr><td>{e(a)}</td><td>{fmt(s.get('score'))}</td><td>{e(s.get('rationale') or '')}</td></tr>"
            for a, s in scores.items()
        )
        parts.append(f'<table class="scores"><tr><th>aspect</th><th>score</th><th>reason</th></tr>{rows}</table>')
    if node.get("error"):
        parts.append(f'<div class="failed">{e(node["error"])}</div>')
    for reason in node.get("rejected") or []:
        parts.append(f'<div class="failed">rejected rewrite: {e(reason)}</div>')
    return (f'<details id="node-{node["id"]}" class="node{" best" if best else ""}"{" open" if best else ""}>'
            + "".join(parts) + "</details>")  # fmt: skip


def tree_html(run: Mapping[str, Any]) -> str:
    """The page for a run's ``output.json`` (a dict); see the module docstring."""
    nodes: Sequence[Mapping[str, Any]] = run.get("nodes") or []
    by_id = {n["id"]: n for n in nodes}
    result = run.get("result") or {}
    best = set(result.get("path") or [])
    config = run.get("config") or {}
    e = html.escape
    title = f"DRPO search: {config.get('base_model_name') or 'run'}"
    meta = [
        f"<b>{e(str(run.get('status', '?')))}</b> after {run.get('levels_done', '?')} levels",
        f"{len(nodes)} candidates",
        f"best path mean {fmt(result.get('path_mean'))}" if result else "no scored path yet",
        f"reward {e(str(config.get('reward', 'llm')))}",
    ]
    sections = [f'<h1>{e(title)}</h1><p class="meta">{" · ".join(meta)}</p>']
    summary = {row["level"]: row for row in run.get("levels") or []}
    for level in sorted({n["level"] for n in nodes}):
        row = summary.get(level + 1, {})
        head = f"Level {level + 1}"
        if row:
            head += (f" · {row.get('candidates')} candidates, best {fmt(row.get('best'))}, "
                     f"mean {fmt(row.get('mean'))}, {row.get('accepted', 0)} of {row.get('rewrites', 0)} rewrites "
                     f"kept, {row.get('rejected', 0)} rejected")  # fmt: skip
        items = [_node(n, by_id.get(n.get("parent")), n["id"] in best) for n in nodes if n["level"] == level]
        sections.append(f'<section class="level" id="level-{level + 1}"><h2>{e(head)}</h2>{"".join(items)}</section>')
    return document(title, "".join(sections), style=STYLE)


def write_tree_html(log_dir: str | Path, output: str | Path | None = None) -> Path:
    """Render ``LOG_DIR/algo_output/output.json`` to ``output`` (default ``LOG_DIR/algo_output/tree.html``)."""
    from auto_model.errors import InvalidRequestError

    source = Path(log_dir) / "algo_output" / "output.json"
    if not source.is_file():
        raise InvalidRequestError(f"{log_dir} holds no DRPO run (no algo_output/output.json); give a --log-dir of "
                                  "auto-model-train.")  # fmt: skip
    target = Path(output) if output else source.with_name("tree.html")
    atomic_write_text(target, tree_html(json.loads(source.read_text(encoding="utf-8"))))
    return target
