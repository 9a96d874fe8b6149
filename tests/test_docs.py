"""The documentation holds together: the README is a front page (at most 250 lines), every relative
link of the README, BENCHMARKS.md and docs/ reaches a file and, with an anchor, one of its headings,
and every command line of our CLIs in their shell blocks uses only flags that the command has."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
CLIS = {"auto-model", "auto-model-train", "auto-model-eval", "auto-model-feedback", "auto-model-rm"}
#: the CLIs whose first word picks a subcommand with flags of its own
SUBCOMMANDS = {"auto-model", "auto-model-rm"}
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FLAG = re.compile(r"^--[a-z][a-z0-9_-]*")


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """A heading's anchor as GitHub writes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    found = (
        m.group(1) for line in _outside_code(page.read_text(encoding="utf-8")) if (m := re.match(r"#+ (.*)", line))
    )
    return frozenset(slug(h) for h in found)


def links(page: Path) -> list[str]:
    return [m.group(1) for line in _outside_code(page.read_text(encoding="utf-8")) for m in _LINK.finditer(line)]


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    assert readme.splitlines()[3:5] == [  # the two commands come first (CI runs the second)
        "make demo   # set up .venv, then answer a harmful and an ordinary query with the embedded default model",
        "make test   # set up .venv, then lint (ruff), type-check (mypy) and run the test suite",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no such heading in {file.relative_to(ROOT)}")
    assert broken == []


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A part (`x`)\n\nSee [it](#a-part-x), [that](#nowhere).\n```\n# not a heading\n```\n")
    assert anchors(page) == {"title", "a-part-x"} and links(page) == ["#a-part-x", "#nowhere"]


def commands(page: Path) -> list[list[str]]:
    """Our CLIs' command lines in a page's shell blocks, as words (continuations joined, comments cut)."""
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            while words:
                cut = next((i for i, w in enumerate(words) if w in ("&&", "||", "|", ";", ">", "2>")), len(words))
                part, words = words[:cut], words[cut + 1 :]
                while part and re.match(r"^[A-Z_]+=", part[0]):
                    part = part[1:]  # VAR=value before the command
                if part and part[0] in CLIS:
                    found.append(part)
    return found


@cache
def flags_of(cli: str, sub: str | None) -> frozenset[str]:
    exe = Path(sys.executable).parent / cli
    out = subprocess.run([str(exe), *([sub] if sub else []), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out.stdout))


def test_every_documented_command_line_uses_real_flags():
    wrong, seen = [], 0
    for page in PAGES:
        for words in commands(page):
            cli, rest = words[0], words[1:]
            sub = rest[0] if cli in SUBCOMMANDS and rest and not rest[0].startswith("-") else None
            for word in rest:
                flag = _FLAG.match(word)  # snake_case spellings are aliases of the kebab-case flags
                if flag and flag.group(0).replace("_", "-") not in flags_of(cli, sub):
                    wrong.append(f"{page.name}: {cli} {sub or ''} {flag.group(0)}")
            seen += 1
    assert seen >= 20 and wrong == []
    assert "--no-such-flag" not in flags_of("auto-model", "generate")  # the check can fail
