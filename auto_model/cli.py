"""``auto-model``: the command line.

    auto-model generate "How do I brew tea?" "Another question" --temperature 0
    auto-model generate --input queries.jsonl --output answers.jsonl

Known errors print one readable line (exit 2); set ``AUTO_MODEL_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from auto_model import constants
from auto_model.errors import ArtifactError, AutoModelError, InvalidRequestError, MissingDependencyError
from auto_model.files import atomic_open, read_query_rows
from auto_model.flags import ArgumentParser, add_replica_flags, replica_options
from auto_model.logs import configure_cli_logging, redact_url

logger = logging.getLogger("auto_model.cli")


#: ``auto-model serve``'s limits on a request body (:class:`~auto_model.server.ServerLimits`): flag, default, what
_BODY_LIMITS = (
    ("--max-stop", 8, "stop strings in a request"),
    ("--max-stop-chars", 200, "characters in a stop string"),
    ("--max-messages", 256, "messages in a conversation"),
    ("--max-parts", 64, "content parts in a message"),
    ("--max-prompts", 64, "prompts in a /v1/completions request"),
    ("--max-depth", 32, "levels of nesting in a request body"),
)


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="auto-model", description="Aligned answers from any LLM, without fine-tuning.")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log to stderr: -v info (engines included), -vv debug; default: warnings only",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer queries with the optimized prompt and in-context examples")
    gen.add_argument("queries", nargs="*", metavar="QUERY", help="queries to answer (or use --input)")
    gen.add_argument(
        "--model", default=None, help=f"model name, folder or .gguf file (default: {constants.DEFAULT_MODEL})"
    )
    gen.add_argument(
        "--backend",
        default="auto",
        help="engine: auto, vllm, openai or transformers (auto on a machine without a GPU: see docs/usage.md)",
    )
    gen.add_argument(
        "--base-url",
        default=None,
        help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (the key comes from OPENAI_API_KEY); "
        "several, comma-separated, are replicas of one model",
    )
    gen.add_argument("--system-prompt", default=None, help="your own system prompt (replaces the optimized one)")
    gen.add_argument("--no-optimized-prompt", action="store_true", help="do not inject the optimized system prompt")
    gen.add_argument(
        "--icl", type=int, default=None, metavar="N",
        help="in-context examples to inject (0 disables; default: the artifact's number for the route, else 3)",
    )  # fmt: skip
    gen.add_argument("--prompt-path", default=None, help="prompt artifact (.json) or plain-text prompt (.txt)")
    gen.add_argument("--icl-path", default=None, help="ICL pool JSON to retrieve examples from")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--max-new-tokens", type=int, default=512)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    add_best_of(gen, "sample N answers per query in one engine call and print the one --reward-model scores highest")
    gen.add_argument(
        "--input",
        default=None,
        metavar="FILE.jsonl",
        help="queries, one per line: a JSON string or an object with a 'query' field",
    )
    gen.add_argument(
        "--output", default=None, metavar="FILE.jsonl", help="write answers as JSON lines (default: print)"
    )
    gen.add_argument(
        "--resume",
        action="store_true",
        help="with --input and --output: keep the answers --output already holds (of a run that was stopped) and "
        "answer only the rest",
    )
    add_replica_flags(gen)
    gen.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr for --input (default: only when stderr is a terminal)",
    )
    serve = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API, its alignment applied")
    serve.add_argument(
        "--model", default=None, help=f"model name, folder or .gguf file (default: {constants.DEFAULT_MODEL})"
    )
    serve.add_argument("--backend", default="auto", help="in-process engine: auto, vllm or transformers")
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("--prompt-path", default=None, help="prompt artifact (.json) or plain-text prompt (.txt)")
    serve.add_argument("--icl-path", default=None, help="ICL pool JSON to retrieve examples from")
    serve.add_argument("--served-model-name", default=None, help="the name clients ask for (default: --model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="a key clients must send (repeatable; also AUTO_MODEL_API_KEYS, comma-separated)",
    )
    serve.add_argument(
        "--insecure", action="store_true", help="allow listening on a non-loopback address without a key"
    )
    serve.add_argument(
        "--upstream",
        default=None,
        metavar="URL",
        help="forward to this OpenAI-compatible server (e.g. http://127.0.0.1:8001/v1) instead of running the "
        "model in-process; --model is then its name there",
    )
    serve.add_argument(
        "--upstream-api-key",
        default=None,
        help="the upstream's key (default: AUTO_MODEL_UPSTREAM_API_KEY, better: a command line is visible to other "
        "users); never logged or returned",
    )
    serve.add_argument(
        "--client-system",
        default="prepend",
        choices=("prepend", "replace", "drop"),
        help="a client's own system message: prepend (the optimized prompt first, the client's after it; "
        "default), replace (it replaces the optimized prompt) or drop (ignored)",
    )
    serve.add_argument(
        "--key-file", default=None, metavar="PATH",
        help="a JSON file of keys and what each may do (or AUTO_MODEL_KEY_FILE): "
        '{"keys": [{"key": "sk-...", "name": "app", "may": ["override_alignment", "skip_answer_check"], '
        '"requests_per_minute": 60}]}',
    )  # fmt: skip
    serve.add_argument(
        "--metrics-key", default=None, metavar="KEY",
        help="the key /metrics needs (Authorization: Bearer KEY; or AUTO_MODEL_METRICS_KEY); with --api-key, any "
        "API key works too; without either, /metrics is open",
    )  # fmt: skip
    serve.add_argument(
        "--forward-field", action="append", default=[], metavar="NAME",
        help="with --upstream: forward this request field too (repeatable); the fields that would reveal or "
        "bypass the alignment (echo, chat_template, ...) cannot be",
    )  # fmt: skip
    serve.add_argument(
        "--allow-alignment-override",
        action="store_true",
        help='let a request switch its alignment with "auto_model": {"optimized_prompt": ..., "optimized_icl": '
        '..., "num_optimized_icl": ...} (refused by default)',
    )
    serve.add_argument(
        "--unchecked-key",
        action="append",
        default=[],
        help='a key (one of --api-key) whose requests may turn the answer check off with "auto_model": '
        '{"check_answers": false} (repeatable; also AUTO_MODEL_UNCHECKED_KEYS, comma-separated)',
    )
    serve.add_argument(
        "--check-window",
        type=int,
        default=None,
        metavar="CHARS",
        help="characters of a streamed answer between two answer checks (default: the artifact's, 200); a client "
        "sees only text that passed a check",
    )
    serve.add_argument("--icl", type=int, default=None, metavar="N",
                       help="in-context examples to inject (default: the artifact's, else 3)")  # fmt: skip
    add_best_of(serve, "answer each sampled, non-streaming request with the best of N samples by --reward-model")
    serve.add_argument(
        "--max-tokens", "--max-tokens-cap", dest="max_tokens", type=int, default=4096,
        help="the most new tokens a request may ask for (4096); without max_tokens, an upstream request gets "
        "this, an in-process one 512",
    )  # fmt: skip
    serve.add_argument(
        "--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get a 413 (4 MiB)"
    )
    serve.add_argument("--max-queue", type=int, default=256, help="requests that may wait; beyond it a 429 (256)")
    serve.add_argument(
        "--max-concurrency", type=int, default=64, help="requests in flight to the upstream at once (64)"
    )
    serve.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a 504 (600)")
    serve.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive; a 408 beyond (30)"
    )
    serve.add_argument(
        "--batch-window-ms",
        type=float,
        default=10.0,
        help="in-process: milliseconds to wait for more requests to batch with the first (10)",
    )
    serve.add_argument("--max-batch", type=int, default=16, help="in-process: most requests per engine call (16)")
    for flag, default, what in _BODY_LIMITS:
        serve.add_argument(flag, type=int, default=default, help=f"the most {what}; beyond it a 400 ({default})")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (uvicorn's workers); in-process, each loads its own engine (1)",
    )
    return parser


def _serve(args: argparse.Namespace) -> int:
    """Check the options, load the model, and serve it until interrupted."""
    import ipaddress
    import os

    from auto_model.options import GenerationOptions
    from auto_model.retrieval import load_icl_pool

    try:
        import uvicorn

        from auto_model.server import ServerLimits, Upstream
        from auto_model.server.factory import OPTIONS_ENV, build
        from auto_model.server.protocol import check_forward_fields
        from auto_model.server.security import check_key, load_key_file
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "fastapi", "serve", purpose="to serve a model") from exc

    keys = [k for k in args.api_key if k] + constants.env_list("AUTO_MODEL_API_KEYS")
    unchecked = [k for k in args.unchecked_key if k] + constants.env_list("AUTO_MODEL_UNCHECKED_KEYS")
    key_file = args.key_file or constants.env_value("AUTO_MODEL_KEY_FILE")
    file_keys = [policy.key for policy in load_key_file(key_file)] if key_file else []  # checked before loading
    if set(unchecked) - set(keys + file_keys):
        raise InvalidRequestError(
            "--unchecked-key must be one of the server's keys (--api-key or AUTO_MODEL_API_KEYS)."
        )
    for key in [*keys, *unchecked, *([args.metrics_key] if args.metrics_key else [])]:
        check_key(key)
    if args.check_window is not None:
        from auto_model.answer_check import check_window

        check_window(args.check_window)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not (keys or file_keys) and not args.insecure:
        raise InvalidRequestError(
            f"Refusing to listen on {args.host} without an API key: pass --api-key (or AUTO_MODEL_API_KEYS), "
            "or --insecure to serve it open."
        )
    if not 0 < args.port < 65536:
        raise InvalidRequestError(f"--port must be in 1..65535, got {args.port}.")
    if args.icl is not None and args.icl < 0:
        raise InvalidRequestError(f"--icl must be >= 0, got {args.icl}.")
    if args.backend not in ("auto", "vllm", "transformers"):
        raise InvalidRequestError(f"--backend must be auto, vllm or transformers, got {args.backend!r}.")
    GenerationOptions(num_optimized_icl=args.icl).check_pool(len(load_icl_pool(args.icl_path)))
    limits = {
        "max_body_bytes": args.max_body_bytes,
        "max_tokens": args.max_tokens,
        "max_queue": args.max_queue,
        "max_concurrency": args.max_concurrency,
        "request_timeout": args.request_timeout,
        "body_timeout": args.body_timeout,
        "batch_window": args.batch_window_ms / 1000,
        "max_batch": args.max_batch,
        **{flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in _BODY_LIMITS},
    }
    ServerLimits(**limits)  # checked before anything loads
    check_forward_fields(args.forward_field)
    if args.upstream:
        if not args.model:
            raise InvalidRequestError("--upstream needs --model: the model's name on the upstream server.")
        Upstream(args.upstream)
    if args.workers < 1:
        raise InvalidRequestError(f"--workers must be >= 1, got {args.workers}.")
    check_best_of(args.best_of, args.reward_model)
    upstream_key = args.upstream_api_key or os.environ.get("AUTO_MODEL_UPSTREAM_API_KEY")
    options = {
        "model": args.model,
        "backend": args.backend,
        "dtype": args.dtype,
        "prompt_path": args.prompt_path,
        "icl_path": args.icl_path,
        "served_model_name": args.served_model_name,
        "client_system": args.client_system,
        "icl": args.icl,
        "upstream": args.upstream,
        "allow_alignment_override": args.allow_alignment_override,
        "limits": limits,
        "best_of": args.best_of,
        "reward_model": args.reward_model,
        "check_window": args.check_window,
        "hosts": [args.host],
        "forward_fields": args.forward_field,
        "key_file": key_file,
    }
    metrics_key = args.metrics_key or constants.env_value("AUTO_MODEL_METRICS_KEY")
    name = args.served_model_name or args.model or constants.default_model()
    target = f" in front of {redact_url(args.upstream)}" if args.upstream else ""
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    if args.workers > 1:
        # Each worker process builds its own app from the options; the keys travel in the environment
        # (never in a file), as they may have come.
        os.environ[OPTIONS_ENV] = json.dumps(options)
        os.environ["AUTO_MODEL_API_KEYS"] = ",".join(keys)
        os.environ["AUTO_MODEL_UNCHECKED_KEYS"] = ",".join(unchecked)
        if metrics_key:
            os.environ["AUTO_MODEL_METRICS_KEY"] = metrics_key
        if upstream_key:
            os.environ["AUTO_MODEL_UPSTREAM_API_KEY"] = upstream_key
        print(f"auto-model: serving {name} on http://{args.host}:{args.port}/v1{target}{workers} (Ctrl-C stops)",
              file=sys.stderr)  # fmt: skip
        uvicorn.run("auto_model.server.factory:app_from_env", factory=True, workers=args.workers, host=args.host,
                    port=args.port, log_level="warning")  # fmt: skip
        return 0
    app, model = build({**options, "api_keys": keys, "unchecked_keys": unchecked,
                        "upstream_api_key": upstream_key, "metrics_key": metrics_key})  # fmt: skip
    try:
        print(f"auto-model: serving {name} on http://{args.host}:{args.port}/v1{target} (Ctrl-C stops)",
              file=sys.stderr)  # fmt: skip
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        model.close()
    return 0


def _read_input(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Queries from a JSONL file, plus one error row per bad line (bad lines never stop the good ones)."""
    try:
        rows = [
            {"line": number, **({"error": row["error"]} if "error" in row else {"query": row["query"]})}
            for number, row in read_query_rows(path, skip_bad=True)
        ]
    except ArtifactError as exc:
        raise InvalidRequestError(f"--input: {exc}") from exc
    return [r["query"] for r in rows if "query" in r], rows


def _finished_rows(output: Path, rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The answered rows an earlier run of the same --input left in ``output``, by input line (a line
    cut off by a kill, an error row or a row of another input is not kept)."""
    queries = {r["line"]: r["query"] for r in rows if "query" in r}
    done: dict[int, dict[str, Any]] = {}
    if not output.is_file():
        return done
    for text in output.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(text)
        except ValueError:
            continue
        if isinstance(row, dict) and "answer" in row and queries.get(row.get("line")) == row.get("query"):
            done[row["line"]] = row
    return done


def _jsonl(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def add_best_of(parser: argparse.ArgumentParser, what: str) -> None:
    """``--best-of N`` (``what`` it does here) and the ``--reward-model`` that chooses."""
    parser.add_argument("--best-of", type=int, default=1, metavar="N", help=f"{what} (default 1)")
    parser.add_argument("--reward-model", default=None, help="reward model folder (auto-model-rm train) for --best-of")


def check_best_of(best_of: int, reward_model: str | None) -> None:
    """``--best-of`` and ``--reward-model``, checked before any engine loads."""
    if best_of < 1:
        raise InvalidRequestError(f"--best-of must be >= 1, got {best_of}.")
    if best_of > 1 and not reward_model:
        raise InvalidRequestError(f"--best-of {best_of} needs --reward-model PATH (a folder from auto-model-rm train).")
    if reward_model:
        from auto_model.rewards.reward_model import check_reward_model_folder

        check_reward_model_folder(reward_model, "--reward-model")


def _generate(args: argparse.Namespace) -> int:
    from auto_model.backends import choose_cli_backend
    from auto_model.model import AutoModel
    from auto_model.options import GenerationOptions, parse_queries
    from auto_model.retrieval import load_icl_pool

    rows: list[dict[str, Any]]
    if args.input:
        if args.queries:
            raise InvalidRequestError("Pass queries either as arguments or with --input, not both.")
        queries, rows = _read_input(args.input)
        if not queries:
            raise InvalidRequestError(f"No queries to answer: every line of {args.input} is empty or bad.")
    else:
        if not args.queries:
            raise InvalidRequestError("No queries to answer: pass QUERY arguments or --input FILE.jsonl.")
        _, queries = parse_queries(list(args.queries))  # the checks generate() makes, before any engine loads
        rows = [{"query": q} for q in queries]
    # The whole request is checked before the (slow) engine load, with the checks generate() makes.
    if args.icl is not None and args.icl < 0:
        raise InvalidRequestError(f"--icl must be >= 0, got {args.icl}.")
    options = GenerationOptions(
        user_specified_system_prompt=args.system_prompt,
        optimized_prompt=not args.no_optimized_prompt,
        optimized_icl=args.icl != 0,
        num_optimized_icl=args.icl,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        best_of=args.best_of,
    )
    options.check_pool(len(load_icl_pool(args.icl_path)))
    check_best_of(args.best_of, args.reward_model)
    output = Path(args.output) if args.output else None
    done: dict[int, dict[str, Any]] = {}
    if args.resume:
        if output is None or not args.input:
            raise InvalidRequestError("--resume goes with --input and --output: it keeps the answers --output holds.")
        done = _finished_rows(output, rows)
    backend = choose_cli_backend(
        args.backend,
        args.model or constants.default_model(),
        base_url=args.base_url,
        queries=len(queries),
        max_new_tokens=args.max_new_tokens,
    )
    query_rows = [r for r in rows if "query" in r]
    input_errors = len(rows) - len(query_rows)
    for row in query_rows:
        row.update(done.get(row.get("line", -1), {}))
    todo = [i for i, r in enumerate(query_rows) if "answer" not in r]
    # stdout is for the answers, printed once the engines are closed; until then it is stderr (on a Ray
    # cluster, Ray's driver prints cluster events such as "(raylet) A worker died" on stdout).
    with contextlib.redirect_stdout(sys.stderr):
        model = AutoModel(
            args.model,
            dtype=args.dtype,
            backend=backend,
            prompt_path=args.prompt_path,
            icl_path=args.icl_path,
            reward_model=args.reward_model,
            **({"base_url": args.base_url} if args.base_url else {}),
            **replica_options(args, backend),
        )
        partial = None
        if output is not None:
            # Finished answers are appended as they arrive, so a crash loses nothing done; the file is
            # rewritten in input order at the end. A resumed run starts it from the answers it keeps.
            output.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(output) as fh:
                fh.writelines(_jsonl(r) for r in rows if "error" in r or "answer" in r)
            partial = output.open("a", encoding="utf-8")
        show_progress = args.progress if args.progress is not None else bool(args.input) and sys.stderr.isatty()
        progress = None
        if show_progress:
            from tqdm import tqdm

            progress = tqdm(total=len(todo), desc="generating", unit="query", file=sys.stderr)

        def finished(j: int, result: Any) -> None:
            i = todo[j]
            if isinstance(result, BaseException):  # this query failed; the others go on
                query_rows[i]["error"] = f"{type(result).__name__}: {result}"
            else:
                query_rows[i].update(
                    answer=result.text,
                    finish_reason=result.finish_reason,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                )
                if result.candidates:
                    query_rows[i]["candidates"] = [{"text": c.text, "score": c.score} for c in result.candidates]
            if progress is not None:
                progress.update(1)
            if partial is not None:
                partial.write(_jsonl(query_rows[i]))
                partial.flush()

        try:
            if todo:
                model.generate(
                    [queries[i] for i in todo], options=options, return_exceptions=True, on_completion=finished
                )
            if model.replica_stats():
                from auto_model.backends.replicas import stats_table

                print(stats_table(model.replica_stats()), file=sys.stderr)
        finally:
            if progress is not None:
                progress.close()
            if partial is not None:
                partial.close()
            model.close()
    if output is not None:
        with atomic_open(output) as fh:
            fh.writelines(_jsonl(r) for r in rows)
        failed = sum(1 for r in query_rows if "error" in r)
        notes = [f"{input_errors} bad input lines"] * bool(input_errors) + [f"{failed} failed queries"] * bool(failed)
        print(
            f"wrote {len(query_rows) - failed} answers to {output}" + (f" ({', '.join(notes)})" if notes else ""),
            file=sys.stderr,
        )
    else:
        for row in rows:
            if "error" in row:
                print(
                    f"[line {row['line']}] error: {row['error']}\n"
                    if "line" in row
                    else f">>> {row['query']}\nerror: {row['error']}\n"
                )
            else:
                print(f">>> {row['query']}\n{row['answer']}\n")
    return 1 if any("error" in r for r in rows) else 0


def run_reporting_errors(
    prog: str,
    body: Callable[[], int],
    *,
    expected: tuple[type[BaseException], ...] = (AutoModelError,),
    interrupted: str = "interrupted",
) -> int:
    """Run a command; known errors print one line and exit 2 (``AUTO_MODEL_DEBUG=1``: the traceback)."""
    debug = constants.debug()
    try:
        return body()
    except expected as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_cli_logging(args.verbose)
    if args.command == "serve":
        return run_reporting_errors("auto-model", lambda: _serve(args))
    if args.command != "generate":
        return 2
    return run_reporting_errors("auto-model", lambda: _generate(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
