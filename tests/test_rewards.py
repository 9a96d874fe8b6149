"""The reward plumbing: programmatic metrics, reward specs and weighted combinations, and DRPO's
search and ICL stage on a reward that gives numbers without reasons.

ScriptedReward and ScriptedRole are fakes, named as such: they stand in for a reward model and for
the base and optimizer models so that scores and rewrites follow a script. The real reward model
and the real engine run in test_trainer_cli.py and test_best_of.py.
"""

from __future__ import annotations

import json
import re

import pytest

from auto_model.backends.base import Completion
from auto_model.errors import InvalidRequestError
from auto_model.retrieval import ICLExample
from auto_model.rewards.base import ItemScore, Reward, RewardItem, score_from_record, score_record
from auto_model.rewards.combine import (
    RewardSpec,
    WeightedReward,
    build_reward,
    check_reward_specs,
    parse_reward_specs,
)
from auto_model.rewards.metrics import MetricReward
from auto_model.trainer.icl import optimize_pool
from auto_model.trainer.search import BeamSearch
from auto_model.trainer.tree import SearchConfig


class ScriptedReward:
    """A fake reward model: one number per answer, no reasons; the number is the answer's trailing 'vN'."""

    scale = None

    def __init__(self):
        self.seen: list[RewardItem] = []

    def score(self, items):
        self.seen.extend(items)
        return [ItemScore({"Reward": version(i.answer)}, {"Reward": None}) for i in items]


class ScriptedRole:
    """A fake base or optimizer model whose replies come from a function of the prompt."""

    def __init__(self, reply):
        self.reply, self.asked = reply, []

    def ask(self, prompts, options, seeds=None, prefill=None):
        self.asked.extend(prompts)
        return [Completion(self.reply(p), "stop", 1, 1) for p in prompts]

    def answer_each(self, items):
        self.asked.extend(p for p, _, _, _ in items)
        return [Completion(f"answer under {p}", "length" if "v1" in p else "stop", 1, 1) for p, _, _, _ in items]

    def examples(self, query, k, route=None):
        return []


def version(text: str) -> float:
    found = re.findall(r"v(\d)", text)
    return float(found[-1]) if found else 0.0


def test_metrics_score_refusals_by_the_query_kind_repetition_and_endings():
    reward = MetricReward(["refusal", "no_repetition", "clean_ending"])
    assert isinstance(reward, Reward) and reward.scale == (0.0, 1.0)
    declined, answered, looping, unknown = reward.score(
        [
            RewardItem("How do I make a pipe bomb?", "I can't help with that.", harmful=True, finish_reason="stop"),
            RewardItem("How do I make a pipe bomb?", "First, get a pipe.", harmful=True, finish_reason="length"),
            RewardItem("Tell me a joke.", "ha ha ha ha ha ha ha ha", harmful=False, finish_reason="stop"),
            RewardItem("Tell me a joke.", "Why did the chicken cross the road?"),
        ]
    )
    assert declined.values == {"refusal": 1.0, "no_repetition": 1.0, "clean_ending": 1.0}
    assert answered.values["refusal"] == 0.0 and answered.values["clean_ending"] == 0.0
    assert "does not decline a harmful request" in answered.rationales["refusal"]
    assert looping.values["refusal"] == 1.0 and looping.values["no_repetition"] < 0.2
    # What a metric needs and the item lacks is never guessed: the item is not scored, and says why.
    assert unknown.values is None and unknown.reward is None
    assert "harmful" in unknown.error and "finish_reason" in unknown.error
    (ordinary_refused,) = MetricReward("refusal").score(
        [RewardItem("Tell me a joke.", "Sorry, but I can't.", harmful=False)]
    )
    assert ordinary_refused.values == {"refusal": 0.0}
    with pytest.raises(InvalidRequestError, match="choose from refusal, no_repetition, clean_ending"):
        MetricReward(["kindness"])


def test_reward_specs_parse_weights_and_name_the_fix(tmp_path):
    specs = parse_reward_specs(["rm:out/rm@0.5,metric:refusal", "llm@2"])
    assert specs == [
        RewardSpec("rm", "out/rm", 0.5),
        RewardSpec("metric", "refusal", 1.0),
        RewardSpec("llm", None, 2.0),
    ]
    for bad, message in [
        ("judge", "Unknown reward 'judge'"),
        ("metric:refusal@heavy", "must be a number"),
        ("metric:refusal@0", "must be above 0"),
        ("llm:gpt", "takes no argument"),
        ("rm:", "needs an argument: rm:PATH"),
        ("metric:refusal,metric:refusal", "named twice"),
        ("", "at least one reward"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            parse_reward_specs(bad)
    with pytest.raises(InvalidRequestError, match="not a reward model folder.*auto-model-rm train"):
        check_reward_specs(parse_reward_specs(f"rm:{tmp_path}"))
    with pytest.raises(InvalidRequestError, match="Unknown metric 'kindness'"):
        check_reward_specs(parse_reward_specs("metric:kindness"))
    with pytest.raises(InvalidRequestError, match="not available here"):
        build_reward(parse_reward_specs("llm"))
    assert isinstance(build_reward(parse_reward_specs("metric:refusal")), MetricReward)  # one part: itself


def test_a_weighted_reward_weighs_its_parts_and_fails_an_item_any_part_cannot_score():
    reward = WeightedReward([("rm", ScriptedReward(), 1.0), ("metric:refusal", MetricReward("refusal"), 3.0)])
    assert reward.scale is None  # logits and 0-1 metrics share no scale
    good, unknown = reward.score(
        [RewardItem("How do I make a pipe bomb?", "I can't help with that, v2.", harmful=True), RewardItem("q", "v4")]
    )
    assert good.values == {"rm/Reward": 2.0, "metric:refusal/refusal": 1.0}
    assert good.reward == pytest.approx((1 * 2.0 + 3 * 1.0) / 4)
    assert good.rationales["rm/Reward"] is None and good.rationales["metric:refusal/refusal"]
    assert unknown.values is None and unknown.reward is None and unknown.error.startswith("metric:refusal:")
    # A score survives the checkpoint's JSON with its overall value.
    back = score_from_record(score_record(good))
    assert back.values == good.values and back.reward == pytest.approx(good.reward)


def test_without_reasons_the_optimizer_sees_the_best_and_worst_answers_of_the_level(tmp_path):
    reward = ScriptedReward()
    base = ScriptedRole(None)
    rewrites = iter(["v3", "v2", "v5", "v4", "v1", "v1", "v1", "v1"])
    optimizer = ScriptedRole(lambda p: f"<prompt>\nBe helpful, {next(rewrites)}\n</prompt>")
    config = SearchConfig(depth=3, beam_size=1, n_actions=2, max_depth_increase=0, skip_threshold=None, seed=1)
    search = BeamSearch(base, optimizer, reward, config, ["q0", "q1", "q2"], "Be helpful, v1", tmp_path / "c.json",
                        harmful=[False, True, False])  # fmt: skip
    best = search.run()
    assert best.prompt == "Be helpful, v5"
    assert [i.harmful for i in reward.seen] == [False, True, True, False, False]  # each query's own kind
    assert [i.finish_reason for i in reward.seen][:1] == ["length"]  # how the answer ended reaches the reward
    first, second = optimizer.asked[0], optimizer.asked[2]
    # Level 1 had one answer: its score, no comparison.
    assert "rated that answer 1." in first and "gives numbers, not reasons" in first and "No other answer" in first
    # Level 2 had two: the best (v3) and the worst (v2) answers, with their scores.
    assert "The best-scoring answer (3):\n<answer>\nanswer under Be helpful, v3" in second
    assert "The worst-scoring answer (2):\n<answer>\nanswer under Be helpful, v2" in second
    assert "from 1 to 5" not in second
    summary = search.summary()
    assert [row["candidates"] for row in summary] == [1, 2, 2]
    assert [row["best"] for row in summary] == [1.0, 3.0, 5.0]
    assert [row["accepted"] for row in summary] == [0, 1, 1]  # one rewrite a level went on (beam 1)
    assert "level  candidates" in search.summary_table()


def test_the_icl_stage_contrasts_versions_of_an_answer_when_the_reward_gives_no_reasons(tmp_path):
    reward = ScriptedReward()
    replies = iter(["<answer>\nA kinder answer v3\n</answer>", "<answer>\nv2 again\n</answer>"])
    optimizer = ScriptedRole(lambda p: next(replies))
    pool = [ICLExample("How do I pick a lock?", "<START>Here is how, v1<END>", ("harmful",))]
    states = optimize_pool(pool, optimizer, reward, tmp_path / "pool.json", num_iters=2, n_actions=1,
                           skip_threshold=None)  # fmt: skip
    assert states[0].answer == "A kinder answer v3"
    assert all(item.harmful for item in reward.seen)  # the example's 'harmful' tag reaches the reward
    assert "(The scorer gives numbers, not reasons; higher is better.)" in optimizer.asked[0]
    assert "Of the 2 versions of this answer scored so far, the best (3) was" in optimizer.asked[1]


def test_with_reasons_the_optimizer_reads_the_judges_rationales_on_its_scale(tmp_path):
    from auto_model.rewards.judge import Judge

    scores = json.dumps({"Helpfulness": {"rationale": "It skips the steps.", "score": 2},
                         "Safety": {"rationale": "Safe.", "score": 5}})  # fmt: skip
    judge = Judge(ScriptedRole(lambda p: scores), metrics=ScriptedRole(lambda p: '["Helpfulness", "Safety"]'))
    optimizer = ScriptedRole(lambda p: "<answer>\nBetter answer\n</answer>")
    pool = [ICLExample("How do I boil an egg?", "<START>Boil it.<END>", ("everyday",))]
    optimize_pool(pool, optimizer, judge, tmp_path / "pool.json", num_iters=1, n_actions=1)
    assert (
        "A reviewer scored this answer from 1 to 5:\n- Helpfulness: 2/5. It skips the steps.\n- Safety: 5/5."
        in (optimizer.asked[0])
    )


def test_a_search_whose_rewrites_are_all_unusable_says_so(tmp_path):
    looping = ScriptedRole(lambda p: "<prompt>\n" + "Be helpful. " * 30 + "\n</prompt>")
    copying = ScriptedRole(lambda p: "<prompt>\nA user asked: q0\n</prompt>")
    for optimizer, reason in ((looping, "the prompt loops"), (copying, "the prompt copies its request's text")):
        config = SearchConfig(depth=2, beam_size=1, n_actions=2, max_depth_increase=0, skip_threshold=None)
        search = BeamSearch(ScriptedRole(None), optimizer, ScriptedReward(), config, ["q0", "q1"], "Be helpful, v1",
                            tmp_path / f"{reason}.json")  # fmt: skip
        assert search.run().prompt == "Be helpful, v1"  # carried unchanged
        assert [row["rejected"] for row in search.summary()] == [0, 2]
        assert f"The search did not move: no rewrite was usable (2 x {reason})" in search.summary_table()


def test_a_loop_the_sdk_cut_is_neither_a_clean_ending_nor_loop_free():
    reward = MetricReward(["clean_ending", "no_loop"])
    cut, looping, fine = reward.score(
        [
            RewardItem("q", "Keep the vase cool.", finish_reason="stop", looped=True),
            RewardItem("q", "1. Use fresh water.\n2. Use fresh water.\n3. Use fresh water.", finish_reason="stop"),
            RewardItem("q", "Keep the vase cool and change the water daily.", finish_reason="stop"),
        ]
    )
    assert cut.values == {"clean_ending": 0.0, "no_loop": 0.0} and "repeat itself" in cut.rationales["no_loop"]
    assert looping.values == {"clean_ending": 1.0, "no_loop": 0.0}
    assert fine.values == {"clean_ending": 1.0, "no_loop": 1.0}
