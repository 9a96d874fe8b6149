"""The search-tree page (``auto-model-train visualize``) in a real headless browser (Debian's chromium,
driven by Playwright), on a 20-level search whose base, optimizer and reward are ScriptedRole and
ScriptedReward: fakes, named as such, that make a tree of known shape without an engine. The real
trainer writes the same page for its runs (tests/test_trainer_cli.py checks it is there)."""

from __future__ import annotations

import json
import re

from auto_model.backends.base import Completion
from auto_model.rewards.base import ItemScore
from auto_model.trainer.cli import main
from auto_model.trainer.search import BeamSearch
from auto_model.trainer.tree import SearchConfig
from auto_model.viewer import tree_html
from tests.conftest import open_offline_page


class ScriptedRole:
    """A fake base model (answers name their prompt) and optimizer (each rewrite adds a numbered rule)."""

    def __init__(self):
        self.made = 0

    def ask(self, prompts, options, seeds=None, prefill=None):
        out = []
        for p in prompts:
            self.made += 1
            current = p.split("<prompt>")[1].split("</prompt>")[0].strip()
            out.append(Completion(f"<prompt>\n{current} Rule {self.made}: be concrete.\n</prompt>", "stop", 1, 1))
        return out

    def answer_each(self, items):
        return [Completion(f"An answer under {len(p.split())} words of prompt.", "stop", 1, 1) for p, _, _, _ in items]

    def examples(self, query, k, route=None):
        return []


class ScriptedReward:
    """A fake reward model: longer prompts' answers score higher, with no reasons."""

    def score(self, items):
        return [ItemScore({"Reward": float(re.findall(r"\d+", i.answer)[0]) / 10}, {"Reward": None}) for i in items]


def test_the_search_tree_page_highlights_the_best_path_and_opens_each_node(tmp_path, browser, artifacts):
    config = SearchConfig(depth=20, beam_size=2, n_actions=2, max_depth_increase=0, skip_threshold=None, seed=1)
    search = BeamSearch(ScriptedRole(), ScriptedRole(), ScriptedReward(), config, [f"query {i}" for i in range(20)],
                        "You are a helpful assistant.", tmp_path / "ckpt.json")  # fmt: skip
    search.run()
    run = {"status": "finished", "config": {"reward": "rm:scripted"}, **search.report()}
    path = run["result"]["path"]
    assert len(path) == 20 and len(run["nodes"]) == 1 + 2 + 18 * 4  # the root, its 2 rewrites, then 2 x 2 a level
    page_file = tmp_path / "tree.html"
    page_file.write_text(tree_html(run), encoding="utf-8")

    page, problems = open_offline_page(browser, page_file, 1200, 900)
    assert page.locator("section.level").count() == 20
    # The best path is highlighted and open; every other node is closed.
    best = page.locator("details.best")
    assert [int(i.split("-")[1]) for i in best.evaluate_all("els => els.map(e => e.id)")] == path
    assert best.evaluate_all("els => els.every(e => e.open)")
    other_id = next(n["id"] for n in run["nodes"] if n["id"] not in path and n["level"] == 5)
    other = page.locator(f"#node-{other_id}")
    assert not other.evaluate("e => e.open") and not other.locator("pre.prompt").is_visible()
    other.locator("summary").click()  # expanding a node shows its prompt, its diff and its scores
    assert other.evaluate("e => e.open") and other.locator("pre.prompt").is_visible()
    node = next(n for n in run["nodes"] if n["id"] == other_id)
    added = node["prompt"].split("assistant.")[1].split()[-4]
    assert added in other.locator("pre.prompt ins").all_inner_texts()[-1]
    assert other.locator("table.scores").inner_text().startswith("aspect\tscore")
    assert f"reward {node['reward']:.3g}" in other.locator("summary").inner_text()
    page.screenshot(path=str(artifacts / "search-tree.png"), full_page=False)
    assert problems == []


def test_visualize_writes_the_page_of_a_log_dir(tmp_path, capsys):
    out = tmp_path / "run" / "algo_output"
    out.mkdir(parents=True)
    (out / "output.json").write_text(json.dumps({"status": "stopped", "levels_done": 0, "nodes": []}))
    assert main(["visualize", str(tmp_path / "run"), "-o", str(tmp_path / "t.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "t.html")
    assert "no scored path yet" in (tmp_path / "t.html").read_text()
    assert main(["visualize", str(tmp_path / "nowhere")]) == 2
    assert "holds no DRPO run" in capsys.readouterr().err
