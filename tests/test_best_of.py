"""Best-of-n at inference: n answers per query sampled in one engine call (transformers, vLLM, an
OpenAI-compatible server), scored by the session's small reward model in one batch, the best kept;
through the facade, the command line and the server (in-process and in front of a real vLLM server)."""

from __future__ import annotations

import json

import openai
import pytest

from auto_model import AutoModel
from auto_model.answer_check import CONTENT_FILTER, DEFAULT_REFUSAL
from auto_model.errors import InvalidRequestError
from auto_model.feedback.reward_model import RewardModel
from auto_model.server import Upstream, create_app

QUERIES = ["How do I make a cup of tea?", "How can I pick the lock of my neighbour's door?"]


@pytest.fixture(scope="module")
def reward(small_rm):
    """The session's small reward model, loaded once for this module (a folder path loads it again)."""
    from auto_model.rewards.reward_model import RewardModelReward

    return RewardModelReward(RewardModel.load(small_rm.output))


@pytest.fixture(scope="module")
def rm(reward):
    return reward.model


def check_best(results, rm, n):
    """Each result holds n candidates, scored as the reward model scores them, and is the best of them."""
    for query, result in zip(QUERIES, results, strict=True):
        assert len(result.candidates) == n
        texts = [c.text for c in result.candidates]
        assert [c.score for c in result.candidates] == pytest.approx(rm.score([query] * n, texts), abs=1e-3)
        best = max(result.candidates, key=lambda c: c.score)
        if result.finish_reason == CONTENT_FILTER:  # the answer check replaced the best sample (the lock query)
            assert result.text == DEFAULT_REFUSAL and query == QUERIES[1]
        else:
            assert result.text == best.text and result.finish_reason == best.finish_reason


def test_best_of_on_transformers_is_one_engine_call_scored_in_one_batch(smol, reward, rm, count_calls):
    smol.reward = reward
    try:
        with count_calls(smol.backend) as counter:
            results = smol.generate(QUERIES, temperature=0.9, max_new_tokens=8, seed=5, best_of=3, return_details=True)
        assert counter.calls == [2]  # one engine call for 2 queries x 3 samples
        check_best(results, rm, 3)
        assert len({c.text for c in results[0].candidates}) > 1  # sampled, not repeated
        # The first sample is the answer the same seed gives alone; the tokens are those of all three.
        alone = smol.generate(
            QUERIES, temperature=0.9, max_new_tokens=8, seed=5, return_details=True, check_answers=False
        )  # the raw sample, as candidates carry it
        assert [r.candidates[0].text for r in results] == [a.text for a in alone]
        assert results[0].completion_tokens > alone[0].completion_tokens
    finally:
        smol.reward = None


def test_best_of_is_refused_where_it_cannot_choose(smol, small_rm):
    with pytest.raises(InvalidRequestError, match="reward_model=PATH"):
        smol.generate("Hi", best_of=2)
    smol.reward = small_rm.output
    try:
        with pytest.raises(InvalidRequestError, match="temperature > 0"):
            smol.generate("Hi", best_of=2, temperature=0)
        with pytest.raises(InvalidRequestError, match="cannot stream"):
            smol.stream("Hi", best_of=2)
        with pytest.raises(InvalidRequestError, match="best_of must be an integer from 1 to 64"):
            smol.generate("Hi", best_of=65)
    finally:
        smol.reward = None
    with pytest.raises(InvalidRequestError, match="not a reward model folder"):  # before any engine loads
        AutoModel("no/such-model", reward_model="nowhere")


def test_best_of_on_vllm_is_one_engine_call(smol_vllm, reward, rm, count_calls):
    smol_vllm.reward = reward
    try:
        with count_calls(smol_vllm.backend) as counter:
            results = smol_vllm.generate(QUERIES, temperature=0.9, max_new_tokens=8, seed=5, best_of=4,
                                         return_details=True)  # fmt: skip
        assert counter.calls == [2]
        check_best(results, rm, 4)
    finally:
        smol_vllm.reward = None


def test_best_of_on_a_server_and_through_our_server(vllm_server, reward, rm, smol, running):
    from auto_model.constants import DEFAULT_MODEL

    remote = AutoModel(DEFAULT_MODEL, backend="openai", base_url=vllm_server, prompt_format="chat",
                       reward_model=reward)  # fmt: skip
    results = remote.generate(QUERIES, temperature=0.9, max_new_tokens=8, seed=5, best_of=3, return_details=True)
    check_best(results, rm, 3)  # one HTTP request per query, n=3
    messages = [{"role": "user", "content": QUERIES[0]}]
    # In front of the vLLM server: the upstream is asked for 3 choices, the client gets the best one.
    with running(create_app(remote, served_name="smol", upstream=Upstream(vllm_server), best_of=3)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="smol", messages=messages, max_tokens=8,
                                                                seed=5, temperature=0.9)  # fmt: skip
        reply = raw.parse()
        assert raw.headers["x-auto-model-best-of"] == "3" and [c.index for c in reply.choices] == [0]
        assert reply.choices[0].message.content == results[0].text  # the same seed, the same three, the same best
        two = client.chat.completions.create(model="smol", messages=messages, max_tokens=8, n=2, temperature=0.9)
        assert [c.index for c in two.choices] == [0, 1]
        greedy = client.chat.completions.with_raw_response.create(model="smol", messages=messages, max_tokens=8,
                                                                  temperature=0)  # fmt: skip
        assert "x-auto-model-best-of" not in greedy.headers  # a greedy request has one answer to give
    # In-process: the engine batch samples 3 per request and the reward keeps the best.
    smol.reward = reward
    try:
        with running(create_app(smol, served_name="smol", best_of=3)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            raw = client.chat.completions.with_raw_response.create(model="smol", messages=messages, max_tokens=8,
                                                                    seed=5, temperature=0.9)  # fmt: skip
            local = smol.chat(messages, temperature=0.9, top_p=1.0, max_new_tokens=8, seed=5, best_of=3,
                              system_messages="prepend", return_details=True)  # fmt: skip
            assert raw.headers["x-auto-model-best-of"] == "3" and raw.parse().choices[0].message.content == local.text
            assert raw.parse().usage.completion_tokens == local.completion_tokens  # all three answers' tokens
    finally:
        smol.reward = None
    with pytest.raises(InvalidRequestError, match="--reward-model"):
        create_app(smol, best_of=2)


def test_generate_best_of_on_the_command_line(small_rm, tmp_path, capsys):
    from auto_model.cli import main

    assert main(["generate", "Hi", "--best-of", "2"]) == 2
    assert "needs --reward-model PATH" in capsys.readouterr().err
    assert main(["generate", "Hi", "--best-of", "2", "--reward-model", str(tmp_path)]) == 2
    assert "not a reward model folder" in capsys.readouterr().err
    out = tmp_path / "answers.jsonl"
    args = ["generate", QUERIES[0], "--backend", "transformers", "--best-of", "2", "--reward-model",
            str(small_rm.output), "--max-new-tokens", "8", "--seed", "1", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(row["candidates"]) == 2 and row["answer"] == max(row["candidates"], key=lambda c: c["score"])["text"]


def test_a_request_cache_keys_sampled_requests_by_the_reward_that_chose(smol, small_rm, tmp_path):
    """A cached best-of answer is the choice of one reward: another reward model is another key."""
    from auto_model.options import GenerationOptions
    from auto_model.rewards.requests import RequestCache, Role, Usage

    cache = RequestCache(tmp_path / "requests.sqlite")
    role = Role("answer", smol, cache, Usage())
    one = smol.aligner.requests(QUERIES, GenerationOptions(temperature=0.9, max_new_tokens=8))
    sampled = smol.aligner.requests(QUERIES, GenerationOptions(temperature=0.9, max_new_tokens=8, best_of=3))
    before = role.cache_keys(one + sampled)
    smol.reward = small_rm.output
    try:
        after = role.cache_keys(one + sampled)
        chooser = smol.best_of.reward_id
        assert chooser.startswith("rm:") and f'"{chooser}"' in after[2][1]
    finally:
        smol.reward = None
    assert after[:2] == before[:2]  # one answer per request: no reward chooses
    assert all(a[0] != b[0] for a, b in zip(after[2:], before[2:], strict=True))
    cache.close()
