"""What every page of the viewer shares: the base style and the document around a body."""

from __future__ import annotations

import html
from typing import Any

BASE_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.1em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
.meta{color:#555}.meta b{color:#222}
pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;border-radius:4px;margin:.3em 0}
table{border-collapse:collapse;margin:.3em 0}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left}
.failed{color:#b00020}
"""


def fmt(value: Any) -> str:
    """A figure for a page: three significant digits for floats, a dash for a missing value, escaped."""
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else html.escape(str(value))


def document(title: str, body: str, *, style: str = "", script: str = "") -> str:
    """One self-contained page: inline style (and script, when given); nothing is fetched."""
    tail = f"<script>{script}</script>" if script else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{BASE_STYLE}{style}</style></head><body>{body}{tail}</body></html>\n")  # fmt: skip
