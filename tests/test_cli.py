import json

import pytest

from auto_model.cli import main


def test_generate_prints_answers(capsys):
    code = main(
        [
            "generate",
            "What is the capital of France?",
            "Name a primary color.",
            "--backend",
            "transformers",
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert ">>> What is the capital of France?" in out and ">>> Name a primary color." in out
    assert "paris" in out.lower()


def test_jsonl_batch_keeps_good_items_and_reports_bad_lines(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps({"query": "What is 2 plus 2?"}),
                "{broken json",
                json.dumps("Name a planet."),
                json.dumps({"query": ""}),
            ]
        )
        + "\n"
    )
    dst = tmp_path / "out" / "answers.jsonl"
    code = main(
        [
            "generate",
            "--input",
            str(src),
            "--output",
            str(dst),
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--icl",
            "1",
            "--backend",
            "transformers",
        ]
    )
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert code == 1  # some input lines were bad
    assert [r.get("line") for r in rows] == [1, 2, 3, 4]
    assert (
        rows[0]["query"] == "What is 2 plus 2?" and rows[0]["answer"] and rows[0]["finish_reason"] in {"stop", "length"}
    )
    assert "not valid JSON" in rows[1]["error"]
    assert rows[2]["query"] == "Name a planet." and rows[2]["answer"]
    assert "non-empty" in rows[3]["error"]
    err = capsys.readouterr().err
    assert "wrote 2 answers" in err
    assert "generating" not in err  # stderr is not a terminal here: no progress bar unless asked


def test_progress_bar_on_stderr_when_asked(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps("Name a planet.") + "\n")
    code = main(
        [
            "generate",
            "--input",
            str(src),
            "--output",
            str(tmp_path / "out.jsonl"),
            "--progress",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--icl",
            "1",
            "--backend",
            "transformers",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and captured.out == ""
    assert "generating: 100%" in captured.err and "1/1" in captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "hi", "--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["generate"], "No queries to answer"),
        (["generate", "hi", "--backend", "nope"], "Valid backends: auto, openai, transformers, vllm"),
        (["generate", "hi", "--model", "./no/such/dir"], "does not exist"),
        (["generate", "hi", "--prompt-path", "/no/such.json"], "does not exist"),
    ],
)
def test_errors_are_one_readable_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("auto-model: error:") and message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_resume_keeps_the_answers_a_stopped_run_wrote_and_answers_only_the_rest(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    queries = ["What is 2 plus 2?", "Name a planet.", "Name a colour.", "Name a fruit."]
    src.write_text("".join(json.dumps({"query": q}) + "\n" for q in queries))
    dst = tmp_path / "answers.jsonl"
    argv = ["generate", "--input", str(src), "--output", str(dst), "--temperature", "0", "--max-new-tokens", "12",
            "--backend", "transformers", "--progress"]  # fmt: skip
    assert main(argv) == 0
    whole = dst.read_text()
    assert "0/4" in capsys.readouterr().err
    rows = whole.splitlines()
    # A run stopped after two answers, killed in the middle of writing the third line.
    dst.write_text(rows[2] + "\n" + rows[0] + "\n" + rows[1][:25])
    assert main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "0/2" in err and "wrote 4 answers" in err  # the two kept answers are not asked again
    assert dst.read_text() == whole
    # An answer of another input is not kept.
    dst.write_text(json.dumps({"line": 1, "query": "Something else?", "answer": "x"}) + "\n")
    assert main([*argv, "--resume"]) == 0 and "0/4" in capsys.readouterr().err
    assert main(["generate", "Hi", "--resume"]) == 2
    assert "--resume goes with --input and --output" in capsys.readouterr().err
