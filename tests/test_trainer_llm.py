"""The request cache under a role: chunked engine calls, and a crash keeps the finished chunks.

``FakeEngineModel`` is a fake, named as such: it stands in for an AutoModel so that the test can
crash the engine at a chosen call, which a real engine cannot be made to do on cue.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from auto_model.backends.base import Completion, GenerationRequest, SamplingParams
from auto_model.trainer.llm import RequestCache, Role, RoleUsage, Usage


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

    _, args = parse_args(["--batch_size", "1"])
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
