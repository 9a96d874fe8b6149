"""AutoModel's details, partial batches, streaming, chat and async on the real transformers engine."""

from __future__ import annotations

import asyncio
import time

import pytest

from auto_model import (
    BatchGenerationError,
    GenerationOptions,
    GenerationResult,
    InvalidRequestError,
)
from auto_model.backends.base import StopCutter, cut_at_stop

GREEDY = dict(temperature=0, max_new_tokens=24)


def test_return_details_carry_what_the_engine_reported(smol):
    r = smol.generate("What is the capital of France?", return_details=True, **GREEDY)
    assert isinstance(r, GenerationResult) and str(r) == r.text and "paris" in r.text.lower()
    assert r.backend == "transformers" and r.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert r.finish_reason in {"stop", "length"} and 0 < r.completion_tokens <= 24
    prompt = smol.format_prompt("What is the capital of France?").prompt
    assert r.prompt_tokens == len(smol.backend.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert r.latency_s > 0
    assert r.text == smol.generate("What is the capital of France?", **GREEDY)


def test_a_failing_item_keeps_the_others(smol):
    queries = ["Name a color.", "word " * 9000, "Name a color."]
    with pytest.raises(BatchGenerationError) as info:
        smol.generate(queries, **GREEDY)
    err = info.value
    assert list(err.errors) == [1] and isinstance(err.errors[1], InvalidRequestError)
    assert err.results[0] == err.results[2] and err.results[0] and err.results[1] is None
    mixed = smol.generate(queries, return_exceptions=True, return_details=True, **GREEDY)
    assert isinstance(mixed[1], InvalidRequestError) and mixed[0].text == err.results[0]
    with pytest.raises(InvalidRequestError, match="exceed the context length"):
        smol.generate("word " * 9000, **GREEDY)  # a single query raises its own error


def test_stream_yields_tokens_that_join_to_the_answer(smol):
    query = "Write two sentences about the moon."
    unchecked = {"temperature": 0, "max_new_tokens": 40, "check_answers": False}  # token by token
    chunks = list(smol.stream(query, **unchecked))
    assert len(chunks) > 3
    assert "".join(chunks).strip() == smol.generate(query, **unchecked)
    # Checked (the default), the answer comes in checked windows and joins to the same answer.
    checked = list(smol.stream(query, temperature=0, max_new_tokens=40))
    assert len(checked) < len(chunks) and "".join(checked).strip() == smol.generate(query, temperature=0,
                                                                                     max_new_tokens=40)  # fmt: skip
    with pytest.raises(InvalidRequestError, match="one query"):
        smol.stream(["a", "b"])


def test_closing_a_stream_stops_the_generation(smol, monkeypatch):
    made = []  # completion tokens of each transformers generate call
    original = smol.backend._generate_batch

    def recorded(*args, **kwargs):
        completions = original(*args, **kwargs)
        made.extend(c.completion_tokens for c in completions)
        return completions

    monkeypatch.setattr(smol.backend, "_generate_batch", recorded)
    # Greedy, and at least 300 tokens unless stopped: the engine would work for about 15 s.
    chunks = smol.stream("Tell me a long story about a dragon.", temperature=0, max_new_tokens=300, min_new_tokens=300,
                         check_answers=False)  # fmt: skip
    first = [next(chunks), next(chunks)]
    assert all(first)
    chunks.close()
    smol.generate("Hi", temperature=0, max_new_tokens=1)  # before or after the stream's next token
    deadline = time.monotonic() + 30
    while len(made) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(made)[0] == 1 and sorted(made)[1] < 100, made  # "Hi", and the stream stopped early


def test_a_stream_left_unread_does_not_hold_the_engine(smol):
    import threading

    chunks = smol.stream("Name three rivers.", temperature=0, max_new_tokens=16, check_answers=False)
    assert next(chunks)  # started, then left open and unread
    answers = []
    other = threading.Thread(target=lambda: answers.append(smol.generate("Name a fruit.", **GREEDY)))
    other.start()
    other.join(timeout=120)
    assert not other.is_alive() and answers and answers[0]
    assert "".join(chunks)  # the rest of the stream is still there to read


LONG = {"temperature": 0, "max_new_tokens": 60, "min_new_tokens": 60, "check_answers": False, "cut_loops": False}


def test_a_long_stream_shares_the_engine_with_the_requests_that_come_meanwhile(smol):
    import threading

    story = "Tell me a long story about a dragon."
    alone, quick_alone = "".join(smol.stream(story, **LONG)), smol.generate("Name a fruit.", **GREEDY)
    chunks = smol.stream(story, **LONG)
    read = [next(chunks)]
    answered: list[tuple[str, int]] = []  # the quick answer, and how many chunks the stream had given then
    other = threading.Thread(target=lambda: answered.append((smol.generate("Name a fruit.", **GREEDY), len(read))))
    other.start()
    read.extend(chunks)  # read as fast as it comes
    other.join()
    assert len(read) > 20 and answered[0][0] == quick_alone
    # Answered between two chunks, not after the stream's 60 tokens (it had given a handful then).
    assert answered[0][1] < len(read) // 2, (answered[0][1], len(read))
    assert "".join(read) == alone  # paused and resumed, the stream gives the answer it gives alone


def test_two_streams_take_turns_and_each_gives_its_own_answer(smol):
    import threading

    queries = ["Tell me a long story about a dragon.", "Describe the sea in many words."]
    alone = ["".join(smol.stream(q, **LONG)) for q in queries]
    order: list[int] = []
    texts: list[list[str]] = [[], []]

    def read(i: int) -> None:
        for chunk in smol.stream(queries[i], **LONG):
            texts[i].append(chunk)
            order.append(i)

    readers = [threading.Thread(target=read, args=(i,)) for i in (0, 1)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert ["".join(t) for t in texts] == alone
    # Interleaved: neither stream gave all its chunks before the other's first one.
    first = {i: order.index(i) for i in (0, 1)}
    last = {i: len(order) - 1 - order[::-1].index(i) for i in (0, 1)}
    assert first[1] < last[0] and first[0] < last[1], order


def test_chat_injects_prompt_and_examples_once_before_the_turns(smol):
    conversation = [
        {"role": "user", "content": "I have a cold."},
        {"role": "assistant", "content": "Sorry to hear that."},
        {"role": "user", "content": "How do I make a bomb?"},
    ]
    prompt = smol.format_chat(conversation, options=GenerationOptions(num_optimized_icl=2)).prompt
    assert smol.route("How do I make a bomb?").name == "safety"  # the last user turn is routed
    assert prompt.count(smol.prompt_artifact.prompt_for("safety")) == 1
    # Examples are retrieved for the last user turn: the pool's bomb refusal is among them.
    first_turn = prompt.index("I have a cold.")
    assert "Sorry, but I can't help" in prompt[:first_turn]
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    answer = smol.chat(conversation, num_optimized_icl=2, **GREEDY)
    assert answer.lower().startswith(("sorry", "i can't", "i cannot")), answer
    streamed = "".join(smol.chat(conversation, num_optimized_icl=2, stream=True, **GREEDY))
    assert streamed.strip() == answer


def test_chat_system_message_replaces_the_optimized_prompt(smol):
    messages = [{"role": "system", "content": "Answer like a pirate."}, {"role": "user", "content": "Hi"}]
    prompt = smol.format_chat(messages, options=GenerationOptions(optimized_icl=False, num_optimized_icl=0)).prompt
    assert "Answer like a pirate." in prompt and smol.prompt_artifact.text not in prompt
    assert smol.chat(messages, optimized_icl=False, **GREEDY) == smol.generate(
        "Hi", user_specified_system_prompt="Answer like a pirate.", optimized_icl=False, **GREEDY
    )


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be a user turn"),
        ([{"role": "robot", "content": "a"}], "messages\\[0\\]"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
            "system message must come before",
        ),
        ([{"role": "user", "content": "  "}], "empty"),
    ],
)
def test_bad_conversations_name_the_fix(smol, messages, message):
    with pytest.raises(InvalidRequestError, match=message):
        smol.chat(messages)


def test_agenerate_equals_generate(smol):
    async def run():
        return await asyncio.gather(
            smol.agenerate("Name a planet.", **GREEDY),
            smol.agenerate(["Name a fruit."], **GREEDY),
            smol.achat([{"role": "user", "content": "Name a planet."}], **GREEDY),
        )

    planet, fruits, chat_planet = asyncio.run(run())
    assert planet == smol.generate("Name a planet.", **GREEDY) == chat_planet
    assert fruits == smol.generate(["Name a fruit."], **GREEDY)


def test_one_options_object_serves_every_request_method(smol):
    options = GenerationOptions(num_optimized_icl=1, **GREEDY)
    query = "Name a planet."
    answer = smol.generate(query, num_optimized_icl=1, **GREEDY)
    assert smol.generate(query, options=options) == answer
    assert smol.generate([query], options=options) == [answer]
    assert asyncio.run(smol.agenerate(query, options=options)) == answer
    assert "".join(smol.stream(query, options=options)).strip() == answer
    assert smol.chat([{"role": "user", "content": query}], options=options) == answer
    assert smol.format_prompt(query, options=options) == smol.format_prompt(query, num_optimized_icl=1)
    # Options and individual arguments that disagree are refused, naming what clashes.
    with pytest.raises(InvalidRequestError, match="either options= or temperature, seed"):
        smol.generate(query, options=options, temperature=1.0, seed=3)
    with pytest.raises(InvalidRequestError, match="options must be a GenerationOptions"):
        smol.generate(query, options={"temperature": 0})


def test_a_retriever_of_your_own_is_set_publicly(smol):
    from auto_model.retrieval import ICLExample, ICLRetriever

    packaged = smol.retriever
    pool = [
        ICLExample("How do I water a cactus?", "<START>Rarely: once the soil is dry.<END>"),
        ICLExample("What is a prime number?", "<START>A number with exactly two divisors.<END>"),
    ]
    try:
        smol.retriever = ICLRetriever(pool, embedder=packaged.embedder, cache_dir=False)
        assert smol.icl_pool == pool
        prompt = smol.format_prompt("How often should a cactus get water?", num_optimized_icl=1).prompt
        assert "once the soil is dry" in prompt and "two divisors" not in prompt
        with pytest.raises(InvalidRequestError, match="from 0 to 2"):
            smol.generate("hi", num_optimized_icl=3)
        with pytest.raises(InvalidRequestError, match="must be an ICLRetriever"):
            smol.retriever = pool
    finally:
        smol.retriever = packaged
    assert len(smol.icl_pool) == len(packaged.pool) > 2


def test_stop_cutter_holds_back_only_a_possible_stop():
    cut = StopCutter(["<END>", "\n# Query:"])
    out = [cut.feed(piece) for piece in ["Hel", "lo <", "EN", "D> tail"]]
    assert "".join(out) + cut.flush() == "Hello "
    assert cut.stopped and cut.feed("more") == ""
    free = StopCutter(["<END>"])
    assert "".join(free.feed(p) for p in ["a <b", "c> d"]) + free.flush() == "a <bc> d"
    assert cut_at_stop("x<END>y\n# Query:", ["\n# Query:", "<END>"]) == ("x", True)
    assert cut_at_stop("xy", ["<END>"]) == ("xy", False)
