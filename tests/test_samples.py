"""One answer per request: arguments asking an engine for several are refused, never half-read.

A result holds one answer. Before this check, ``n=2`` reached vLLM and the OpenAI server and only the
first answer was read; ``num_return_sequences=2`` on transformers returned rows that no longer lined
up with the batch's requests.
"""

from __future__ import annotations

import pytest

from auto_model import AutoModel, GenerationOptions, InvalidRequestError
from auto_model.backends import GenerationRequest, SamplingParams

ARGUMENTS = [{"n": 2}, {"best_of": 3}, {"num_return_sequences": 2}]


@pytest.mark.parametrize("extra", ARGUMENTS)
def test_options_refuse_several_answers_per_request(extra):
    with pytest.raises(InvalidRequestError, match="several answers per request"):
        GenerationOptions(extra=extra)
    GenerationOptions(extra={"n": 1})  # one answer is what a result holds


def _one_bad_request_in_a_batch(model: AutoModel, extra: dict) -> list:
    prompt = model.format_prompt("Name a fruit.", num_optimized_icl=0).prompt
    good = GenerationRequest(prompt, SamplingParams(temperature=0, max_new_tokens=4))
    bad = GenerationRequest(prompt, SamplingParams(temperature=0.8, max_new_tokens=4, extra=extra))
    return model.backend.generate([good, bad, good])


def test_transformers_refuses_it_per_request(smol):
    out = _one_bad_request_in_a_batch(smol, {"num_return_sequences": 2})
    assert isinstance(out[1], InvalidRequestError) and "Request 1: num_return_sequences=2" in str(out[1])
    assert out[0] == out[2] and out[0].text
    with pytest.raises(InvalidRequestError, match="several answers"):
        smol.generate("Name a fruit.", n=2)


@pytest.mark.vllm
def test_vllm_refuses_it_per_request(smol_vllm):
    out = _one_bad_request_in_a_batch(smol_vllm, {"n": 2})
    assert isinstance(out[1], InvalidRequestError) and "n=2" in str(out[1])
    assert out[0] == out[2] and out[0].text


@pytest.mark.vllm
def test_openai_refuses_it_per_request(vllm_server):
    from auto_model.constants import DEFAULT_MODEL

    model = AutoModel(DEFAULT_MODEL, base_url=vllm_server)
    out = _one_bad_request_in_a_batch(model, {"n": 2})
    assert isinstance(out[1], InvalidRequestError) and "n=2" in str(out[1])
    assert out[0] == out[2] and out[0].text
