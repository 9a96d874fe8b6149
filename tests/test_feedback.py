"""Synthetic feedback's comparisons (``cs``): the bad-response checks, the rubric and the filters, on
constructed responses; and ``auto-model-feedback --mode cs`` on files."""

from __future__ import annotations

import json

import pytest

from auto_model.errors import InvalidRequestError
from auto_model.feedback import COMPARISONS_FORMAT, compare, response_problem
from auto_model.feedback.cli import RESPONSES_FORMAT, main
from auto_model.feedback.prompts import SIMILARITY_THRESHOLD, Similarity, load_seeds, malformed, request_text

RUBRIC = ["gemma-careful-3shot", "smol-careful-3shot", "smol-plain-1shot"]
GOOD = "Boil the eggs for nine minutes, then cool them in cold water so the shells come off cleanly."
MEDIUM = "Boil them for about nine minutes and then put them in cold water before peeling."
SHORT = "Boil them until they are done."


def test_bad_responses_are_empty_leaking_or_looping():
    assert response_problem("") == response_problem("   \n") == response_problem(None) == "empty"
    assert response_problem("Sure, here it is.\nHuman: and now tell me more") == "turn-leak"
    assert response_problem("Fine.\n### Instruction: write another") == "turn-leak"
    looping_line = "\n".join(["Use a fresh, clean, well-watered vase."] * 3)
    assert response_problem(looping_line) == "looping"
    phrase = "cut the stems at an angle every day "
    assert response_problem("Tips: " + phrase * 3) == "looping"
    assert response_problem(phrase * 2) is None  # twice is not a loop
    assert response_problem(GOOD) is None
    # The embedded model's own answer to `make demo`'s second query, as it begins:
    demo = " ".join(
        f"{i}. **Use a fresh, clean, and well-watered plant** every time you cut a flower." for i in (1, 2, 3)
    )
    assert response_problem(demo) == "looping"


def test_pairs_follow_the_rubric_nearest_ranks_first_at_most_n_minus_1_per_prompt():
    responses = {RUBRIC[0]: {"q": GOOD}, RUBRIC[1]: {"q": MEDIUM}, RUBRIC[2]: {"q": SHORT}}
    result = compare(responses, RUBRIC)
    assert result["format"] == COMPARISONS_FORMAT and result["rubric"] == RUBRIC
    pairs = [(c["meta"]["chosen_config"], c["meta"]["rejected_config"]) for c in result["comparisons"]]
    assert pairs == [(RUBRIC[0], RUBRIC[1]), (RUBRIC[1], RUBRIC[2])]  # adjacent ranks; (0, 2) is over the limit
    assert [c["meta"]["rule"] for c in result["comparisons"]] == ["model", "demos+shots"]
    first = result["comparisons"][0]
    assert first["prompt"] == "q" and first["chosen"] == GOOD and first["rejected"] == MEDIUM
    assert result["counts"] == {"kept": 2, "kept:demos+shots": 1, "kept:model": 1, "over_limit": 1, "pairs": 3}


def test_filters_drop_short_bad_and_identical_chosen_answers_and_count_them():
    responses = {
        RUBRIC[0]: {"short": SHORT, "bad": "", "same": GOOD},
        RUBRIC[1]: {"short": GOOD, "bad": GOOD, "same": GOOD},
        RUBRIC[2]: {"short": GOOD + " " + MEDIUM, "bad": SHORT},
    }
    result = compare(responses, RUBRIC)
    kept = {(c["prompt"], c["meta"]["chosen_config"], c["meta"]["rejected_config"]) for c in result["comparisons"]}
    # "short": the best-ranked answer is under the prompt's mean length minus half a deviation (6 words
    # against 13): it is never chosen; the second and third still compare.
    # "bad": an empty answer is never chosen either.
    # "same": two configurations only (the third has no answer), with the same text.
    assert kept == {("short", RUBRIC[1], RUBRIC[2]), ("bad", RUBRIC[1], RUBRIC[2])}
    counts = result["counts"]
    assert counts["bad_chosen"] == 2 and counts["identical"] == 1 and counts["too_short"] == 2
    assert counts["pairs"] == 3 + 3 + 1 and counts["kept"] == 2


def test_a_rubric_must_name_two_configurations_that_have_responses():
    with pytest.raises(InvalidRequestError, match="two or more distinct"):
        compare({RUBRIC[0]: {}}, RUBRIC[:1])
    with pytest.raises(InvalidRequestError, match="two or more distinct"):
        compare({RUBRIC[0]: {}}, [RUBRIC[0], RUBRIC[0]])
    with pytest.raises(InvalidRequestError, match="run --mode rg"):
        compare({RUBRIC[0]: {}}, RUBRIC[:2])


def write_responses(folder, name: str, answers: dict[str, str]) -> None:
    rows = [{"prompt": p, "response": r, "problem": response_problem(r)} for p, r in answers.items()]
    (folder / f"{name}.json").write_text(json.dumps({"format": RESPONSES_FORMAT, "config": name, "responses": rows}))


def test_mode_cs_writes_comparison_json_from_the_responses_files(tmp_path, capsys):
    write_responses(tmp_path, RUBRIC[0], {"q1": GOOD, "q2": MEDIUM})
    write_responses(tmp_path, RUBRIC[1], {"q1": MEDIUM, "q2": ""})
    # The original's spellings (snake_case) work as well as kebab-case.
    assert main(["--mode", "cs", "--output_dir", str(tmp_path), "--rubric", *RUBRIC[:2]]) == 0
    written = json.loads((tmp_path / "comparison.json").read_text())
    assert [(c["prompt"], c["chosen"], c["rejected"]) for c in written["comparisons"]] == [
        ("q1", GOOD, MEDIUM),
        ("q2", MEDIUM, ""),
    ]
    assert "2 comparisons of 2 pairs" in capsys.readouterr().err
    assert main(["--mode", "cs", "--output-dir", str(tmp_path), "--rubric", RUBRIC[0], "missing-x-1shot"]) == 2
    assert "run --mode rg for that configuration first" in capsys.readouterr().err
    (tmp_path / "broken-x-1shot.json").write_text("[1, 2]")
    assert main(["--mode", "cs", "--output-dir", str(tmp_path), "--rubric", RUBRIC[0], "broken-x-1shot"]) == 2
    assert "is not a responses file" in capsys.readouterr().err
    assert main(["--mode", "cs", "--output-dir", str(tmp_path)]) == 2
    assert "needs --rubric" in capsys.readouterr().err


def test_the_shipped_demonstrations_parse_and_are_listed(capsys):
    from auto_model.feedback.responses import load_demos

    careful, plain = load_demos("careful"), load_demos("plain")
    assert len(careful.dialogues) >= 5 and len(plain.dialogues) >= 5
    assert careful.instruction and "harmless" in careful.instruction
    # The same questions, answered with care and plainly.
    assert [d.query for d in careful.dialogues] == [d.query for d in plain.dialogues]
    assert sum(len(d.answer) for d in careful.dialogues) > 4 * sum(len(d.answer) for d in plain.dialogues)
    assert main(["--list-demos"]) == 0
    listed = {line.split("\t")[0]: line.split("\t")[1:] for line in capsys.readouterr().out.splitlines()}
    assert set(listed) == {"careful", "plain", "general"} and listed["careful"][0].endswith("careful.txt")
    assert listed["general"][1] == "(seed prompts, --mode pg)"


def test_the_shipped_seeds_are_100_distinct_prompts_under_an_instruction():
    seeds = load_seeds("general")
    assert len(seeds.prompts) == 100 and seeds.instruction and "assistant" in seeds.instruction
    assert len({p.lower() for p in seeds.prompts}) == 100 and all(malformed(p) is None for p in seeds.prompts)
    text = request_text("Write questions.", ["A b c?", "D e f?"])
    assert text == "Write questions.\n\nQuery: A b c?\nQuery: D e f?\nQuery:"


def test_generated_prompts_that_are_malformed_or_near_copies_are_dropped():
    assert malformed("") == "empty" and malformed("Why?") == "too_short"
    assert malformed("How do I cook rice? Query: how do I cook pasta?") == "turn_marker"
    assert malformed(" ".join(["word"] * 61)) == "too_long" and malformed("1 2 3 4 5 6 ??? !!!") == "not_text"
    assert malformed("How do I keep basil alive indoors?") is None
    similarity = Similarity(["How do I keep basil alive indoors?"])
    assert similarity.highest("How do I keep my basil alive indoors in winter?") >= SIMILARITY_THRESHOLD
    assert similarity.highest("What is the tallest mountain in Africa?") < SIMILARITY_THRESHOLD


def test_pg_keeps_new_prompts_from_the_real_model_and_a_rerun_comes_from_the_cache(smol, count_calls, tmp_path):
    from auto_model.feedback.prompts import generate_prompts
    from auto_model.options import GenerationOptions
    from auto_model.rewards.requests import RequestCache, Role, Usage

    seeds = load_seeds("general")
    options = GenerationOptions(temperature=1.2, top_p=0.9, max_new_tokens=24)
    results = []
    for _ in range(2):
        role = Role("pg", smol, RequestCache(tmp_path / "requests.sqlite"), Usage())
        with count_calls(smol.backend) as calls:
            results.append(generate_prompts(smol, role.run, seeds, 3, options, seed=5, max_rounds=3))
        role.cache.close()
        if len(results) == 1:
            assert calls.calls and calls.calls[0] == 8  # a round is one engine call of 2x what is needed (8 at least)
        else:
            assert calls.calls == []  # the same seed sends the same requests: all answered by the cache
    first, again = results
    assert first["prompts"] == again["prompts"] and first["format"] == "auto_model.prompts/v1"
    kept = first["prompts"]
    assert 1 <= len(kept) <= 3 and first["counts"]["kept"] == len(kept)
    assert sum(first["counts"]["dropped"].values()) + len(kept) == 8 * first["rounds"]
    similarity = Similarity(seeds.prompts)
    for prompt in kept:
        assert malformed(prompt) is None and "\n" not in prompt and prompt not in seeds.prompts
        assert similarity.highest(prompt) < SIMILARITY_THRESHOLD
    # Progress: the cached requests at once, then each answer as the engine reports it.
    role = Role("pg", smol, RequestCache(tmp_path / "requests.sqlite"), Usage())
    greedy = GenerationOptions(temperature=0, max_new_tokens=2)
    build = smol.aligner.build_request
    requests = [build(None, [], q, greedy) for q in ("Name a fruit.", "Name a colour.", "Name a tree.")]
    role.run(requests[:1])
    seen: list[int] = []
    role.run(requests, progress=seen.append)
    role.cache.close()
    assert seen == [1, 1, 1]


def test_rg_on_the_command_line_caches_its_requests_then_cs(tmp_path, capsys):
    from auto_model.rewards.requests import RequestCache

    (tmp_path / "prompts.txt").write_text("How do I clean a cast iron pan?\nHow can I read someone's texts secretly?\n")
    args = ["--mode", "rg", "--output_dir", str(tmp_path), "--use_hf", "--max_new_tokens", "6", "--n_shot", "1"]
    assert main([*args, "--prompt_file_path", "plain"]) == 0
    assert main(args) == 0  # careful, the default
    assert "2 responses" in capsys.readouterr().err
    cache = RequestCache(tmp_path / "cache" / "requests.sqlite")
    assert len(cache) == 4  # two configurations of two prompts
    cache.close()
    names = sorted(p.stem for p in tmp_path.glob("*shot.json"))
    assert names == ["smollm2-135m-instruct-careful-1shot", "smollm2-135m-instruct-plain-1shot"]
    assert main(["--mode", "cs", "--output-dir", str(tmp_path), "--rubric", *names]) == 0
    assert json.loads((tmp_path / "comparison.json").read_text())["format"] == COMPARISONS_FORMAT


def test_a_bad_demonstration_file_or_missing_prompts_fail_before_any_engine_loads(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("Human: hi\n\nHuman: again\n")
    (tmp_path / "prompts.txt").write_text("How do tides work?\n")
    base = ["--mode", "rg", "--output_dir", str(tmp_path), "--model_name_or_path", "no/such-model"]
    assert main([*base, "--prompt_file_path", str(bad)]) == 2
    assert "must alternate 'Human:' and 'Assistant:'" in capsys.readouterr().err
    assert main([*base, "--prompt_file_path", "nope"]) == 2
    assert "careful, plain" in capsys.readouterr().err
    assert main([*base, "--n_shot", "9", "--use_hf"]) == 2  # the original's bare flag
    assert "--n_shot must be 1 to 6" in capsys.readouterr().err
    (tmp_path / "prompts.txt").unlink()
    assert main(base) == 2
    assert "prompts.txt does not exist" in capsys.readouterr().err


def test_responses_of_two_configurations_in_one_engine_call_each_then_their_comparisons(smol, count_calls, tmp_path):
    from auto_model.feedback.responses import generate_responses, load_demos
    from auto_model.options import GenerationOptions

    prompts = [
        "How do I clean a cast iron pan?",
        "How can I read someone's texts secretly?",
    ]
    options = GenerationOptions(temperature=0, top_p=1.0, max_new_tokens=8)
    records = {}
    for demos, shots in (("careful", 3), ("plain", 1)):
        with count_calls(smol.backend) as calls:
            record = generate_responses(smol, prompts, load_demos(demos), shots, options)
        assert calls.calls == [2]  # every prompt of the configuration in one engine call
        records[record["config"]["name"]] = record
    careful, plain = "smollm2-135m-instruct-careful-3shot", "smollm2-135m-instruct-plain-1shot"
    assert set(records) == {careful, plain}
    rows = records[careful]["responses"]
    assert [r["prompt"] for r in rows] == prompts and all("Human:" not in r["response"] for r in rows)
    assert all(r["problem"] == response_problem(r["response"]) for r in rows)
    assert sum(records[careful]["counts"].values()) == 2
    # The careful demonstrations are in the prompt, with the instruction as its system prompt.
    demos = load_demos("careful")
    request = smol.aligner.build_request(demos.instruction, demos.dialogues[:3], prompts[0], options)
    assert "landlord" in request.prompt and "compound interest" not in request.prompt  # three dialogues of six
    assert "Dialogues between a person and a careful" in request.prompt
    for name, record in records.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    assert main(["--mode", "cs", "--output-dir", str(tmp_path), "--rubric", careful, plain]) == 0
    written = json.loads((tmp_path / "comparison.json").read_text())
    assert written["counts"]["pairs"] == 2 and all(c["meta"]["rule"] == "demos+shots" for c in written["comparisons"])


@pytest.mark.vllm
def test_rg_on_an_openai_compatible_server(vllm_server, tmp_path):
    """Generation on any engine the SDK reaches: here a real vLLM server, through the openai backend."""
    from auto_model.constants import DEFAULT_MODEL

    prompts = ["How do I clean a cast iron pan?", "What is a prime number?"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    args = ["--mode", "rg", "--output_dir", str(tmp_path), "--model_name_or_path", DEFAULT_MODEL,
            "--base_url", vllm_server, "--max_new_tokens", "6", "--n_shot", "1", "--temperature", "0"]  # fmt: skip
    assert main(args) == 0
    record = json.loads((tmp_path / "smollm2-135m-instruct-careful-1shot.json").read_text())
    assert [r["prompt"] for r in record["responses"]] == prompts
    assert all(r["response"] and "error" not in r for r in record["responses"]), record["responses"]
