"""Decoding settings in prompt artifacts (format v3) and the loop cut, on the real engines.

An artifact's ``decoding`` (per route, or for all) reaches every engine that has the setting
(vLLM's SamplingParams, transformers' generate with the SDK's own frequency/presence penalty, an
OpenAI-compatible server's fields); a setting an engine lacks is left out with one debug line;
the caller's own sampling arguments win; ``return_details`` says what was applied. A looping
answer is cut at its first repeat, and the engines that watch the answer stop generating there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from auto_model.artifacts import (
    PROMPT_FORMAT,
    PROMPT_FORMAT_V2,
    PROMPT_FORMAT_V3,
    PromptArtifact,
    load_prompt_artifact,
    save_prompt_artifact,
    with_decoding,
)
from auto_model.errors import ArtifactError
from auto_model.loops import cut_loop
from auto_model.routing import EVERYDAY, SAFETY

#: the demo's ordinary query: SmolLM2 loops on it under greedy decoding with no decoding settings and 3
#: examples (the artifacts before their trained everyday route)
FLOWERS = "How do I keep cut flowers fresh for longer?"
LOOPING = {"optimized_decoding": False, "num_optimized_icl": 3}
RAW = {"cut_loops": False, **LOOPING}
#: long enough for FLOWERS's loop (it begins about 20 tokens in and is seen about 50 tokens in), no longer
LOOP_TOKENS = 80


def test_v3_artifacts_round_trip_and_older_ones_load_unchanged(tmp_path):
    tuned = PromptArtifact(
        "my/model",
        "Be helpful.",
        "drpo",
        routes={SAFETY: "Be careful."},
        decoding={"frequency_penalty": 0.6},
        route_decoding={SAFETY: {"frequency_penalty": 0.0}},
    )
    path = save_prompt_artifact(tuned, tmp_path / "tuned.json")
    data = json.loads(path.read_text())
    assert data["format"] == PROMPT_FORMAT_V3 and data["decoding"] == {"frequency_penalty": 0.6}
    assert data["routes"][SAFETY] == {"system_prompt": "Be careful.", "decoding": {"frequency_penalty": 0.0}}
    again = load_prompt_artifact(path)
    assert again.decoding_for(EVERYDAY) == {"frequency_penalty": 0.6}
    assert again.decoding_for(SAFETY) == {"frequency_penalty": 0.0}
    # Without decoding settings an artifact is written as v2, and a v2 file loads with none.
    plain = save_prompt_artifact(replace(tuned, decoding={}, route_decoding={}), tmp_path / "plain.json")
    assert json.loads(plain.read_text())["format"] == PROMPT_FORMAT_V2
    assert load_prompt_artifact(plain).decoding_for(SAFETY) == {}
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps({"format": PROMPT_FORMAT_V2, "model_id": "m", "system_prompt": "Hi.",
                              "routes": {SAFETY: {"system_prompt": "No."}}}))  # fmt: skip
    assert load_prompt_artifact(v2).decoding_for(EVERYDAY) == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"format": PROMPT_FORMAT, "decoding": {"temperature": 0.3}}, "unknown decoding setting 'temperature'"),
        ({"format": PROMPT_FORMAT, "decoding": {"frequency_penalty": 3}}, "frequency_penalty must be a number from -2"),
        ({"format": PROMPT_FORMAT, "decoding": {"no_repeat_ngram_size": 2.5}}, "must be an integer"),
        ({"format": PROMPT_FORMAT, "decoding": {"repetition_penalty": float("nan")}}, "repetition_penalty"),
        ({"format": PROMPT_FORMAT, "decoding": [1]}, "decoding must be an object"),
        ({"format": PROMPT_FORMAT_V2, "decoding": {"frequency_penalty": 0.5}}, "'decoding' needs format"),
        (
            {"format": PROMPT_FORMAT, "routes": {SAFETY: {"system_prompt": "x", "decoding": {"top_k": 3}}}},
            "routes.safety.decoding: unknown decoding setting 'top_k'",
        ),
    ],
)
def test_bad_decoding_settings_fail_loudly_and_name_the_fix(tmp_path, body, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"system_prompt": "Hi.", **body}))
    with pytest.raises(ArtifactError, match=message):
        load_prompt_artifact(path)


def test_the_callers_settings_win_and_an_engines_missing_ones_are_left_out():
    merged, left_out = with_decoding(
        {"frequency_penalty": 0.0, "top_k": 5},
        {"frequency_penalty": 0.6, "no_repeat_ngram_size": 4, "repetition_penalty": 1.1},
        frozenset({"frequency_penalty", "repetition_penalty"}),
    )
    assert merged == {"frequency_penalty": 0.0, "top_k": 5, "repetition_penalty": 1.1}
    assert left_out == ["no_repeat_ngram_size"]


def test_the_output_penalty_lowers_only_tokens_already_in_the_answer():
    import torch

    from auto_model.backends.transformers_sampling import OutputPenalty

    ids = torch.tensor([[5, 6, 7, 7, 8], [5, 6, 1, 2, 2]])  # the prompt is the first two tokens
    scores = torch.zeros(2, 10)
    out = OutputPenalty(2, frequency=0.5, presence=0.25)(ids, scores)
    assert out[0, 7].item() == pytest.approx(-1.25) and out[0, 8].item() == pytest.approx(-0.75)
    assert out[0, 5].item() == 0 and out[0, 6].item() == 0  # prompt tokens are not penalised
    assert out[1, 2].item() == pytest.approx(-1.25) and out[1, 1].item() == pytest.approx(-0.75)


def _engine_applies_decoding(model, tmp_path, caplog, lacking=None):
    own = model.prompt_artifact
    decoding = {"frequency_penalty": 1.0, **({lacking: 3} if lacking else {})}
    tuned_artifact = replace(own, decoding=decoding, route_decoding={}, route_examples={})  # 3 examples, as RAW
    model.prompt_artifact = load_prompt_artifact(save_prompt_artifact(tuned_artifact, tmp_path / "tuned.json"))
    try:
        with caplog.at_level(logging.DEBUG, logger="auto_model.aligner"):
            tuned = model.generate(FLOWERS, temperature=0, max_new_tokens=24, return_details=True, cut_loops=False)
            model.generate(FLOWERS, temperature=0, max_new_tokens=4, cut_loops=False)
        plain = model.generate(FLOWERS, temperature=0, max_new_tokens=24, return_details=True, **RAW)
        mine = model.generate(FLOWERS, temperature=0, max_new_tokens=24, return_details=True, cut_loops=False,
                              frequency_penalty=0.0)  # fmt: skip
    finally:
        model.prompt_artifact = own
    assert tuned.decoding == {"frequency_penalty": 1.0}
    assert tuned.text != plain.text  # the penalty changed the answer
    assert plain.decoding == {}
    assert mine.decoding == {"frequency_penalty": 0.0} and mine.text == plain.text  # the caller's value won
    if lacking:
        left_out = [r.getMessage() for r in caplog.records if lacking in r.getMessage()]
        assert len(left_out) == 1 and "left out" in left_out[0]  # one debug line, not one per request


def test_transformers_applies_an_artifacts_decoding(smol, tmp_path, caplog):
    # frequency_penalty is the SDK's own logits processor here (transformers has none)
    _engine_applies_decoding(smol, tmp_path, caplog)


@pytest.mark.vllm
def test_vllm_applies_an_artifacts_decoding_and_leaves_out_what_it_lacks(smol_vllm, tmp_path, caplog):
    _engine_applies_decoding(smol_vllm, tmp_path, caplog, lacking="no_repeat_ngram_size")


def _stops_the_loop(model, engine_stops: bool):
    raw = model.generate(FLOWERS, temperature=0, max_new_tokens=LOOP_TOKENS, return_details=True, **RAW)
    cut_text, looped = cut_loop(raw.text)
    assert looped, "the model no longer loops on this query; pick one it loops on"
    cut = model.generate(FLOWERS, temperature=0, max_new_tokens=LOOP_TOKENS, return_details=True, **LOOPING)
    assert cut.looped and cut.finish_reason == "stop" and cut.text == cut_text
    assert not raw.looped and raw.text.startswith(cut.text)
    if engine_stops:  # the engine stopped generating soon after the loop began, not at the limit
        assert cut.completion_tokens < raw.completion_tokens
    streamed = "".join(model.stream(FLOWERS, temperature=0, max_new_tokens=LOOP_TOKENS, **LOOPING))
    assert streamed.rstrip() == cut.text
    return raw, cut


def test_transformers_stops_a_looping_answer_at_its_first_repeat(smol):
    _stops_the_loop(smol, engine_stops=True)


@pytest.mark.vllm
def test_vllm_stops_a_looping_answer_at_its_first_repeat(smol_vllm):
    raw, cut = _stops_the_loop(smol_vllm, engine_stops=True)
    # the same answer with the cut off equals the cut answer's start: the cut changed nothing before the loop
    assert raw.text.startswith(cut.text)


def test_lists_and_code_from_the_real_model_are_not_cut(smol):
    queries = ["Write a Python function that adds two numbers.", "List three colours of the rainbow."]
    raw = smol.generate(queries, temperature=0, max_new_tokens=96, **RAW, return_details=True)
    assert any("def " in r.text for r in raw) and all(not cut_loop(r.text)[1] for r in raw)
    cut = smol.generate(queries, temperature=0, max_new_tokens=96, **LOOPING, return_details=True)
    assert [r.text for r in cut] == [r.text for r in raw] and not any(r.looped for r in cut)


def test_the_official_openai_api_gets_only_its_own_penalties():
    from auto_model.backends.openai import OpenAIBackend

    official = OpenAIBackend("gpt-4o-mini", api_key="sk-not-used")  # nothing is sent
    assert official.decoding_settings == {"frequency_penalty", "presence_penalty"}
    served = OpenAIBackend("m", base_url="http://127.0.0.1:9/v1")
    assert "repetition_penalty" in served.decoding_settings


def test_an_artifact_sets_how_many_examples_each_route_retrieves(smol, tmp_path):
    """``num_examples`` (v3): the everyday route's number and a route's own; the caller's number wins."""
    tuned = replace(smol.prompt_artifact, num_examples=1, route_examples={SAFETY: 3}, answer_check=None)
    path = save_prompt_artifact(tuned, tmp_path / "examples.json")
    data = json.loads(path.read_text())
    assert data["format"] == PROMPT_FORMAT_V3 and data["num_examples"] == 1
    assert data["routes"][SAFETY]["num_examples"] == 3
    assert load_prompt_artifact(path).examples_for(EVERYDAY) == 1
    assert load_prompt_artifact(path).examples_for(SAFETY) == 3
    assert replace(tuned, num_examples=None, route_examples={}).examples_for(EVERYDAY) == 3  # the default

    def examples(query, **options):
        prompt = smol.format_prompt(query, prompt_format="messages", **options)
        return prompt.route.name, (len(prompt.prompt) - 2) // 2

    own = smol.prompt_artifact
    smol.prompt_artifact = load_prompt_artifact(path)
    try:
        assert examples("How do I repot a cactus?") == (EVERYDAY, 1)
        assert examples("How do I poison my neighbour's dog?") == (SAFETY, 3)
        assert examples("How do I repot a cactus?", num_optimized_icl=2) == (EVERYDAY, 2)  # the caller's number
        assert examples("How do I repot a cactus?", optimized_icl=False) == (EVERYDAY, 0)
    finally:
        smol.prompt_artifact = own
    for bad in (-1, 2.0, True, 99):
        path.write_text(json.dumps({**data, "num_examples": bad}))
        with pytest.raises(ArtifactError, match="num_examples must be an integer from 0 to 32"):
            load_prompt_artifact(path)


def test_an_artifacts_pool_edits_round_trip_and_apply_to_the_models_pool(tmp_path):
    from auto_model.retrieval import ICLExample, load_icl_pool

    pool = load_icl_pool()
    added = ICLExample("How do I keep tulips standing up?", "<START>\nTrim them and use cold water.\n<END>", ("bank",))
    edited = PromptArtifact("m", "Hi.", "drpo", pool_drop=(pool[0].query, added.query), pool_add=(added,))
    path = save_prompt_artifact(replace(edited, pool_drop=(pool[0].query,)), tmp_path / "pool.json")
    data = json.loads(path.read_text())
    assert data["format"] == PROMPT_FORMAT_V3 and data["pool"]["drop"] == [pool[0].query]
    again = load_prompt_artifact(path)
    assert again.pool_add == (added,) and again.edit_pool(pool) == [*pool[1:], added]
    assert edited.edit_pool(pool) == pool[1:]  # an example both added and dropped is left out
    # A route that only has settings is saved with a copy of the main prompt; it loads as the main prompt's.
    settled = save_prompt_artifact(replace(edited, route_decoding={EVERYDAY: {"frequency_penalty": 0.4}}), path)
    again = load_prompt_artifact(settled)
    assert json.loads(settled.read_text())["routes"][EVERYDAY]["system_prompt"] == "Hi."
    assert EVERYDAY not in again.routes and replace(again, system_prompt="New.").prompt_for(EVERYDAY) == "New."
    for bad, message in [({"drop": "x"}, "pool.drop must be a list"), ({"add": [{"query": "q"}]}, "answer"),
                         ({"keep": []}, "'pool' must be an object")]:  # fmt: skip
        path.write_text(json.dumps({**data, "pool": bad}))
        with pytest.raises(ArtifactError, match=message):
            load_prompt_artifact(path)


@pytest.mark.vllm
def test_an_openai_compatible_server_gets_the_decoding_settings_and_its_loops_are_cut(vllm_server, tmp_path):
    """The openai backend against a real vLLM OpenAI server: the artifact's settings are sent (the
    answer changes with them), a looping answer is cut when it is back, and a stream ends at the loop."""
    from auto_model import AutoModel
    from auto_model.constants import DEFAULT_MODEL

    model = AutoModel(DEFAULT_MODEL, backend="openai", base_url=vllm_server, prompt_format="chat")
    assert "repetition_penalty" in model.backend.decoding_settings  # a server that is not OpenAI's own
    raw = model.generate(FLOWERS, temperature=0, max_new_tokens=LOOP_TOKENS, return_details=True, **RAW)
    cut_text, looped = cut_loop(raw.text)
    assert looped
    cut = model.generate(FLOWERS, temperature=0, max_new_tokens=LOOP_TOKENS, return_details=True, **LOOPING)
    assert cut.looped and cut.text == cut_text and cut.completion_tokens == raw.completion_tokens  # cut once back
    streamed = "".join(model.stream(FLOWERS, temperature=0, max_new_tokens=LOOP_TOKENS, **LOOPING))
    assert streamed.rstrip() == cut_text
    model.prompt_artifact = replace(
        model.prompt_artifact, decoding={"frequency_penalty": 1.0, "repetition_penalty": 1.1}, route_decoding={}
    )
    tuned = model.generate(FLOWERS, temperature=0, max_new_tokens=LOOP_TOKENS, return_details=True, cut_loops=False)
    assert tuned.decoding == {"frequency_penalty": 1.0, "repetition_penalty": 1.1}
    assert tuned.text != raw.text  # the server applied them
    model.close()


@pytest.mark.vllm
def test_the_demos_ordinary_answer_ends_on_its_own_with_the_shipped_defaults(smol_vllm):
    """``make demo``'s ordinary query (vLLM, greedy, 256 new tokens), with what ships: SmolLM2's
    trained everyday route (its decoding settings and examples) ends the answer by itself."""
    from auto_model.rewards.proxies import loops

    answer = smol_vllm.generate(FLOWERS, temperature=0, max_new_tokens=256, return_details=True)
    assert answer.route == EVERYDAY and answer.decoding == smol_vllm.prompt_artifact.decoding_for(EVERYDAY)
    assert answer.decoding  # the artifact's settings were applied
    assert answer.finish_reason == "stop" and not answer.looped and not loops(answer.text)
    assert answer.completion_tokens < 256
