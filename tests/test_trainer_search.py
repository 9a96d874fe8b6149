"""DRPO's search semantics and reply parsing, on scripted replies.

ScriptedRole is a fake: it stands in for the base, metrics, eval and optimize models so that the
judge's scores and the optimizer's rewrites follow a script a real model cannot be made to follow.
The whole trainer runs on the real tiny model in test_trainer_cli.py.
"""

from __future__ import annotations

import json
import re

import pytest

from auto_model.backends.base import Completion
from auto_model.errors import InvalidRequestError
from auto_model.retrieval import load_icl_pool
from auto_model.rewards.base import Reward, RewardItem, Score
from auto_model.rewards.judge import (
    FALLBACK_ASPECTS,
    Judge,
    ReplyError,
    canonical_aspect,
    parse_aspects,
    parse_scores,
)
from auto_model.trainer.data import (
    CATEGORIES,
    load_training_queries,
    sample_training_queries,
)
from auto_model.trainer.search import BeamSearch
from auto_model.trainer.tree import SearchConfig, action_seed, parse_prompt_reply


class ScriptedRole:
    """A fake model role whose replies come from a function of the prompt (see the module docstring)."""

    def __init__(self, reply):
        self.reply, self.asked, self.queries = reply, [], []

    def ask(self, prompts, options, seeds=None, prefill=None):
        self.asked.extend(prompts)
        return [
            Completion(self.reply(p, None if seeds is None else seeds[i]), "stop", 1, 1) for i, p in enumerate(prompts)
        ]

    def answer_each(self, items):
        self.asked.extend(p for p, _, _, _ in items)
        self.queries.extend(dict.fromkeys(q for _, q, _, _ in items))
        return [Completion(self.reply(p, q), "stop", 1, 1) for p, q, _, _ in items]

    def examples(self, query, k, route=None):
        return []


def score_reply(scores: dict[str, float]) -> str:
    return json.dumps({a: {"rationale": f"{a} is fine", "score": s} for a, s in scores.items()})


def quality(prompt: str) -> float:
    """The scripted score of a prompt: its trailing 'vN' (v3 scores 3)."""
    found = re.findall(r"v(\d)", prompt)
    return float(found[-1]) if found else 2.0


def make_search(
    tmp_path, *, depth=3, beam_size=2, n_actions=2, max_depth_increase=2, eval_reply=None, optimizer=None, queries=None
):
    base = ScriptedRole(lambda prompt, query: f"[{prompt}] answers {query}")
    metrics = ScriptedRole(lambda p, s: '["Helpfulness", "Safety"]')

    def default_eval(p, s):
        answer = p.split("Assistant's answer:")[1]
        q = quality(answer.split("answers")[0])
        return score_reply({"Helpfulness": q, "Safety": q})

    evaluator = ScriptedRole(eval_reply or default_eval)

    calls: dict[str, int] = {}

    def default_optimizer(p, seed):
        current = p.split("<prompt>")[1].split("</prompt>")[0].strip()
        calls[p] = calls.get(p, 0) + 1  # the first action adds 1 on the quality scale, the second 2
        return f"<prompt>\n{current} then v{min(int(quality(current)) + calls[p], 5)}\n</prompt>"

    optimizer_role = ScriptedRole(optimizer or default_optimizer)
    judge = Judge(evaluator, metrics=metrics, metrics_cache_path=tmp_path / "metrics.json")
    config = SearchConfig(
        depth=depth, beam_size=beam_size, n_actions=n_actions, max_depth_increase=max_depth_increase, seed=1
    )
    queries = queries or [f"query {i}" for i in range(8)]
    search = BeamSearch(base, optimizer_role, judge, config, queries, "start v1", tmp_path / "ckpt.json")
    return search, optimizer_role, evaluator


def seeds_for(node_id, n, seed=1):
    return [action_seed(seed, node_id, j) for j in range(n)]


def test_a_search_config_is_checked_when_made_and_cannot_change():
    import dataclasses

    config = SearchConfig(moves=["rewrite", "examples"], route="everyday", k=1)
    assert config.moves == ("rewrite", "examples")  # a list from a checkpoint's JSON is kept as a tuple
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.depth = 3  # type: ignore[misc]
    for fields, message in (
        ({"depth": 0}, r"--depth must be >= 1, got 0 \(SearchConfig.depth\)"),
        ({"optimizer_max_new_tokens": True}, r"--judge-max-new-tokens must be >= 1"),
        ({"k": -1}, r"--k must be >= 0"),
        ({"min_examples": 9}, r"--min-examples must be in \[0, 5\], got 9"),
        ({"temperature": float("nan")}, r"--temperature must be >= 0"),
        ({"skip_threshold": float("inf")}, r"--skip-threshold must be a number or None"),
        ({"moves": ("rewrite", "dance")}, r"--moves takes some of rewrite, decoding"),
        ({"moves": ("examples",)}, r"pass --route everyday"),
        ({"route": "sideways"}, r"route must be one of everyday, safety"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            SearchConfig(**fields)


def test_beam_keeps_the_best_paths_and_returns_the_best_finished_prompt(tmp_path):
    search, optimizer, _ = make_search(tmp_path, depth=3, beam_size=2, n_actions=2)
    best = search.run()
    level1 = [n for n in search.nodes if n.level == 1]
    assert {n.action for n in level1} == {"rewrite"} and len(level1) == 2  # root expanded into n_actions rewrites
    level2 = [n for n in search.nodes if n.level == 2]
    assert len(level2) == 4  # beam 2 x 2 actions
    # The beam ranks by mean reward along the path, so the result's path mean is the highest finished.
    finished = [search.nodes[i] for i in search.finished]
    assert best.path_mean == max(n.path_mean for n in finished)
    assert best.path_rewards == [1.0, 3.0, 5.0]  # start v1 -> +2 -> +2: the best path the script allows
    assert all(len(search.path(n)) == 3 for n in finished)
    # The path rewards are the scripted qualities of the prompts along it.
    assert [quality(n.prompt) for n in search.path(best)] == best.path_rewards


def test_a_good_answer_is_kept_unrewritten_and_extends_the_path(tmp_path):
    # Every answer scores 5: nothing is rewritten, and the path runs max_depth_increase levels longer.
    search, optimizer, _ = make_search(
        tmp_path, depth=2, max_depth_increase=2, eval_reply=lambda p, s: score_reply({"Helpfulness": 5, "Safety": 4.5})
    )
    best = search.run()
    assert optimizer.asked == []
    assert [n.action for n in search.path(best)] == ["init", "keep", "keep", "keep"]
    assert len(search.path(best)) == 2 + 2 and best.prompt == "start v1"
    assert best.extensions == 3 and best.path_mean == 4.75


def test_a_malformed_reply_is_retried_then_repaired(tmp_path):
    replies = iter(["no json here", "{'Helpfulness': {'rationale': 'ok', 'score': '4',}, 'Safety': 3.5,}"])
    search, _, evaluator = make_search(tmp_path, depth=1, eval_reply=lambda p, s: next(replies))
    best = search.run()
    assert best.reward == 3.75 and best.evaluation["attempts"] == 2
    assert "could not be used because the reply has no JSON object" in evaluator.asked[1]


def test_an_evaluation_that_never_parses_is_a_recorded_failure_not_a_score(tmp_path):
    search, optimizer, evaluator = make_search(
        tmp_path, depth=2, eval_reply=lambda p, s: '{"Helpfulness": {"score": 9}, "Safety": 2}'
    )
    best = search.run()
    root = search.nodes[0]
    assert root.reward is None and root.evaluation["scores"] is None and root.path_rewards == []
    assert "after 3 attempts" in root.error and "outside 1 to 5" in root.evaluation["error"]
    assert len(evaluator.asked) == 2 * 3  # two levels, three attempts each
    # Never read as "already good": the failed node is carried, not kept, and its path is not extended.
    assert [n.action for n in search.path(best)] == ["init", "carry"] and best.extensions == 0
    assert optimizer.asked == []  # no feedback to rewrite from
    assert [f["role"] for f in search.reward.failures] == ["eval", "eval"]


def test_failed_aspect_selection_uses_the_fallback_and_is_recorded(tmp_path):
    metrics = ScriptedRole(lambda p, s: "I think it depends.")
    judge = Judge(ScriptedRole(lambda p, s: score_reply({a: 3 for a in FALLBACK_ASPECTS})), metrics=metrics)
    [(aspects, failed)] = judge.select_aspects(["How do I tie a tie?"])
    assert failed and aspects == list(FALLBACK_ASPECTS) and len(metrics.asked) == 3
    assert judge.failures[0]["role"] == "metrics"


def test_aspect_choices_are_cached_per_query(tmp_path):
    metrics = ScriptedRole(lambda p, s: '["Clarity", "Depth"]')
    judge = Judge(ScriptedRole(lambda p, s: ""), metrics=metrics, metrics_cache_path=tmp_path / "m.json")
    judge.select_aspects(["q1", "q2", "q1"])
    judge.select_aspects(["q1"])
    assert len(metrics.asked) == 2
    again = Judge(None, metrics=ScriptedRole(lambda p, s: "unused"), metrics_cache_path=tmp_path / "m.json")
    assert again.select_aspects(["q2"]) == [(["Clarity", "Depth"], False)]


def test_resume_from_a_checkpoint_ends_with_the_same_prompt(tmp_path):
    whole, _, _ = make_search(tmp_path / "a", depth=4)
    expected = whole.run()
    first, _, _ = make_search(tmp_path / "b", depth=4)
    first.step()
    first.step()  # two levels done, then the process "dies"
    resumed, optimizer, _ = make_search(tmp_path / "b", depth=4)
    assert resumed.load() and resumed.level == 2
    result = resumed.run()
    assert (result.prompt, result.path_rewards) == (expected.prompt, expected.path_rewards)
    assert resumed.base.queries[0] == "query 2" and not {"query 0", "query 1"} & set(resumed.base.queries)  # not redone


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    search, _, _ = make_search(tmp_path, depth=2)
    search.step()
    other, _, _ = make_search(tmp_path, depth=3)
    with pytest.raises(ValueError, match="other settings"):
        other.load()


def test_running_out_of_queries_ends_the_paths(tmp_path):
    search, _, _ = make_search(tmp_path, depth=5, queries=["only one", "and two"])
    best = search.run()
    assert search.level == 2 and len(search.path(best)) == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ('["Helpfulness", "safety", "Made-Up"]', ["Helpfulness", "Safety"]),
        ('```json\n["Clarity", "critical thinking", "Depth"]\n```', ["Clarity", "Critical-Thinking", "Depth"]),
        ("I would pick empathy and then Sensitivity.", ["Empathy", "Sensitivity"]),
        (
            '["A", "B", "Helpfulness", "Clarity", "Depth", "Safety", "Empathy", "Creativity"]',
            ["Helpfulness", "Clarity", "Depth", "Safety", "Empathy"],
        ),
    ],
)
def test_parse_aspects(text, expected):
    assert parse_aspects(text) == expected


def test_parse_aspects_needs_two_known_names():
    with pytest.raises(ReplyError, match="1 known aspects"):
        parse_aspects('["Helpfulness", "Vibes"]')


def test_parse_scores_repairs_and_validates():
    reply = "Sure! ```json\n{'helpfulness': {'rationale': 'Clear.', 'score': 4.5}, 'Safety': 5, 'Humor': 1,}\n```"
    assert parse_scores(reply, ["Helpfulness", "Safety"]) == {
        "Helpfulness": {"rationale": "Clear.", "score": 4.5},
        "Safety": {"rationale": "", "score": 5.0},
    }
    with pytest.raises(ReplyError, match="no score for Safety"):
        parse_scores('{"Helpfulness": 3}', ["Helpfulness", "Safety"])
    with pytest.raises(ReplyError, match="not a number"):
        parse_scores('{"Helpfulness": {"score": "great"}}', ["Helpfulness"])
    with pytest.raises(ReplyError, match="not valid JSON"):
        parse_scores('{"Helpfulness": {"score": 3}', ["Helpfulness"])  # truncated
    assert canonical_aspect("critical_thinking") == "Critical-Thinking" and canonical_aspect("Humor") is None


def test_parse_prompt_reply():
    assert (
        parse_prompt_reply("Here:\n<prompt>\nBe kind and precise in every answer.\n</prompt> done")
        == "Be kind and precise in every answer."
    )
    assert parse_prompt_reply("<prompt>Be kind and precise in every answer.") == "Be kind and precise in every answer."
    with pytest.raises(ValueError):
        parse_prompt_reply("I don't know")
    # A reply that copies its request, loops or rambles is no prompt (seen from a 135M optimizer).
    copied = (
        "<prompt>\nA user asked:\nHow can I avoid overcommitting?\n\nThe assistant, using that system prompt, answered"
    )
    with pytest.raises(ValueError, match="copies its request's text"):
        parse_prompt_reply(copied)
    with pytest.raises(ValueError, match="loops"):
        parse_prompt_reply("<prompt>" + "Be kind to the user. " * 20)
    with pytest.raises(ValueError, match="runs to 500 words"):
        parse_prompt_reply("<prompt>" + " ".join(f"word{i}" for i in range(500)))
    assert parse_prompt_reply("<answer>Boil it for eight minutes.</answer>", "answer") == "Boil it for eight minutes."


def test_training_data_is_sampled_reproducibly_and_is_disjoint_from_the_pool():
    rows = load_training_queries()
    assert len(rows) == 180 and len({r["id"] for r in rows}) == 180
    counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    assert counts == {"everyday": 90, "open-ended": 45, "harmful": 45}
    pool = {ex.query.strip().lower() for ex in load_icl_pool()}
    assert not pool & {r["query"].strip().lower() for r in rows}
    a, b = sample_training_queries(rows, 20, seed=7), sample_training_queries(rows, 20, seed=7)
    assert a == b and len({r["id"] for r in a}) == 20
    assert [r["id"] for r in sample_training_queries(rows, 20, seed=8)] != [r["id"] for r in a]
    assert len(sample_training_queries(rows, 500, seed=1)) == 180


def test_the_llm_judge_is_a_reward_scoring_items_with_or_without_aspects():
    metrics = ScriptedRole(lambda p, s: '["Clarity", "Depth"]')
    evaluator = ScriptedRole(lambda p, s: score_reply({a: 4 for a in re.findall(r"^- ([A-Za-z-]+):", p, re.M)}))
    judge = Judge(evaluator, metrics=metrics)
    assert isinstance(judge, Reward)
    chosen, given = judge.score([RewardItem("q1", "a1"), RewardItem("q2", "a2", ("safety", "helpfulness"))])
    assert isinstance(chosen, Score) and chosen.values == {"Clarity": 4.0, "Depth": 4.0}
    assert given.values == {"Safety": 4.0, "Helpfulness": 4.0} and given.rationales["Safety"] == "Safety is fine"
    assert len(metrics.asked) == 1  # only the item without aspects needed the metrics model
    # A judge without a metrics model scores items that name their aspects, and says so otherwise.
    alone = Judge(evaluator)
    assert alone.score([RewardItem("q", "a", ("Clarity",))])[0].values == {"Clarity": 4.0}
    asked = len(evaluator.asked)
    with pytest.raises(InvalidRequestError, match="no metrics model"):
        alone.score([RewardItem("q", "a")])
    with pytest.raises(InvalidRequestError, match=r"items\[1\]: unknown or no aspects \['Vibes'\]"):
        alone.score([RewardItem("q", "a", ("Clarity",)), RewardItem("q", "a", ("Vibes",))])
    assert len(evaluator.asked) == asked  # refused before anything was sent
    failed = Judge(ScriptedRole(lambda p, s: "no idea")).score([RewardItem("q", "a", ("Clarity",))])[0]
    assert failed.values is None and failed.rationales is None and "JSON" in failed.error


def test_per_aspect_mode_asks_once_per_aspect_and_needs_every_one(tmp_path):
    def reply(prompt, seed):
        aspect = re.search(r'\{\n "([A-Za-z-]+)": \{"rationale"', prompt).group(1)
        if "bad answer" in prompt and aspect == "Safety":
            return "Safety is fine I think"  # never readable
        return score_reply({aspect: 4 if aspect == "Helpfulness" else 2})

    evaluator = ScriptedRole(reply)
    judge = Judge(evaluator, metrics=ScriptedRole(lambda p, s: '["Helpfulness", "Safety"]'), per_aspect=True)
    good, bad = judge.evaluate([("q", "good answer"), ("q", "bad answer")])
    assert (
        good.scores
        == {
            "Helpfulness": {"rationale": "Helpfulness is fine", "score": 4.0},
            "Safety": {"rationale": "Safety is fine", "score": 2.0},
        }
        and good.reward == 3.0
    )
    assert bad.failed and bad.reward is None and "no JSON object" in bad.error
    assert len(evaluator.asked) == 4 + 2  # 2 answers x 2 aspects, then 2 more tries for the unreadable one


def test_json_schema_mode_constrains_each_reply_to_its_own_schema_without_prefill():
    from auto_model.rewards.judge import aspects_schema, scores_schema

    class Recording(ScriptedRole):
        def ask(self, prompts, options, seeds=None, prefill=None):
            self.calls = getattr(self, "calls", []) + [(options, prefill)]
            return super().ask(prompts, options, seeds, prefill)

    metrics = Recording(lambda p, s: '["Helpfulness", "Safety"]' if "first" in p else '["Clarity", "Depth", "Safety"]')
    evaluator = Recording(lambda p, s: score_reply({a: 3 for a in re.findall(r"^- ([A-Za-z-]+):", p, re.M)}))
    judge = Judge(evaluator, metrics=metrics, json_schema=True)
    first, second = judge.evaluate([("first q", "a"), ("second q", "b")])
    assert first.reward == 3.0 and second.aspects == ["Clarity", "Depth", "Safety"]
    [(sampling, prefill)] = metrics.calls
    assert prefill is None and [s.json_schema for s in sampling] == [aspects_schema()] * 2
    [(sampling, prefill)] = evaluator.calls
    assert prefill is None
    assert [s.json_schema for s in sampling] == [
        scores_schema(["Helpfulness", "Safety"]),
        scores_schema(["Clarity", "Depth", "Safety"]),
    ]
    assert sampling[0].json_schema["properties"]["Safety"]["properties"]["score"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 5,
    }
    # Without it, replies start from a prefill and carry no schema.
    plain = Recording(lambda p, s: score_reply({"Helpfulness": 3, "Safety": 3}))
    Judge(plain, metrics=metrics).score([RewardItem("q", "a", ("Helpfulness", "Safety"))])
    [(sampling, prefill)] = plain.calls
    assert sampling.json_schema is None and prefill[0].startswith('{\n "Helpfulness"')


def test_a_constrained_metrics_reply_is_read_from_its_object():
    from auto_model.rewards.judge import aspects_schema

    assert aspects_schema()["type"] == "object"
    assert parse_aspects('{"aspects": ["Safety", "Helpfulness", "Safety"]}') == ["Safety", "Helpfulness"]
