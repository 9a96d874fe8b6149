"""The request cache under a role: chunked engine calls, and a crash keeps the finished chunks.

``FakeEngineModel`` is a fake, named as such: it stands in for an AutoModel so that the test can
crash the engine at a chosen call, which a real engine cannot be made to do on cue.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from auto_model.backends.base import Completion, GenerationRequest, SamplingParams
from auto_model.options import GenerationOptions
from auto_model.rewards.requests import RequestCache, Role, RoleUsage, Usage


class FakeEngineModel:
    def __init__(self, crash_on_call=None):
        self.backend, self.backend_name = SimpleNamespace(model_id="fake"), "fake"
        self.calls: list[int] = []
        self.crash_on_call = crash_on_call

    def run_requests(self, requests, on_completion=None):
        self.calls.append(len(requests))
        if len(self.calls) == self.crash_on_call:
            raise RuntimeError("engine died")
        outcomes = [Completion(f"answer to {r.prompt}", "stop", 1, 1) for r in requests]
        for i, outcome in enumerate(outcomes):  # like vLLM: reported when the call returns
            if on_completion:
                on_completion(i, outcome)
        return outcomes


def _requests(n):
    return [GenerationRequest(f"q{i}", SamplingParams(temperature=0.0, max_new_tokens=8)) for i in range(n)]


def test_role_sends_chunks_and_a_crash_keeps_the_finished_ones(tmp_path):
    cache = RequestCache(tmp_path / "c.sqlite")
    usage = Usage(roles={"answer": RoleUsage()})
    crashing = FakeEngineModel(crash_on_call=3)
    role = Role("answer", crashing, cache, usage, chunk_size=2)
    with pytest.raises(RuntimeError, match="engine died"):
        role.run(_requests(5))
    assert crashing.calls == [2, 2, 1] and len(cache) == 4

    healthy = FakeEngineModel()
    role = Role("answer", healthy, cache, usage, chunk_size=2)
    outcomes = role.run(_requests(5))
    assert healthy.calls == [1]  # only the request lost in the crash is sent again
    assert [o.text for o in outcomes] == [f"answer to q{i}" for i in range(5)]
    cache.close()


def test_batch_size_one_sends_one_request_per_engine_call(tmp_path):
    from auto_model.trainer.cli import parse_args

    args, _ = parse_args(["--batch-size", "1"])
    cache = RequestCache(tmp_path / "c.sqlite")
    engine = FakeEngineModel()
    Role("answer", engine, cache, Usage(roles={"answer": RoleUsage()}), chunk_size=args.batch_size).run(_requests(3))
    assert engine.calls == [1, 1, 1]
    engine = FakeEngineModel()
    Role("answer", engine, cache, Usage(roles={"answer": RoleUsage()})).run(_requests(5))
    assert engine.calls == [2]  # the default: every request not cached in one call
    cache.close()
    with pytest.raises(ValueError):
        Role("answer", engine, cache, Usage(), chunk_size=0)


def test_cache_keys_of_unconstrained_requests_do_not_name_a_schema(tmp_path):
    # Caches written before json_schema existed stay valid: an unconstrained request's key has no
    # json_schema entry; a constrained one is its own request.
    plain = GenerationRequest("q", SamplingParams(temperature=0.0, max_new_tokens=8))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    constrained = GenerationRequest("q", SamplingParams(temperature=0.0, max_new_tokens=8, json_schema=schema))
    key, blob = RequestCache.key("m", "b", plain)
    other_key, other_blob = RequestCache.key("m", "b", constrained)
    assert "json_schema" not in blob and json.loads(other_blob)["sampling"]["json_schema"] == schema
    assert key != other_key


def test_ask_takes_one_sampling_setting_per_prompt(tmp_path):
    engine = FakeEngineModel()
    engine.aligner = SimpleNamespace(  # the aligner's part a role reads: the format and the request builder
        prompt_format="text",
        build_request=lambda system, examples, messages, options: GenerationRequest(
            messages[0]["content"], options.sampling()
        ),
    )
    seen = []
    run = engine.run_requests
    engine.run_requests = lambda requests, on_completion=None: (seen.extend(requests), run(requests, on_completion))[1]
    role = Role("eval", engine, RequestCache(tmp_path / "c.sqlite"), Usage())
    schemas = [{"type": "integer"}, {"type": "string"}]
    role.ask(["a", "b"], [GenerationOptions(json_schema=s) for s in schemas], seeds=[1, 2])
    assert [(r.sampling.json_schema, r.sampling.seed) for r in seen] == [(schemas[0], 1), (schemas[1], 2)]
    with pytest.raises(ValueError, match="2 sampling settings for 3 prompts"):
        role.ask(["a", "b", "c"], [GenerationOptions(), GenerationOptions()])
