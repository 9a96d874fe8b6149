"""The openai backend against a real vLLM OpenAI-compatible server on 127.0.0.1 (SmolLM2, float32).

Greedy answers through the server must equal the offline vLLM engine's answers to the same
assembled prompts: the backend adds nothing and loses nothing on the way.
"""

from __future__ import annotations

import json
import time

import pytest

from auto_model import AutoModel
from auto_model.backends import GenerationRequest, SamplingParams
from auto_model.constants import DEFAULT_MODEL
from auto_model.errors import GenerationError
from tests.test_vllm_backend import QUERIES

pytestmark = pytest.mark.vllm

GREEDY = dict(temperature=0, max_new_tokens=24)


@pytest.fixture(scope="module")
def served(vllm_server):
    model = AutoModel(DEFAULT_MODEL, backend="openai", base_url=vllm_server, max_concurrency=8)
    yield model
    model.close()


def test_chat_completions_match_the_offline_engine(served, smol_vllm):
    assert served.backend_name == "openai" and served.backend.prompt_style == "chat"
    prompt = served.format_prompt(QUERIES[1]).prompt
    system = served.prompt_artifact.prompt_for(served.route(QUERIES[1]).name)
    assert isinstance(prompt, list) and prompt[0] == {"role": "system", "content": system}
    remote = served.generate(QUERIES[1], return_details=True, **GREEDY)
    local = smol_vllm.generate(QUERIES[1], return_details=True, **GREEDY)
    assert remote.text == local.text and remote.text.lower().startswith("sorry")
    # The server rendered the same messages with the same template: the same prompt, token for token.
    assert remote.prompt_tokens == local.prompt_tokens
    assert (remote.finish_reason, remote.completion_tokens) == (local.finish_reason, local.completion_tokens)


def test_base_completions_match_the_offline_engine(vllm_server, smol_vllm):
    base = AutoModel(DEFAULT_MODEL, backend="openai", base_url=vllm_server, prompt_format="base")
    assert base.backend.prompt_style == "base"
    prompt = base.format_prompt("Name three prime numbers.", num_optimized_icl=2)
    assert isinstance(prompt.prompt, str) and prompt.prompt.endswith("# Answer:\n<START>\n")
    remote = base.generate("Name three prime numbers.", num_optimized_icl=2, return_details=True, **GREEDY)
    settings = base.aligner.decoding_for(prompt.route.name)  # the route's decoding settings, which the server got too
    local = smol_vllm.backend.generate(
        [
            GenerationRequest(
                prompt.prompt, SamplingParams(temperature=0, max_new_tokens=24, stop=prompt.stop, extra=settings)
            )
        ]
    )[0]
    assert remote.text == local.text.strip() and remote.text
    assert remote.prompt_tokens == local.prompt_tokens


def test_streaming_joins_to_the_greedy_answer(served):
    query = "Give me a tip for sleeping better."
    unchecked = {"temperature": 0, "max_new_tokens": 32, "check_answers": False}  # token by token
    chunks = list(served.stream(query, **unchecked))
    assert len(chunks) > 3  # really streamed, token by token
    assert "".join(chunks).strip() == served.generate(query, **unchecked)
    chat_chunks = list(served.chat([{"role": "user", "content": query}], stream=True, **unchecked))
    assert "".join(chat_chunks) == "".join(chunks)
    # Checked (the default), the answer comes in checked windows and joins to the same answer.
    checked = list(served.stream(query, temperature=0, max_new_tokens=32))
    assert "".join(checked).strip() == served.generate(query, temperature=0, max_new_tokens=32)


def test_a_batch_of_32_concurrently_matches_the_offline_engine(served, smol_vllm):
    queries = QUERIES * 2
    t0 = time.perf_counter()
    remote = served.generate(queries, temperature=0, max_new_tokens=16, return_details=True)
    wall = time.perf_counter() - t0
    local = smol_vllm.generate(queries, temperature=0, max_new_tokens=16)
    assert [r.text for r in remote] == local
    # Requests overlapped: their latencies add up to well over the batch's wall time.
    assert sum(r.latency_s for r in remote) > 2 * wall


def test_multi_turn_chat_matches_the_offline_engine(served, smol_vllm):
    conversation = [
        {"role": "user", "content": "My name is Ann."},
        {"role": "assistant", "content": "Nice to meet you, Ann!"},
        {"role": "user", "content": "What is the capital of Japan?"},
    ]
    assert served.chat(conversation, **GREEDY) == smol_vllm.chat(conversation, **GREEDY)


def test_server_specific_sampling_arguments_reach_the_server(served):
    # vLLM's own extensions (here top_k and min_tokens) go into the request body unchanged.
    answer = served.generate(
        "Name a colour.", temperature=0.8, top_k=1, min_tokens=12, max_new_tokens=12, return_details=True
    )
    assert answer.completion_tokens == 12  # min_tokens held the answer to exactly 12 tokens
    greedy = served.generate("Name a colour.", temperature=0, max_new_tokens=12)
    assert answer.text == greedy or greedy.startswith(answer.text) or answer.text.startswith(greedy)
    # And an argument the server rejects is its typed error, naming the status.
    with pytest.raises(GenerationError, match="400"):
        served.generate("Name a colour.", max_new_tokens=4, min_tokens=-3)


def test_json_schema_reaches_the_server_as_response_format(served):
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["city", "country"],
        "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}},
    }
    text = served.generate("Name a city and its country.", temperature=0, max_new_tokens=60, json_schema=schema)
    data = json.loads(text)
    assert sorted(data) == ["city", "country"] and all(isinstance(v, str) and len(v) <= 40 for v in data.values())


def test_streams_carry_server_extensions_and_json_schema(served):
    # The streaming path goes through the client's typed method: what it does not know travels in the body.
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["colour"],
        "properties": {"colour": {"type": "string", "maxLength": 20}},
    }
    streamed = "".join(served.stream("Name a colour.", temperature=0, max_new_tokens=30, json_schema=schema))
    assert list(json.loads(streamed)) == ["colour"]
    assert streamed.strip() == served.generate("Name a colour.", temperature=0, max_new_tokens=30, json_schema=schema)
    pieces = list(served.stream("Name a colour.", temperature=0.8, top_k=1, min_tokens=12, max_new_tokens=12))
    assert "".join(pieces).strip()
    with pytest.raises(GenerationError, match="400"):
        list(served.stream("Name a colour.", max_new_tokens=4, min_tokens=-3))


def test_several_base_urls_are_replicas_and_a_server_that_is_gone_hands_its_requests_over(vllm_server, smol_vllm):
    """Two replicas: the real server and a port nothing listens on (a server that went away). Every
    request is answered by the live one, in order, and the figures say which replica did what."""
    import socket

    with socket.socket() as s:  # a free port, closed again: connections to it are refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    model = AutoModel(DEFAULT_MODEL, base_url=f"{dead},{vllm_server}", max_retries=0)
    try:
        assert model.generate(QUERIES, temperature=0, max_new_tokens=16) == smol_vllm.generate(
            QUERIES, temperature=0, max_new_tokens=16
        )
        gone, live = model.replica_stats()
        assert (gone["alive"], gone["requests"]) == (False, 0) and gone["name"] == dead
        assert live["alive"] and live["requests"] == len(QUERIES) and live["tokens_per_s"] > 0
    finally:
        model.close()
