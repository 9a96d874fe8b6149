"""The openai backend under failure: retries, timeouts, broken responses, partial batches.

The server here is FaultServer (bench/fault_server.py), a fault injector: real servers cannot be
made to fail on a schedule. The same backend is tested for real answers against a real vLLM
OpenAI server in test_openai_backend.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from auto_model import AutoModel
from auto_model.cli import main
from auto_model.errors import (
    AuthenticationError,
    BatchGenerationError,
    EngineConnectionError,
    EngineHTTPError,
    EngineTimeoutError,
    MalformedResponseError,
)
from bench.fault_server import FaultServer


@pytest.fixture(scope="module")
def server():
    with FaultServer() as s:
        yield s


@pytest.fixture
def fault(server):
    server.reset()
    server.delay = 0.0
    yield server
    server.reset()


def client(fault: FaultServer, **kwargs) -> AutoModel:
    kwargs.setdefault("api_key", "test-key")
    return AutoModel("fault-model", base_url=fault.url, **kwargs)


GREEDY = dict(temperature=0, max_new_tokens=8, optimized_icl=False)


def test_base_url_routes_auto_to_openai_with_chat_messages(fault):
    model = client(fault)
    assert model.backend_name == "openai" and model.backend.prompt_style == "chat"
    assert model.generate("hello", **GREEDY) == "echo: hello"
    details = model.generate("hello", return_details=True, **GREEDY)
    assert (details.finish_reason, details.prompt_tokens, details.completion_tokens) == ("stop", 7, 3)
    assert details.backend == "openai" and details.model == "fault-model" and details.latency_s > 0


def test_429_then_success_recovers_within_max_retries(fault):
    fault.plan({"q": ["429", "429"]})
    assert client(fault, max_retries=2).generate("q", **GREEDY) == "echo: q"
    assert fault.attempts["q"] == 3


def test_500_past_the_retry_budget_is_a_typed_error(fault):
    fault.plan({"q": ["500"] * 5})
    with pytest.raises(EngineHTTPError, match="HTTP 500 after 1 retries") as info:
        client(fault, max_retries=1).generate("q", **GREEDY)
    assert info.value.status_code == 500
    assert fault.attempts["q"] == 2  # the first try and one retry


def test_a_hang_past_the_timeout_is_retried_then_typed(fault):
    fault.plan({"once": ["hang"], "always": ["hang"] * 5})
    model = client(fault, timeout=0.5, max_retries=1)
    assert model.generate("once", **GREEDY) == "echo: once"
    t0 = time.perf_counter()
    with pytest.raises(EngineTimeoutError, match="timeout=0.5s"):
        model.generate("always", **GREEDY)
    assert fault.attempts["always"] == 2
    assert time.perf_counter() - t0 < 2.9  # gave up after two 0.5 s attempts, did not wait the 3 s hang out


def test_truncated_json_is_retried_then_typed(fault):
    fault.plan({"once": ["truncated"], "always": ["truncated"] * 5})
    model = client(fault, max_retries=2)
    assert model.generate("once", **GREEDY) == "echo: once"
    with pytest.raises(MalformedResponseError, match="not valid JSON"):
        model.generate("always", **GREEDY)
    assert fault.attempts["always"] == 3


def test_unreachable_server_is_a_connection_error(fault):
    model = AutoModel("fault-model", base_url="http://127.0.0.1:9/v1", api_key="k", max_retries=0, timeout=2)
    with pytest.raises(EngineConnectionError, match="Is the server running"):
        model.generate("q", **GREEDY)


def test_batch_failures_keep_every_finished_answer(fault):
    queries = ["a", "b", "fails-500", "c", "hangs", "flaky"]
    fault.plan({"fails-500": ["500"] * 9, "hangs": ["hang"] * 9, "flaky": ["429"]})
    model = client(fault, timeout=0.5, max_retries=1, max_concurrency=3)
    with pytest.raises(BatchGenerationError) as info:
        model.generate(queries, **GREEDY)
    err = info.value
    assert sorted(err.errors) == [2, 4]
    assert isinstance(err.errors[2], EngineHTTPError) and isinstance(err.errors[4], EngineTimeoutError)
    assert err.results == ["echo: a", "echo: b", None, "echo: c", None, "echo: flaky"]
    assert err.succeeded == {0: "echo: a", 1: "echo: b", 3: "echo: c", 5: "echo: flaky"}
    assert "2 of 6 requests failed" in str(err)

    fault.reset()
    fault.plan({"fails-500": ["500"] * 9, "hangs": ["hang"] * 9})
    mixed = model.generate(queries, return_exceptions=True, **GREEDY)
    assert [m if isinstance(m, str) else type(m) for m in mixed] == [
        "echo: a",
        "echo: b",
        EngineHTTPError,
        "echo: c",
        EngineTimeoutError,
        "echo: flaky",
    ]


def test_batch_runs_max_concurrency_requests_at_once_in_input_order(fault):
    fault.delay = 0.3
    queries = [f"q{i}" for i in range(12)]
    model = client(fault, max_concurrency=4)
    t0 = time.perf_counter()
    answers = model.generate(queries, **GREEDY)
    elapsed = time.perf_counter() - t0
    assert answers == [f"echo: {q}" for q in queries]
    assert fault.max_in_flight(set(queries)) == 4
    assert elapsed < 12 * 0.3 / 2  # sequential would take 3.6 s; four at a time about 0.9 s


def test_agenerate_runs_concurrently_on_a_server(fault):
    model = client(fault)
    model.generate("warm-up", **GREEDY)  # the embedder and the index, loaded once before timing
    fault.delay = 0.3

    async def run():
        return await asyncio.gather(*(model.agenerate(f"q{i}", **GREEDY) for i in range(4)))

    t0 = time.perf_counter()
    assert asyncio.run(run()) == [f"echo: q{i}" for i in range(4)]
    assert time.perf_counter() - t0 < 4 * 0.3 * 0.75


def test_base_format_uses_completions(fault):
    model = client(fault, prompt_format="base")
    assert model.backend.prompt_style == "base"
    prompt = model.format_prompt("what now", optimized_icl=False).prompt
    assert isinstance(prompt, str) and prompt.endswith("<START>\n")
    # FaultServer keys a base-format prompt by its open query.
    assert model.generate("what now", **GREEDY) == "echo: what now"


def test_missing_key_names_openai_api_key(fault, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(AuthenticationError, match="OPENAI_API_KEY"):
        AutoModel("gpt-4o-mini")
    with pytest.raises(AuthenticationError, match="OPENAI_API_KEY"):
        AutoModel("some-model", base_url="https://api.example.com/v1")
    # A server on this machine needs no key.
    assert client(fault, api_key=None).generate("local", **GREEDY) == "echo: local"
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    client(fault, api_key=None).generate("env", **GREEDY)
    assert fault.auth_headers[-1] == "Bearer from-env"


def test_rejected_key_is_an_authentication_error(fault):
    fault.plan({"q": ["401"]})
    with pytest.raises(AuthenticationError, match="rejected the API key"):
        client(fault).generate("q", **GREEDY)


def test_api_key_never_reaches_logs_or_repr(fault, caplog):
    secret = "sk-test-0123456789abcdef"
    with caplog.at_level(logging.DEBUG):
        model = client(fault, api_key=secret)
        model.generate("q", **GREEDY)
        fault.plan({"bad": ["500"] * 3})
        with pytest.raises(EngineHTTPError) as info:
            model.generate("bad", **GREEDY)
    assert fault.auth_headers[0] == f"Bearer {secret}"  # it was really sent
    assert secret not in caplog.text
    assert secret not in repr(model) and secret not in repr(model.backend) and secret not in str(info.value)


def test_cli_batch_against_a_server_keeps_good_rows(fault, tmp_path, capsys):
    fault.plan({"broken": ["500"] * 9})
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(q) for q in ["one", "broken", "two"]) + "\n")
    dst = tmp_path / "out.jsonl"
    code = main(
        [
            "generate",
            "--model",
            "fault-model",
            "--base-url",
            fault.url,
            "--input",
            str(src),
            "--output",
            str(dst),
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--icl",
            "0",
        ]
    )
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert code == 1
    assert [r.get("answer") for r in rows] == ["echo: one", None, "echo: two"]
    assert "EngineHTTPError" in rows[1]["error"] and "HTTP 500" in rows[1]["error"]
    assert "wrote 2 answers" in capsys.readouterr().err
