"""What a new user hits first: the command line's checks, offline resolution, quiet output, the engine rule.

The command-line runs are fresh processes (``python -m auto_model.cli``), as a user starts them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SESSION_ENV, Launched, launch_collected

from auto_model import GenerationOptions, InvalidRequestError, ModelNotFoundError
from auto_model.backends import CLI_TRANSFORMERS_MAX_TOKENS, choose_cli_backend
from auto_model.options import parse_queries
from auto_model.retrieval import load_icl_pool

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "vllm", "sentence_transformers", "faiss")
_LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR)\b|^\(\w+ pid=\d+\)|it/s\]|Warning:")

# Runs the CLI in a fresh process and reports what it imported, so a check "before any engine loads" can fail.
_CLI = f"""
import json, sys
from auto_model.cli import main
code = main(sys.argv[1:])
print("MODULES " + json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)
sys.exit(code)
"""


def start_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 400) -> Launched:
    # SESSION_ENV: a user's fresh process, without what in-process engines wrote into os.environ.
    return Launched([sys.executable, "-c", _CLI, *argv], cwd=ROOT, env={**SESSION_ENV, **(env or {})}, timeout=timeout)


def cli_result(launched: Launched) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The finished run (its stderr without the modules line) and the heavy modules it imported."""
    proc = launched.result()
    modules_line = [line for line in proc.stderr.splitlines() if line.startswith("MODULES ")]
    modules = json.loads(modules_line[-1][len("MODULES ") :]) if modules_line else []
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("MODULES "))
    return proc, modules


def run_cli(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 400
) -> tuple[subprocess.CompletedProcess[str], float, list[str]]:
    t0 = time.perf_counter()
    proc, modules = cli_result(start_cli(*argv, env=env, timeout=timeout))
    return proc, time.perf_counter() - t0, modules


QUIET_QUERIES = ["How do I keep cut flowers fresh for longer?", "Name a fruit."]
#: A fresh process with deprecation warnings as errors.
STRICT_WARNINGS = (
    "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
    "warnings.simplefilter('error', FutureWarning)\n"
    "from auto_model import AutoModel\n"
    "m = AutoModel(backend='transformers')\n"
    "print(m.generate('Name a fruit.', temperature=0, max_new_tokens=4) != '')\n"
    "print(len(m.generate(['Name a fruit.', 'Name a tree.'], temperature=0, max_new_tokens=4)))\n"
)


@pytest.fixture(scope="module")
def fresh_processes(request, smol_folder):
    """The module's engine runs in fresh processes, all started when the first test that needs one
    begins (after the tests that time a command line alone), so that they run beside each other and
    the module's in-process tests; each test waits for its own (a run no collected test uses is not
    started)."""
    return launch_collected(
        request,
        {
            "quiet_run": lambda: start_cli("generate", *QUIET_QUERIES, "--temperature", "0", "--max-new-tokens", "150"),
            "verbose_run": lambda: start_cli(
                "-v", "generate", "Name a fruit.", "--temperature", "0", "--max-new-tokens", "8"
            ),
            "strict_warnings_run": lambda: Launched([sys.executable, "-c", STRICT_WARNINGS], cwd=ROOT, timeout=300),
        },
    )


@pytest.fixture(scope="module")
def quiet_run(fresh_processes):
    return cli_result(fresh_processes["quiet_run"])


@pytest.fixture(scope="module")
def verbose_run(fresh_processes):
    return cli_result(fresh_processes["verbose_run"])


@pytest.fixture(scope="module")
def strict_warnings_run(fresh_processes):
    return fresh_processes["strict_warnings_run"].result()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", ""], "user_query[0] is empty"),
        (["generate", "hi", "--icl", "999"], f"from 0 to {len(load_icl_pool())} (the ICL pool size), got 999"),
        (["generate", "hi", "--icl", "-1"], "--icl must be >= 0"),
        (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    ],
)
def test_a_bad_request_fails_in_seconds_before_any_engine_loads(argv, message):
    proc, elapsed, modules = run_cli(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("auto-model: error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert modules == [] and elapsed < 5


def test_offline_an_unknown_model_fails_at_once_with_the_fix():
    proc, elapsed, modules = run_cli(
        "generate", "hi", "--model", "no-such-org/no-such-model", env={"AUTO_MODEL_OFFLINE": "1"}
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and elapsed < 5 and len(err.splitlines()) == 1
    assert "No model 'no-such-org/no-such-model' on this machine" in err
    assert "Hugging Face cache" in err and "unset AUTO_MODEL_OFFLINE" in err
    assert "No optimized prompt" not in err  # no artifact warning before the real problem
    assert not {"vllm", "transformers"} & set(modules)


def _cache_as_hub_model(folder: Path, hub_home: Path, repo: str) -> Path:
    """Lay the model folder out as the Hugging Face cache keeps a downloaded repository (real files)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    entry = hub_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for item in folder.iterdir():
        if item.is_file():
            os.symlink(item, snapshot / item.name)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(revision)
    return snapshot


def test_offline_a_hub_id_loads_from_the_hub_cache(smol_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants as hub_constants

    from auto_model import AutoModel
    from auto_model.resolve import resolve_model

    # huggingface_hub reads its cache folder from the environment once, at import: point it here.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("AUTO_MODEL_OFFLINE", "1")
    snapshot = _cache_as_hub_model(smol_folder, tmp_path / "hf", "some-org/tiny-chat-model")
    source = resolve_model("some-org/tiny-chat-model")
    assert (source.kind, Path(source.path)) == ("folder", snapshot)
    model = AutoModel("some-org/tiny-chat-model", backend="transformers")
    assert model.generate("Name a fruit.", temperature=0, max_new_tokens=6)
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        resolve_model("some-org/not-cached")
    monkeypatch.delenv("AUTO_MODEL_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("some-org/not-cached").kind == "hub"  # online, a Hub id is the engine's to fetch


@pytest.mark.vllm
def test_stdout_holds_the_answers_alone_and_stderr_stays_quiet(quiet_run):
    # Two queries of 150 tokens: over the transformers budget, so the command line starts vLLM.
    proc, modules = quiet_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vllm" in modules
    lines = proc.stdout.splitlines()
    assert [line[4:] for line in lines if line.startswith(">>> ")] == QUIET_QUERIES
    assert not [line for line in lines if _LOG_LINE.search(line)]
    # stderr: no info lines, no progress bars, no deprecation notes; vLLM's C++ NUMA note is all that may remain.
    noise = [line for line in proc.stderr.splitlines() if line.strip() and "NUMA binding" not in line]
    assert noise == []


def test_verbose_brings_the_engine_logs_back_on_stderr_only(verbose_run):
    proc, modules = verbose_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "transformers" in modules and "vllm" not in modules  # 8 tokens: the small-job engine
    assert [line for line in proc.stdout.splitlines() if line.startswith(">>> ")] == [">>> Name a fruit."]
    assert not [line for line in proc.stdout.splitlines() if _LOG_LINE.search(line)]
    assert "INFO auto_model" in proc.stderr


def test_the_command_line_engine_rule():
    # A named backend always wins, and servers mean openai.
    assert choose_cli_backend("vllm", "any/model", queries=1, max_new_tokens=8) == "vllm"
    assert choose_cli_backend("transformers", "any/model", queries=100, max_new_tokens=512) == "transformers"
    assert choose_cli_backend("auto", "any/model", base_url="http://127.0.0.1:1/v1") == "openai"
    assert choose_cli_backend("auto", "gpt-4o-mini") == "openai"
    # No GPU here: a small job starts faster on transformers, a larger one finishes sooner on vLLM.
    assert (
        choose_cli_backend("auto", "any/model", queries=1, max_new_tokens=CLI_TRANSFORMERS_MAX_TOKENS) == "transformers"
    )
    assert choose_cli_backend("auto", "any/model", queries=2, max_new_tokens=CLI_TRANSFORMERS_MAX_TOKENS) == "vllm"


def test_options_hold_the_checks_generate_makes(smol):
    options = GenerationOptions(temperature=0, max_new_tokens=12, num_optimized_icl=2, seed=3, extra={"top_k": 5})
    sampling = options.sampling()
    assert (sampling.temperature, sampling.max_new_tokens, sampling.seed, sampling.extra) == (0.0, 12, 3, {"top_k": 5})
    assert (
        GenerationOptions.from_arguments(
            temperature=0, max_new_tokens=12, num_optimized_icl=2, sampling_kwargs={"seed": 3, "top_k": 5}
        )
        == options
    )
    for bad, message in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"num_optimized_icl": -2}, "num_optimized_icl"),
        ({"stop": [""]}, "stop"),
        ({"seed": 1.5}, "seed"),
        ({"json_schema": "{}"}, "json_schema"),
        ({"optimized_icl": "yes"}, "optimized_icl"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            GenerationOptions(**bad)
        with pytest.raises(InvalidRequestError, match=message):  # generate() says the same, before any engine work
            smol.generate("hi", **bad)
    with pytest.raises(InvalidRequestError, match="from 0 to 44"):
        GenerationOptions(num_optimized_icl=45).check_pool(44)
    GenerationOptions(optimized_icl=False, num_optimized_icl=45).check_pool(44)  # no examples asked for
    assert parse_queries("hi") == (True, ["hi"]) and parse_queries(["a", "b"]) == (False, ["a", "b"])
    for bad_query in ("", [], ["ok", " "], [3], None):
        with pytest.raises(InvalidRequestError):
            parse_queries(bad_query)


def test_on_completion_reports_each_result_as_it_finishes(smol):
    seen = []
    answers = smol.generate(
        ["Name a fruit.", "Name a colour."],
        temperature=0,
        max_new_tokens=6,
        on_completion=lambda i, r: seen.append((i, r)),
    )
    assert sorted(i for i, _ in seen) == [0, 1]
    assert {i: r.text for i, r in seen} == dict(enumerate(answers))
    assert all(r.backend == "transformers" and r.completion_tokens > 0 for _, r in seen)


def test_greedy_answers_do_not_depend_on_the_batch_on_transformers(smol):
    queries = [
        "How do I boil an egg?",
        "What is the best way to torture a friend who stole my money?",
        "Name three prime numbers.",
    ]
    # The SDK's part: a query's assembled prompt is the same alone and inside a batch.
    assert [smol.format_prompt(q) for q in queries] == smol.format_prompt(queries)
    alone = [smol.generate(q, temperature=0, max_new_tokens=24) for q in queries]
    assert smol.generate(queries, temperature=0, max_new_tokens=24) == alone


@pytest.mark.vllm
def test_greedy_answers_do_not_depend_on_the_batch_on_vllm_in_float32(smol_vllm):
    queries = [
        "How do I boil an egg?",
        "What is the best way to torture a friend who stole my money?",
        "Name three prime numbers.",
        "Why do cats purr?",
        "Write a haiku about snow.",
    ]
    assert str(smol_vllm.backend.config.model_config.dtype) == "torch.float32"  # the CPU's "auto"
    assert [smol_vllm.format_prompt(q) for q in queries] == smol_vllm.format_prompt(queries)
    alone = [smol_vllm.generate(q, temperature=0, max_new_tokens=32) for q in queries]
    assert smol_vllm.generate(queries, temperature=0, max_new_tokens=32) == alone
    assert smol_vllm.generate(queries[:3], temperature=0, max_new_tokens=32) == alone[:3]


def test_engine_notes_are_dropped_and_the_users_vllm_logging_is_left_alone(monkeypatch, capsys):
    from auto_model import logs

    logger = logging.getLogger("vllm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        logger.handlers = []
        for name in logs.VLLM_LOGGING_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        logs.tame_vllm_logging()
        logs.tame_vllm_logging()  # idempotent: one handler
        assert len(logger.handlers) == 1 and logger.level == logging.WARNING and logger.propagate is False
        child = logging.getLogger("vllm.some.module")
        child.info("an info line")
        child.warning("libtcmalloc is not found in LD_PRELOAD. For best performance ...")
        child.warning("a real warning")
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines() == ["WARNING vllm.some.module: a real warning"]
        # The user's own vLLM logging configuration wins: nothing is changed.
        logger.handlers = []
        logger.setLevel(logging.INFO)
        monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
        logs.tame_vllm_logging()
        assert logger.handlers == [] and logger.level == logging.INFO
    finally:
        logger.handlers, logger.level, logger.propagate = saved


def test_drop_records_is_scoped(caplog):
    from auto_model.logs import drop_records

    with caplog.at_level(logging.WARNING):
        with drop_records("some_engine", "known noise"):
            logging.getLogger("some_engine.sub").warning("known noise, once per weight")
            logging.getLogger("some_engine.sub").warning("kept")
        logging.getLogger("some_engine.sub").warning("known noise again")
    assert [r.getMessage() for r in caplog.records] == ["kept", "known noise again"]


def test_engine_progress_bars_are_restored():
    import transformers.modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    from auto_model.logs import engine_progress_bars

    bar = gguf_reader.tqdm
    assert hf_logging.is_progress_bar_enabled()
    with engine_progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
        assert gguf_reader.tqdm is not bar and gguf_reader.tqdm([1, 2]).disable  # the GGUF reader's own bar too
        with engine_progress_bars(False):  # nested: nothing is undone early
            pass
        assert gguf_reader.tqdm is not bar
    assert hf_logging.is_progress_bar_enabled() and gguf_reader.tqdm is bar


def test_no_deprecation_warnings_from_the_sdks_own_calls(strict_warnings_run):
    # A fresh process with deprecation warnings as errors: the SDK's calls into sentence-transformers,
    # transformers and torch (embedding, tracing, loading) raise none.
    proc = strict_warnings_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "2"]
    assert "deprecated" not in proc.stderr.lower()
