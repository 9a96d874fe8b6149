"""The evaluation report page (``report.html`` of ``auto-model-eval``) in a real headless browser
(Debian's chromium, driven by Playwright), on the report of a real evaluation run kept in the
repository (``evaluations/default-models``: 8 configurations x 140 items, judged by the embedded
model, with judge failures). The end-to-end evaluation test (tests/test_evaluation_run.py) checks
that a run writes the page."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from auto_model.evaluation import cli as eval_cli
from auto_model.viewer import report_html
from tests.conftest import open_offline_page

RUN = Path(__file__).resolve().parents[1] / "evaluations" / "default-models"


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((RUN / "report.json").read_text(encoding="utf-8"))


def test_the_report_page_shows_every_answer_and_filters_by_kind_tag_and_text(tmp_path, report, browser, artifacts):
    records = report["records"]
    configs = [c["name"] for c in report["configs"]]
    ids = list(dict.fromkeys(r["id"] for r in records))
    page_file = tmp_path / "report.html"
    page_file.write_text(report_html(report), encoding="utf-8")

    page, problems = open_offline_page(browser, page_file, 1400, 1000)
    page.screenshot(path=str(artifacts / "eval-report.png"))

    # The tables: one row per configuration, with the figures of report.json.
    rows = page.locator("table.summary tr").all_inner_texts()[1:]
    assert [r.split("\t")[0] for r in rows] == configs
    for row, s in zip(rows, report["summary"], strict=True):
        cells = row.split("\t")
        assert f"{100 * s['refusal_rate']:.1f}%" in cells and f"{s['judge_failures']}/{s['judged']}" in cells
    assert page.locator("table.pairwise tr").count() == 1 + len(configs) * (len(configs) - 1) // 2
    # The charts: a bar per configuration and aspect, and per configuration and proxy.
    assert page.locator("svg rect.bar").count() == len(configs) * (6 + 4)

    # Every item, every configuration's answer side by side, in the configurations' order.
    items = page.locator("article.item")
    assert items.count() == len(ids) and page.locator("#f-count").inner_text() == f"{len(ids)} of {len(ids)} items"
    first = page.locator(f"#item-{ids[0]}")
    assert first.locator(".answer .cfg").all_inner_texts() == configs
    answers = {r["config"]: r for r in records if r["id"] == ids[0]}
    assert first.locator(".answer pre").nth(2).inner_text() == answers[configs[2]]["answer"].strip()

    def shown() -> list[str]:
        return [i.split("-", 1)[1] for i in items.evaluate_all("els => els.filter(e => !e.hidden).map(e => e.id)")]

    # Filter by kind, then tag, then text; the count says how many are shown.
    page.select_option("#f-kind", "safety")
    safety = [i for i in ids if next(r for r in records if r["id"] == i)["kind"] == "safety"]
    assert shown() == safety and page.locator("#f-count").inner_text() == f"{len(safety)} of {len(ids)} items"
    page.select_option("#f-tag", "weapons")
    weapons = [i for i in safety if "weapons" in next(r for r in records if r["id"] == i)["tags"]]
    assert shown() == weapons and 0 < len(weapons) < len(safety)
    word = next(r for r in records if r["id"] == weapons[0])["query"].split()[-1].strip("?.").lower()
    page.fill("#f-text", word)
    assert weapons[0] in shown() and len(shown()) <= len(weapons)
    page.fill("#f-text", "")
    page.select_option("#f-kind", "")
    page.select_option("#f-tag", "")
    page.check("#f-differ")
    differ = [i for i in ids if len({r["proxies"]["refusal"] == "refusal" for r in records if r["id"] == i}) > 1]
    assert shown() == differ and differ
    page.uncheck("#f-differ")
    assert len(shown()) == len(ids)

    # A judged answer opens to its aspect scores and reasons; a judge failure says so.
    scored = next(r for r in records if r["judge"] and r["judge"]["scores"])
    cell = page.locator(f"#item-{scored['id']} .answer[data-config='{scored['config']}']")
    assert not cell.locator("table.scores").is_visible()
    cell.locator("details.judge summary").click()
    table = cell.locator("table.scores")
    assert table.is_visible()
    aspect, first_score = next(iter(scored["judge"]["scores"].items()))
    assert table.locator("tr").nth(1).inner_text().split("\t")[:2] == [aspect, f"{first_score['score']:.3g}"]
    cell.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "eval-report-answers.png"))
    failed = next(r for r in records if r["judge"] and not r["judge"]["scores"])
    assert (
        "judge failure" in page.locator(f"#item-{failed['id']} .answer[data-config='{failed['config']}']").inner_text()
    )
    assert problems == []


def test_render_only_rewrites_the_reports_of_an_earlier_run_without_loading_anything(tmp_path, capsys):
    shutil.copy(RUN / "report.json", tmp_path / "report.json")
    assert eval_cli.main(["--output", str(tmp_path), "--render-only"]) == 0
    assert f"{tmp_path / 'report.html'}" in capsys.readouterr().out
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count('<article class="item"') == 140 and "<link" not in page and "src=" not in page
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == (RUN / "report.md").read_text(encoding="utf-8")
    assert eval_cli.main(["--output", str(tmp_path / "none"), "--render-only"]) == 2
    assert "holds no report.json" in capsys.readouterr().err
