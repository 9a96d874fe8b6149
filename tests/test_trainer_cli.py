"""auto-model-train end to end on the real tiny model (SmolLM2 answers, judges and rewrites itself)."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import launch_collected

from auto_model import AutoModel
from auto_model.artifacts import load_prompt_artifact
from auto_model.trainer.cli import main

SMALL = [
    "--backend",
    "transformers",
    "--dtype",
    "float32",
    "--beam-size",
    "2",
    "--n-actions",
    "2",
    "--num-training-examples",
    "4",
    "--max-new-tokens",
    "24",
    "--judge-max-new-tokens",
    "32",  # as many calls as at 48 (the same replies read or not), a third fewer tokens
    "--disable-tqdm",
    "--seed",
    "3",
]


def usage(run: Path) -> dict:
    return json.loads((run / "algo_output" / "usage.json").read_text())


def cache_rows(run: Path) -> int:
    with sqlite3.connect(run / "cache" / "requests.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


class KilledMidSearch:
    """``auto-model-train`` (SMALL, depth 2) in a process of its own, SIGKILLed inside its second
    level: some of that level's requests are done, the level is not. :meth:`result` waits for it."""

    def __init__(self, run: Path):
        self.run = run
        command = [sys.executable, "-m", "auto_model.trainer.cli", *SMALL, "--depth", "2", "--log-dir", str(run)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.killed_mid_search = False
        self._watcher = threading.Thread(target=self._kill_inside_the_second_level, daemon=True)
        self._watcher.start()

    def _kill_inside_the_second_level(self) -> None:
        checkpoint = self.run / "algo_output" / "checkpoint.json"
        deadline, rows_at_checkpoint = time.monotonic() + 300, None
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                if rows_at_checkpoint is None and checkpoint.exists():
                    if json.loads(checkpoint.read_text())["level"] >= 1:
                        rows_at_checkpoint = cache_rows(self.run)
                if rows_at_checkpoint is not None and cache_rows(self.run) > rows_at_checkpoint:
                    break  # inside the second level: some of its requests are done, the level is not
                time.sleep(0.05)
            self.killed_mid_search = self.proc.poll() is None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()  # SIGKILL, a crash: nothing is cleaned up
            self.proc.wait()

    def result(self) -> KilledMidSearch:
        self._watcher.join()
        return self

    def stop(self) -> None:
        self.proc.kill()
        self.result()


@pytest.fixture(scope="module", autouse=True)
def fresh_processes(request, tmp_path_factory):
    """The run killed mid-search (``killed_run``), started as the module begins, so that it runs
    beside the uninterrupted run (``finished_run``) it is compared with."""
    return launch_collected(request, {"killed_run": lambda: KilledMidSearch(tmp_path_factory.mktemp("drpo") / "k")})


@pytest.fixture(scope="module")
def killed_run(fresh_processes):
    return fresh_processes["killed_run"].result()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted run: depth 2, beam 2, 2 actions, 4 training queries, short generations."""
    run = tmp_path_factory.mktemp("drpo") / "run"
    assert main([*SMALL, "--depth", "2", "--log-dir", str(run)]) == 0
    return run


def test_end_to_end_writes_every_output_and_the_artifact_is_what_automodel_uses(finished_run, capsys):
    run = finished_run
    out = run / "algo_output"
    for name in (
        "args.txt",
        "log.txt",
        "metrics_cache.json",
        "algo_output/output.json",
        "algo_output/trace.txt",
        "algo_output/optimized_prompt.json",
        "algo_output/checkpoint.json",
        "algo_output/usage.json",
        "algo_output/tree.html",
    ):
        assert (run / name).is_file(), name

    def strict(constant):  # NaN and Infinity are not JSON: other tools could not read the file
        raise AssertionError(f"non-standard JSON constant {constant}")

    tree = json.loads((out / "output.json").read_text(), parse_constant=strict)
    page = (out / "tree.html").read_text()  # the search tree's page, written with the tree
    assert page.count('<details id="node-') == len(tree["nodes"]) and not re.search(r"\b(src|href)=", page)
    json.loads((out / "optimized_prompt.json").read_text(), parse_constant=strict)
    assert tree["status"] == "finished" and tree["levels_done"] == 2
    assert tree["nodes"][0]["action"] == "init" and tree["nodes"][0]["prompt"] == "You are a helpful assistant."
    assert all(n["answer"] for n in tree["nodes"]) and {n["level"] for n in tree["nodes"]} == {0, 1}
    calls = tree["usage"]["run"]
    assert (
        calls["base"]["calls"] == len(tree["nodes"]) and calls["metrics"]["calls"] >= 2 and calls["eval"]["calls"] >= 2
    )
    assert calls["total"]["prompt_tokens"] > 0 and tree["wall_clock_s"] > 0
    args = json.loads((run / "args.txt").read_text())
    assert args["depth"] == 2 and args["command"] == "prompt"
    assert "level 0" in (out / "trace.txt").read_text()

    artifact = load_prompt_artifact(out / "optimized_prompt.json")
    assert artifact.method == "drpo" and artifact.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert artifact.provenance["judged_by_itself"] is True
    assert artifact.text == tree["result"]["prompt"]
    model = AutoModel(backend="transformers", prompt_path=out / "optimized_prompt.json")
    assert model.aligner.system_prompt() == artifact.text
    assert model.format_prompt("Hi", optimized_icl=False).prompt.startswith(f"<|im_start|>system\n{artifact.text}")

    # A rerun of the finished run answers everything from the request cache: no new requests.
    assert main([*SMALL, "--depth", "2", "--log-dir", str(run), "--resume"]) == 0
    assert usage(run)["process"]["total"]["calls"] == 0


def test_killed_mid_search_then_resumed_ends_like_an_uninterrupted_run(finished_run, killed_run):
    whole = finished_run
    expected = load_prompt_artifact(whole / "algo_output" / "optimized_prompt.json").text

    assert killed_run.killed_mid_search, "the run ended before it could be killed mid-search"
    killed = killed_run.run
    done_before = cache_rows(killed)
    assert not (killed / "algo_output" / "optimized_prompt.json").exists()

    # A budget too small for the next batch stops cleanly, sends nothing, and leaves the run resumable.
    spent = usage(killed)["run"]["total"]["calls"]
    assert main([*SMALL, "--depth", "2", "--log-dir", str(killed), "--resume", "--max-calls", str(spent)]) == 3
    assert cache_rows(killed) == done_before and usage(killed)["process"]["total"]["calls"] == 0

    assert main([*SMALL, "--depth", "2", "--log-dir", str(killed), "--resume"]) == 0
    assert load_prompt_artifact(killed / "algo_output" / "optimized_prompt.json").text == expected
    # Nothing finished before the kill was asked again, and nothing the whole run did not ask was asked.
    resumed_calls = usage(killed)["process"]["total"]["calls"]
    assert resumed_calls == cache_rows(whole) - done_before
    assert cache_rows(killed) == cache_rows(whole)


@pytest.mark.vllm
def test_an_engine_outage_stops_the_run_resumable_from_the_last_good_level(vllm_server, tmp_path, capsys):
    # Every role on a real vLLM OpenAI server; the outage is that server's address going dead.
    run = tmp_path / "run"
    remote = [*SMALL, "--backend", "openai", "--is-gpt", "true", "--depth", "2", "--log-dir", str(run)]
    checkpoint = run / "algo_output" / "checkpoint.json"
    # Level 1 only (the budget stops the run after it), then the engine goes away.
    level_one_calls = 1 + 3 + 3  # one base answer, its aspects and its judgement (each up to 3 attempts)
    assert main([*remote, "--base-url", vllm_server, "--max-calls", str(level_one_calls)]) == 3
    saved = checkpoint.read_text()
    assert json.loads(saved)["level"] == 1
    capsys.readouterr()
    from bench.vllm_server import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"
    assert main([*remote, "--base-url", dead, "--resume"]) == 4
    err = capsys.readouterr().err
    assert "stopped: Level 2: every base-model request failed" in err and "--resume" in err, err[-2000:]
    assert checkpoint.read_text() == saved  # the failed level was not saved over the good one
    tree = json.loads((run / "algo_output" / "output.json").read_text())
    assert tree["status"] == "stopped" and tree["levels_done"] == 1 and tree["result"]["node"] == 0
    # The engine is back: the run goes on from level 1 and finishes.
    assert main([*remote, "--base-url", vllm_server, "--resume"]) == 0
    tree = json.loads((run / "algo_output" / "output.json").read_text())
    assert tree["status"] == "finished" and tree["levels_done"] == 2
    assert all(n["answer"] for n in tree["nodes"])  # no node of the outage was kept
    assert load_prompt_artifact(run / "algo_output" / "optimized_prompt.json").text == tree["result"]["prompt"]


def test_a_checkpoint_saved_during_an_outage_by_an_older_version_resumes(finished_run, tmp_path):
    # Older versions checkpointed a level in which every base request failed: an empty beam that
    # made --resume fail. Such a checkpoint is rolled back to the last level with answers.
    from auto_model.trainer.search import BeamSearch
    from auto_model.trainer.tree import SearchConfig

    state = json.loads((finished_run / "algo_output" / "checkpoint.json").read_text())
    broken = dict(
        state,
        level=2,
        beam=[],
        finished=[],
        nodes=[n for n in state["nodes"] if n["level"] == 0]
        + [
            dict(n, answer=None, error="the base model failed: connection refused", path_rewards=[])
            for n in state["nodes"]
            if n["level"] == 1
        ],
    )
    path = tmp_path / "checkpoint.json"
    path.write_text(json.dumps(broken))
    config = SearchConfig(**state["config"])
    search = BeamSearch(None, None, None, config, state["queries"], state["initial_prompt"], path)
    assert search.load()
    assert (search.level, search.beam, search.finished) == (1, [0], [])
    assert [n.id for n in search.nodes] == [0] and json.loads(path.read_text())["level"] == 1


def test_dry_run_prints_the_plan(capsys):
    assert main(["--depth", "3", "--max-depth-increase", "0", "--beam-size", "2", "--n-actions", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 1 root + 2 levels x (2 x 3) candidates, each answered and judged; 3 levels of aspect choices.
    assert "base 13" in out and "eval 13" in out and "optimize 12" in out and "metrics 3" in out


def test_config_file_and_errors(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"depth": 5, "beam_size": 3, "n_actions": 1, "max_depth_increase": 0}))
    assert main(["--config", str(config), "--depth", "2", "--dry-run"]) == 0
    assert "base 4" in capsys.readouterr().out  # depth 2 from the command line, beam 3 x 1 action from the file
    config.write_text(json.dumps({"dpeth": 5}))
    assert main(["--config", str(config), "--dry-run"]) == 2
    assert "unknown parameters ['dpeth']" in capsys.readouterr().err
    assert main(["--depth", "0", "--dry-run"]) == 2
    assert "--depth must be >= 1" in capsys.readouterr().err
    assert main(["--batch-size", "0", "--dry-run"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert main(["icl", "--route", "safety", "--dry-run"]) == 2
    assert "use it with the prompt stage, not icl" in capsys.readouterr().err
    assert main(["--reward", "rm:nowhere", "--dry-run"]) == 2  # before any model loads
    assert "not a reward model folder" in capsys.readouterr().err
    assert main(["--depth", "2", "--reward", "metric:refusal", "--dry-run"]) == 0
    assert "metrics 0" in (out := capsys.readouterr().out) and "eval 0" in out  # no judge, no judge calls
    (tmp_path / "busy" / "algo_output").mkdir(parents=True)
    (tmp_path / "busy" / "algo_output" / "checkpoint.json").write_text("{}")
    assert main(["--log-dir", str(tmp_path / "busy")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_the_original_snake_case_flags_and_config_keys_still_work(tmp_path):
    from auto_model.trainer.cli import parse_args

    kebab = ["icl", "--base-model-name", "m", "--is-gpt", "yes", "--max-new-tokens", "64", "--ret-icl", "off"]
    snake = ["icl", "--base_model_name", "m", "--is_GPT", "yes", "--max_new_tokens=64", "--ret_icl", "off"]
    assert parse_args(kebab) == parse_args(snake)
    args, dry_run = parse_args(snake)
    assert args.stage == "icl" and not dry_run and args.is_gpt is True
    assert args.max_new_tokens == 64 and args.ret_icl is False
    assert parse_args([])[0].stage == "prompt" and parse_args(["--dry-run"])[1] is True
    # One flag per setting of the run's config, and its defaults are the config's.
    from auto_model.trainer.cli import parser
    from auto_model.trainer.config import DRPOConfig, field_names

    assert set(vars(parser().parse_args([]))) == {*field_names(), "config", "dry_run"}
    assert parse_args([])[0] == DRPOConfig()
    config = tmp_path / "run.toml"
    config.write_text('is_GPT = "true"\nmax-new-tokens = 32\nbeam_size = 3\n')
    args, _ = parse_args(["--config", str(config), "--beam-size", "1"])
    assert (args.is_gpt, args.max_new_tokens, args.beam_size) == (True, 32, 1)  # the command line wins


def test_one_integer_check_for_every_count_and_the_environment_lists(monkeypatch):
    import numpy as np

    from auto_model import constants
    from auto_model.errors import InvalidRequestError
    from auto_model.options import GenerationOptions

    assert [constants.is_whole(v, 1) for v in (1, np.int64(3), 0, True, 1.0, "2", None)] == [
        True, True, False, False, False, False, False,
    ]  # fmt: skip
    assert constants.is_whole(5, 1, 5) and not constants.is_whole(6, 1, 5) and constants.is_whole(-3)
    for bad in (True, 0, 2.0):  # the SDK's options refuse them through it
        with pytest.raises(InvalidRequestError, match="max_new_tokens must be an integer >= 1"):
            GenerationOptions(max_new_tokens=bad)
    monkeypatch.setenv("AUTO_MODEL_API_KEYS", " a-key ,, b-key,")
    assert constants.env_list("AUTO_MODEL_API_KEYS") == ["a-key", "b-key"]
    monkeypatch.setenv("AUTO_MODEL_METRICS_KEY", "")
    assert constants.env_value("AUTO_MODEL_METRICS_KEY") is None


def test_one_boolean_parser_for_flags_specs_and_the_environment(monkeypatch):
    from auto_model import constants
    from auto_model.evaluation.configs import parse_config_spec
    from auto_model.flags import ArgumentParser, parse_bool

    for word, value in (("Yes", True), ("on", True), ("1", True), ("FALSE", False), ("off", False), ("0", False)):
        assert parse_bool(word) is value
        monkeypatch.setenv("AUTO_MODEL_DEBUG", word)
        assert constants.debug() is value
        assert parse_config_spec(f"c: prompt={word}").optimized_prompt is value
    with pytest.raises(ValueError, match="expected true or false"):
        parse_bool("maybe")
    with pytest.raises(ValueError, match="kebab-case"):
        ArgumentParser().add_argument("--max_tokens")


def test_secrets_are_redacted_in_args(tmp_path):
    from argparse import Namespace

    from auto_model.trainer.cli import redacted

    assert redacted(Namespace(api_key="sk-123", depth=2, hf_token=None)) == {
        "api_key": "<redacted>",
        "depth": 2,
        "hf_token": None,
    }
    # Secrets by name, not by substring: token counts are settings (they were redacted before).
    shown = redacted(
        Namespace(
            max_new_tokens=512,
            judge_max_new_tokens=256,
            hf_token="hf_x",
            client_secret="s",
            openai_api_key="sk",
            keyword="k",
        )
    )
    assert shown == {
        "max_new_tokens": 512,
        "judge_max_new_tokens": 256,
        "hf_token": "<redacted>",
        "client_secret": "<redacted>",
        "openai_api_key": "<redacted>",
        "keyword": "k",
    }


@pytest.mark.slow
def test_icl_stage_with_a_reward_model_writes_a_pool_automodel_loads(small_rm, tmp_path):
    from auto_model.feedback.reward_model import RewardModel
    from auto_model.retrieval import load_icl_pool, save_icl_pool

    small_pool = tmp_path / "pool.json"
    save_icl_pool(load_icl_pool()[:2], small_pool)
    run = tmp_path / "icl"
    # The session's small reward model scores the answers: no metrics or eval model is loaded.
    args = ["icl", *SMALL, "--n-actions", "1", "--num-iters", "1", "--reward", f"rm:{small_rm.output}",
            "--judge-max-new-tokens", "48", "--icl-path", str(small_pool), "--log-dir", str(run)]  # fmt: skip
    assert main(args) == 0
    pool = load_icl_pool(run / "algo_output" / "ICL_examples.json")
    assert [ex.query for ex in pool] == [ex.query for ex in load_icl_pool(small_pool)]
    history = json.loads((run / "algo_output" / "icl_output.json").read_text())
    assert len(history["examples"]) == 2 and all(h["history"][0]["round"] == 0 for h in history["examples"])
    first = history["examples"][0]["history"][0]
    rm = RewardModel.load(small_rm.output)
    assert first["evaluation"]["reward"] == pytest.approx(rm.score([pool[0].query], [first["answer"]])[0], abs=1e-3)
    spent = usage(run)["run"]
    assert spent["eval"]["calls"] == 0 and spent["metrics"]["calls"] == 0 and spent["optimize"]["calls"] == 2
    model = AutoModel(backend="transformers", icl_path=run / "algo_output" / "ICL_examples.json")
    assert len(model.icl_pool) == 2


def test_a_constrained_judge_on_an_engine_that_cannot_constrain_stops_before_any_request(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*SMALL, "--depth", "1", "--judge-json-schema", "true", "--log-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert (
        "json_schema needs engines that constrain decoding" in err and "the metrics model runs on transformers" in err
    )
    assert usage(run)["run"]["total"]["calls"] == 0


def test_a_reward_model_and_a_metric_drive_the_search_without_a_judge(small_rm, tmp_path, capsys):
    run = tmp_path / "run"
    reward = f"rm:{small_rm.output},metric:refusal@2"
    args = [*SMALL, "--beam-size", "1", "--n-actions", "1", "--depth", "2", "--num-training-examples", "2",
            "--reward", reward, "--log-dir", str(run)]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "level  candidates  scored" in err  # the search's summary, level by level
    tree = json.loads((run / "algo_output" / "output.json").read_text())
    root = tree["nodes"][0]
    scores = root["evaluation"]["scores"]
    assert set(scores) == {"rm/Reward", "metric:refusal/refusal"}
    assert root["reward"] == pytest.approx(
        (scores["rm/Reward"]["score"] + 2 * scores["metric:refusal/refusal"]["score"]) / 3
    )
    assert [row["level"] for row in tree["levels"]] == [1, 2] and tree["levels"][0]["scored"] == 1
    spent = usage(run)["run"]
    assert spent["metrics"]["calls"] == 0 and spent["eval"]["calls"] == 0  # no judge model was asked
    with sqlite3.connect(run / "cache" / "requests.sqlite") as db:
        sent = [json.loads(r)["prompt"] for (r,) in db.execute("SELECT request FROM answers")]
    rewrite = [p for p in sent if "You improve system prompts" in str(p)]
    # The reward model gives no reasons: the optimizer reads the scores, not a reviewer's rationale.
    assert rewrite and "gives numbers, not reasons" in str(rewrite[0]) and "metric:refusal/refusal" in str(rewrite[0])
    artifact = load_prompt_artifact(run / "algo_output" / "optimized_prompt.json")
    assert artifact.provenance["reward"] == [f"rm:{small_rm.output}", "metric:refusal@2"]
    assert [row["level"] for row in artifact.provenance["levels"]] == [1, 2]


def test_a_route_prompt_is_trained_on_the_route_queries_answered_down_the_route(tmp_path):
    # Through the Python entry point: the config the command line builds, run by DRPO.
    from auto_model.artifacts import prompt_for_model
    from auto_model.constants import default_model
    from auto_model.errors import InvalidRequestError
    from auto_model.trainer import DRPO, DRPOConfig
    from auto_model.trainer.config import ORIGINAL_DEFAULT_PROMPT
    from auto_model.trainer.data import load_training_queries

    run, out = tmp_path / "run", tmp_path / "safety.json"
    small = dict(backend="transformers", dtype="float32", beam_size=2, n_actions=2, max_new_tokens=24,
                 judge_max_new_tokens=48, disable_tqdm=True, seed=3)  # fmt: skip
    config = DRPOConfig(**small, depth=1, num_training_examples=1, route="safety", log_dir=str(run), output=str(out))
    with pytest.raises(InvalidRequestError, match="--depth must be >= 1"):  # checked when made, as the flags are
        DRPOConfig(**small, depth=0)
    drpo = DRPO(config)
    result = drpo.run()
    own = prompt_for_model(default_model())
    assert result.output == out and str(out) in result.summary and "level  candidates" in str(result.table)
    # The run's own config says what it used (the route's prompt and examples); the caller's is unchanged.
    assert (drpo.config.initial_system_prompt, drpo.config.k) == (own.prompt_for("safety"), own.examples_for("safety"))
    assert (config.initial_system_prompt, config.k, config.base_model_name) == (ORIGINAL_DEFAULT_PROMPT, None, None)
    assert drpo.usage.snapshot()["run"]["base"]["calls"] > 0
    tree = json.loads((run / "algo_output" / "output.json").read_text())
    root = tree["nodes"][0]
    harmful = {r["query"] for r in load_training_queries() if r.get("category") == "harmful"}
    assert root["query"] in harmful and root["prompt"] == own.prompt_for("safety")  # its queries, its prompt
    with sqlite3.connect(run / "cache" / "requests.sqlite") as db:
        sent = [json.loads(r)["prompt"] for (r,) in db.execute("SELECT request FROM answers")]
    base = [p for p in sent if root["query"] in str(p) and own.prompt_for("safety") in str(p)]
    assert base and str(base[0]).count("Sorry") >= 2  # down the safety route: its examples are refusals
    artifact = load_prompt_artifact(out)
    assert artifact.routes["safety"] == tree["result"]["prompt"]
    assert (
        artifact.route_provenance["safety"]["method"] == "drpo"
        and artifact.route_provenance["safety"]["route"] == "safety"
    )
    # The rest of the model's artifact is kept: its everyday prompt and its routing.
    assert artifact.system_prompt == own.system_prompt and artifact.routing == own.routing
    assert artifact.model_id == default_model()


def test_credentials_in_an_address_are_redacted_in_args_and_reports():
    from argparse import Namespace

    from auto_model.logs import redact_url
    from auto_model.trainer.cli import redacted

    shown = redacted(Namespace(base_url="https://user:pw@api.example/v1?api_key=sk-9&x=2", judge_base_url=None))
    assert shown == {"base_url": "https://[redacted]@api.example/v1?api_key=[redacted]&x=2", "judge_base_url": None}
    assert redact_url("http://127.0.0.1:8001/v1") == "http://127.0.0.1:8001/v1"  # nothing to hide: unchanged
    assert redact_url("http://h/v1?token=abc&Signature=x") == "http://h/v1?token=[redacted]&Signature=[redacted]"
