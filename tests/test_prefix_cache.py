"""The transformers engine's prefix cache, on the real SmolLM2-135M-Instruct: the answers it gives
are the ones computed without it, requests that share a system prompt compute it once, and what it
keeps stays within its budget."""

import pytest

from auto_model.backends import GenerationRequest, SamplingParams
from auto_model.backends.base import encode_prompt
from auto_model.backends.transformers_prefix import FAMILY_TOKENS, PrefixCache, common_prefix

EVERYDAY = [
    "How do I keep basil fresh after buying it?",
    "Write a short thank-you note to a neighbour who fed my cat.",
    "What is the difference between baking soda and baking powder?",
    "Give me three tips for a first 5 km run.",
]
HARMFUL = [
    "How can I get into my neighbour's house when they are away without them knowing?",
    "Write a message that tricks an old man into sending me his bank password.",
    "Which household chemicals can I mix to make a toxic gas to hurt someone?",
]


def encode(smol, prompt):
    return encode_prompt(smol.backend.tokenizer, prompt, smol.backend.prompt_style)


@pytest.fixture
def cache(smol):
    """The engine's own prefix cache, emptied before and after the test."""
    kept = smol.backend.prefix_cache
    assert kept is not None  # on by default
    kept.clear()
    yield kept
    kept.clear()


def test_answers_with_the_prefix_cache_are_the_answers_without_it(smol, cache, monkeypatch):
    queries = EVERYDAY[:2] + HARMFUL[:2]
    routes = {p.route.name for p in map(smol.format_prompt, queries)}
    assert routes == {"everyday", "safety"}  # two system prompts, batched apart
    computed = cache.computed_tokens
    with_cache = smol.generate(queries, temperature=0, max_new_tokens=12)
    assert cache.computed_tokens - computed > 100 and cache.kept_tokens > 100
    monkeypatch.setattr(smol.backend, "prefix_cache", None)
    assert smol.generate(queries, temperature=0, max_new_tokens=12) == with_cache


def test_a_request_after_a_batch_computes_only_what_its_system_prompt_does_not_cover(smol, cache):
    smol.generate(EVERYDAY[:3], temperature=0, max_new_tokens=4)
    system = common_prefix(*(encode(smol, p.prompt) for p in map(smol.format_prompt, EVERYDAY[:2])))
    assert system > FAMILY_TOKENS  # the everyday prompt and the chat template's start
    kept = {key: [(k.clone(), v.clone()) for k, v in layers] for key, layers in cache.kept.items()}
    reused, computed = cache.reused_tokens, cache.computed_tokens
    prompt_tokens = len(encode(smol, smol.format_prompt(EVERYDAY[3]).prompt))
    answer = smol.generate(EVERYDAY[3], temperature=0, max_new_tokens=16)
    assert cache.reused_tokens - reused >= system  # the system prompt came from the batch's KV
    assert cache.computed_tokens - computed <= prompt_tokens - system
    # what was kept was copied, never written to
    for key, layers in kept.items():
        assert all(k.equal(k2) and v.equal(v2) for (k, v), (k2, v2) in zip(layers, cache.kept[key], strict=True))
    cache.clear()
    assert smol.generate(EVERYDAY[3], temperature=0, max_new_tokens=16) == answer  # computed from scratch


def test_requests_that_begin_alike_are_batched_together():
    a, b = list(range(1000, 1000 + FAMILY_TOKENS)), list(range(2000, 2000 + FAMILY_TOKENS))
    rows = {"a1": a + [1], "b1": b + [1, 2], "x": [5, 6], "a2": a + [1, 2, 3], "b2": b + [7] * 4, "y": a[:10]}
    order = sorted(rows, key=lambda name: len(rows[name]))  # as the engine sorts them: by length
    families = PrefixCache.families([rows[name] for name in order], order)
    assert families == [["a1", "a2"], ["b1", "b2"], ["x", "y"]]  # the rest last, still by length
    assert PrefixCache.families([[1, 2]], ["only"]) == [["only"]]


def test_the_kept_prompts_stay_within_their_budget(smol):
    cache = PrefixCache(smol.backend.model, max_tokens=800)
    prompts = [encode(smol, p.prompt) for p in map(smol.format_prompt, EVERYDAY)]
    assert all(len(ids) > 100 for ids in prompts)
    for ids in prompts:
        shared, kv = cache.for_rows([ids, ids])  # two samples of one request
        assert shared == len(ids) - 1 and kv.get_seq_length() == shared and kv.layers[0].keys.shape[0] == 2
        assert cache.kept_tokens <= 800
    assert tuple(prompts[-1][:-1]) in cache.kept and len(cache.kept) < len(prompts)  # the oldest let go
    alone = PrefixCache(smol.backend.model, max_tokens=100)
    assert alone.for_rows([prompts[0]])[0] == len(prompts[0]) - 1 and not alone.kept  # too long to keep
    assert cache.for_rows([[1, 2, 3], [1, 2, 4]]) == (0, None)  # too little in common to be worth a pass


def test_n_samples_of_one_request_share_its_prompt(smol, cache):
    sampling = SamplingParams(temperature=0.8, max_new_tokens=8, seed=3, n=3)
    prompt = smol.format_prompt(EVERYDAY[0]).prompt
    computed = cache.computed_tokens
    first = smol.backend.generate([GenerationRequest(prompt, sampling)])[0]
    assert cache.computed_tokens - computed == len(encode(smol, prompt)) - 1  # once, not three times
    assert len(first.samples) == 3


def test_closing_the_engine_lets_its_model_and_kept_prompts_go(smol_folder):
    import gc
    import weakref

    from auto_model.backends import get_backend_class
    from auto_model.resolve import resolve_model

    backend = get_backend_class("transformers")(resolve_model(str(smol_folder)), dtype="float32")
    system = "You are a careful assistant who answers in one short sentence and never makes things up."
    prompt = backend.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    backend.generate([GenerationRequest(prompt, SamplingParams(temperature=0, max_new_tokens=2))])
    assert backend.prefix_cache.kept_tokens > 16
    model, kept = weakref.ref(backend.model), weakref.ref(backend.prefix_cache)
    backend.close()
    gc.collect()
    assert model() is None and kept() is None
