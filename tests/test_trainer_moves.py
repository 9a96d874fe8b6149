"""The search's moves that need no writer model (decoding, examples, sentences, shorten): the moves themselves
(pure), and each on the real trainer end to end (SmolLM2 on transformers, one level of children)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

import pytest

from auto_model.artifacts import load_prompt_artifact, prompt_for_model
from auto_model.constants import default_model
from auto_model.errors import ArtifactError
from auto_model.retrieval import ICLExample
from auto_model.routing import EVERYDAY
from auto_model.trainer.cli import main
from auto_model.trainer.moves import (
    Candidate,
    decoding_moves,
    example_moves,
    guideline_bank,
    load_example_bank,
    sentence_moves,
    sentences,
    shorten_moves,
    shortened,
)

START = Candidate("Be helpful. Answer clearly.", (("frequency_penalty", 0.4),), examples=2)


def test_decoding_moves_take_one_setting_one_step_and_only_settings_the_engine_has():
    notes = sorted(m.note for m in decoding_moves(START, {"frequency_penalty", "presence_penalty"}))
    assert notes == ["frequency_penalty 0.4 -> 0.2", "frequency_penalty 0.4 -> 0.6", "presence_penalty 0 -> 0.2"]
    down = next(m for m in decoding_moves(START, {"frequency_penalty"}) if m.note.endswith("0.2"))
    assert down.candidate.settings == {"frequency_penalty": 0.2} and down.candidate.prompt == START.prompt
    zero = decoding_moves(Candidate("p", (("frequency_penalty", 0.2),)), {"frequency_penalty"})
    assert {m.candidate.decoding for m in zero} == {(), (("frequency_penalty", 0.4),)}  # the grid's first is "none"
    assert decoding_moves(START, set()) == []


def test_example_moves_change_the_count_drop_retrieved_ones_add_and_replace_from_the_bank():
    moves = example_moves(START, retrieved=["pool q1", "pool q2", "pool q1"], bank=["bank q"])
    kinds = {m.note.split(" ")[0] for m in moves}
    assert kinds == {"examples", "dropped", "added", "replaced"}
    assert {m.candidate.examples for m in moves if m.note.startswith("examples")} == {1, 3}
    assert {m.candidate.drop for m in moves if m.note.startswith("dropped")} == {("pool q1",), ("pool q2",)}
    added = next(m for m in moves if m.note.startswith("added"))
    assert added.candidate.add == ("bank q",)
    # an added example that is retrieved can be taken out again; it is never both added and dropped
    again = example_moves(added.candidate, retrieved=["bank q"], bank=["bank q"])
    assert [m.candidate.add for m in again if m.note.startswith("removed")] == [()]
    assert all("bank q" not in m.candidate.drop for m in again)
    # a base model's run keeps at least one example: the count never goes below min_examples
    floor = example_moves(START, retrieved=["pool q1"], bank=[], min_examples=2)
    assert {m.candidate.examples for m in floor if m.note.startswith("examples")} == {3}


def test_sentence_moves_add_a_guideline_drop_or_swap_a_sentence():
    bank = guideline_bank()
    assert len(bank) >= 10 and all(line.endswith(".") for line in bank)
    moves = sentence_moves(START, bank[:2])
    added = [m for m in moves if m.note.startswith("added")]
    assert [m.candidate.prompt for m in added] == [f"{START.prompt} {line}" for line in bank[:2]]
    assert {m.candidate.prompt for m in moves if m.note.startswith("dropped")} == {"Answer clearly.", "Be helpful."}
    assert [m.candidate.prompt for m in moves if m.note.startswith("swapped")] == ["Answer clearly. Be helpful."]
    assert sentences("One. Two?\nThree") == ["One.", "Two?", "Three"]
    paragraphs = Candidate("One. Two.\n\nThree.")
    edited = {m.note: m.candidate.prompt for m in sentence_moves(paragraphs, [])}
    assert edited["dropped: Two."] == "One.\n\nThree." and edited["dropped: Three."] == "One. Two."
    assert edited["swapped sentences 2 and 3"] == "One. Three.\n\nTwo."


LONG = """Act quickly, and blot, never rub. Rubbing spreads the stain.

1. **Blot** up as much as you can with a clean, dry cloth or a few paper towels.
2. **Rinse**: pour a little cold water on it and blot again, then repeat this two or three times.
3. **Clean** it with this mix:
   ```text
   1 tbsp dish soap + 1 tbsp white vinegar + 2 cups warm water
   ```
4. **Dry** the spot with a towel and a heavy book on top overnight, then vacuum the carpet well.

Test any cleaner on a hidden spot first, and avoid hot water, which sets the stain for good."""


def _example(body: str) -> ICLExample:
    return ICLExample("How do I get juice out of a carpet?", f"<START>\n{body}\n<END>", ("everyday",))


def test_shortened_keeps_whole_sentences_list_items_and_code_blocks_and_never_ends_on_an_opener():
    ex = _example(LONG)
    short = shortened(ex, max_words=50)
    assert short is not None and short.query == ex.query and short.tags == ex.tags
    assert short.answer.startswith("<START>\n") and short.answer.endswith("\n<END>")
    assert short.body == LONG[: LONG.index("\n3.")]  # item 3 (with its code) does not fit: cut before it
    with_code = shortened(ex, max_words=70)
    assert with_code is not None and with_code.body.endswith("```") and "4. **Dry**" not in with_code.body
    # prose that leads into a cut list goes with it; so does a line ending in a colon
    intro = _example("Sure. Here is what to do.\n\n" + "\n".join(f"{i}. Step {i} takes a few careful words." for i in
                                                                 range(1, 9)))  # fmt: skip
    assert shortened(intro, max_words=12) is None  # what is left, "Sure.", is under a third of 12 words
    assert shortened(intro, max_words=21).body == "Sure. Here is what to do.\n\n1. Step 1 takes a few careful words."
    colon = _example("You need three things: " + "a pan, a lid and a spoon. " * 3 + "Then:\n- heat it " * 9)
    assert not shortened(colon, max_words=60).body.rstrip().endswith(":")
    # e.g. does not end a sentence; an answer that is short already, or barely longer, is left alone
    abbreviation = _example("Use a mild soap, e.g. dish soap, on it. " * 3 + "Then rinse it well with cold water. " * 9)
    assert shortened(abbreviation, max_words=30).body.endswith("on it.")
    assert shortened(_example("Blot it, then rinse it with cold water."), max_words=60) is None
    assert shortened(_example("word " * 64), max_words=60) is None  # one sentence of 64 words: nothing fits


def test_shorten_moves_shorten_retrieved_pool_examples_once():
    moves = shorten_moves(START, retrieved=["q1", "q2", "q1", "q3"], short={"q1", "q3", "q9"})
    assert [(m.kind, m.candidate.add, m.note) for m in moves] == [
        ("shorten", ("q1",), "shortened 'q1'"), ("shorten", ("q3",), "shortened 'q3'")]  # fmt: skip
    assert shorten_moves(moves[0].candidate, ["q1", "q3"], {"q1", "q3"})[0].candidate.add == ("q1", "q3")
    assert shorten_moves(replace(START, drop=("q1",)), ["q1"], {"q1"}) == []


def test_an_added_example_with_a_pool_query_takes_its_place(pool):
    own = prompt_for_model(default_model())
    first = pool[0]
    short = ICLExample(first.query, "<START>\nShorter.\n<END>", first.tags)
    extra = ICLExample("A query no pool has", "<START>\nNew.\n<END>", ("everyday",))
    edited = replace(own, pool_drop=(), pool_add=(extra, short)).edit_pool(pool)
    assert edited == [short, *pool[1:], extra]  # in the original's place, the new one after the rest
    later = ICLExample(first.query, "<START>\nShorter still.\n<END>", first.tags)
    assert replace(own, pool_drop=(), pool_add=(short, later)).edit_pool(pool)[0] == later
    assert replace(own, pool_drop=(first.query,), pool_add=(short,)).edit_pool(pool) == pool[1:]


def test_the_example_bank_keeps_clean_answers_of_the_route(tmp_path):
    ok = "Put the stems in cool water, trim them at an angle every two days, and keep the vase out of the sun."
    responses = {"format": "auto_model.feedback.responses/v1", "responses": [
        {"prompt": "How do I keep tulips standing up?", "response": ok, "problem": None},
        {"prompt": "Too short?", "response": "Yes.", "problem": None},
        {"prompt": "A refusal", "response": "Sorry, but I can't help with that. " + ok, "problem": None},
        {"prompt": "A loop", "response": "Water them. " * 30, "problem": None},
        {"prompt": "Flagged", "response": ok, "problem": "bad"},
    ]}  # fmt: skip
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(responses))
    bank = load_example_bank(path, EVERYDAY)
    assert [ex.query for ex in bank] == ["How do I keep tulips standing up?"] and "bank" in bank[0].tags
    assert bank[0].body == ok
    safety = load_example_bank(path, "safety")  # for the safety route, the refusals
    assert [ex.query for ex in safety] == ["A refusal"] and "harmful" in safety[0].tags
    path.write_text(json.dumps({**responses, "responses": responses["responses"][1:2]}))
    with pytest.raises(ArtifactError, match="no usable example for the everyday route"):
        load_example_bank(path, EVERYDAY)


BANK_QUERY = "How do I keep a loaf of sourdough from going stale?"
BANK_ANSWER = "Keep it cut side down on a wooden board, wrapped in a clean cloth, and eat it within three days."
COMMON = ["--backend", "transformers", "--dtype", "float32", "--route", "everyday", "--depth", "2", "--beam-size",
          "1", "--num-training-examples", "4", "--queries-per-level", "2", "--max-new-tokens", "24", "--disable-tqdm",
          "--seed", "5", "--reward", "metric:clean_ending,metric:no_repetition,metric:refusal"]  # fmt: skip


def _tree(run):
    return json.loads((run / "algo_output" / "output.json").read_text())


def _sent(run):
    with sqlite3.connect(run / "cache" / "requests.sqlite") as db:
        return [json.loads(r) for (r,) in db.execute("SELECT request FROM answers")]


def test_decoding_and_sentence_moves_on_the_real_trainer_with_a_token_cost(tmp_path):
    run, out = tmp_path / "run", tmp_path / "everyday.json"
    args = [*COMMON, "--moves", "decoding,sentences,examples", "--n-actions", "1", "--token-cost", "0.5"]
    assert main([*args, "--log-dir", str(run), "--output", str(out)]) == 0
    tree = _tree(run)
    own = prompt_for_model(default_model())
    root, *children = tree["nodes"]
    assert root["prompt"] == own.prompt_for(EVERYDAY) and root["examples"] == own.examples_for(EVERYDAY)
    assert sorted(n["action"] for n in children) == ["decoding", "examples", "sentences"]  # one of each kind
    for node in tree["nodes"]:
        assert len(node["answers"]) == 2 and node["prompt_tokens"] > 0  # two queries a level
        rewards = [a["reward"] for a in node["answers"]]
        assert node["reward"] == pytest.approx(sum(rewards) / 2 - 0.5 * node["prompt_tokens"] / 1000)
    decoding = next(n for n in children if n["action"] == "decoding")
    assert decoding["decoding"] and decoding["note"].split(" ")[0] in decoding["decoding"]
    sent = _sent(run)
    assert any(r["sampling"]["extra"] == decoding["decoding"] for r in sent)  # the engine got the setting
    changed = next(n for n in children if n["action"] == "sentences")
    assert changed["prompt"] != root["prompt"] and changed["note"].split(" ")[0].rstrip(":") in (
        "added",
        "dropped",
        "swapped",
    )
    assert changed["prompt"].count("\n\n") >= root["prompt"].count("\n\n") - 1  # its paragraphs kept
    # The artifact holds the best candidate's state for the route, the rest of the model's artifact kept.
    best = tree["nodes"][tree["result"]["node"]]
    artifact = load_prompt_artifact(out)
    assert artifact.system_prompt == best["prompt"] and artifact.decoding_for(EVERYDAY) == best["decoding"]
    assert artifact.prompt_for(EVERYDAY) == best["prompt"]  # the route's own copy too, where the start has one
    assert artifact.examples_for(EVERYDAY) == best["examples"] and artifact.routing == own.routing
    assert artifact.prompt_for("safety") == own.prompt_for("safety") and artifact.decoding_for("safety") == {}
    assert artifact.provenance["search"]["moves"] == ["decoding", "sentences", "examples"]
    assert "decoding" in (run / "algo_output" / "tree.html").read_text()


def test_the_examples_move_adds_a_bank_example_retrieved_exactly_as_inference_retrieves(smol, tmp_path):
    bank = tmp_path / "bank.json"
    bank.write_text(json.dumps({"format": "auto_model.icl_pool/v1", "examples": [
        {"query": BANK_QUERY, "answer": f"<START>\n{BANK_ANSWER}\n<END>", "tags": ["bank"]}]}))  # fmt: skip
    run = tmp_path / "run"
    args = [*COMMON, "--moves", "examples", "--n-actions", "8", "--example-bank", str(bank), "--num-training-examples",
            "2", "--queries-per-level", "1"]  # fmt: skip
    assert main([*args, "--log-dir", str(run)]) == 0
    tree = _tree(run)
    added = [n for n in tree["nodes"] if n["action"] == "examples" and n["pool_add"] == [BANK_QUERY]]
    assert added, [n["note"] for n in tree["nodes"]]
    node = added[0]
    # The search's requests for it retrieved from the edited pool as AutoModel does with such an artifact.
    own = smol.prompt_artifact
    edited = replace(own, pool_drop=tuple(node["pool_drop"]), pool_add=tuple(load_example_bank(bank, EVERYDAY)))
    try:
        smol.prompt_artifact = edited
        expected = [ex.query for ex in smol.retrieve([node["query"]], node["examples"], EVERYDAY)[0]]
        assert node["answers"][0]["examples"] == expected
        assert BANK_QUERY in [ex.query for ex in smol.icl_pool]
    finally:
        smol.prompt_artifact = own
    assert BANK_QUERY not in [ex.query for ex in smol.icl_pool]  # the model's own pool is back
    if BANK_QUERY in node["answers"][0]["examples"]:
        assert any(BANK_ANSWER in json.dumps(r["prompt"]) for r in _sent(run))


def test_the_shorten_move_on_the_real_trainer_sends_and_ships_the_shorter_answer(smol, tmp_path):
    run, out = tmp_path / "run", tmp_path / "everyday.json"
    args = [*COMMON, "--moves", "shorten", "--n-actions", "8", "--num-training-examples", "2", "--queries-per-level",
            "1", "--k", "4"]  # fmt: skip
    assert main([*args, "--log-dir", str(run), "--output", str(out)]) == 0
    tree = _tree(run)
    shorter = [n for n in tree["nodes"] if n["action"] == "shorten"]
    assert shorter, [n["note"] for n in tree["nodes"]]
    node = shorter[0]
    query = node["pool_add"][-1]
    assert node["note"] == f"shortened {query!r}" and node["pool_drop"] == []
    original = next(ex for ex in smol.icl_pool if ex.query == query)
    short = shortened(original)
    assert short is not None and len(short.body.split()) < len(original.body.split())
    assert query in node["answers"][0]["examples"]  # shortened: one its level's request retrieves
    # Its request carried the shorter answer in the original's place.
    prompts = [json.dumps(r["prompt"]) for r in _sent(run)]
    last_line = json.dumps(original.body.splitlines()[-1])[1:-1]
    assert any(json.dumps(short.body)[1:-1] in p and last_line not in p for p in prompts)
    # The artifact ships it as a pool addition with the pool's query: loaded, it replaces the original.
    artifact, start = load_prompt_artifact(out), prompt_for_model(default_model())
    best = tree["nodes"][tree["result"]["node"]]
    assert [ex.query for ex in artifact.pool_add] == [ex.query for ex in start.pool_add] + best["pool_add"]
    if best["action"] == "shorten":
        assert artifact.pool_add[-1].body == shortened(next(ex for ex in smol.icl_pool
                                                            if ex.query == best["pool_add"][-1])).body  # fmt: skip
    own, size = smol.prompt_artifact, len(smol.icl_pool)
    try:
        smol.prompt_artifact = replace(own, pool_add=(*own.pool_add, short))
        assert next(ex for ex in smol.icl_pool if ex.query == query).body == short.body
        assert len(smol.icl_pool) == size  # in its place: no example more
    finally:
        smol.prompt_artifact = own


def test_moves_other_than_the_rewrite_need_a_route_and_known_names(capsys):
    assert main(["--moves", "decoding", "--dry-run"]) == 2
    assert "pass --route everyday" in capsys.readouterr().err
    assert main(["--moves", "dance", "--route", "everyday", "--dry-run"]) == 2
    assert "--moves takes some of rewrite, decoding, examples, sentences, shorten" in capsys.readouterr().err
    assert main(["--route", "everyday", "--moves", "examples", "--min-examples", "9", "--dry-run"]) == 2
    assert "--min-examples must be in [0, 5], got 9" in capsys.readouterr().err
    assert main(["--route", "everyday", "--example-bank", "x.json", "--dry-run"]) == 2
