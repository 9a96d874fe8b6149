"""``auto-model generate``: answer queries from the command line or a JSONL file.

auto-model generate "How do I brew tea?" "Another question" --temperature 0
auto-model generate --input queries.jsonl --output answers.jsonl [--resume]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from auto_model import constants
from auto_model.errors import ArtifactError, InvalidRequestError
from auto_model.files import atomic_open, read_query_rows
from auto_model.flags import add_best_of, add_replica_flags, check_best_of, replica_options


def add_parser(sub: Any) -> None:
    """The ``generate`` subcommand and its flags."""
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


def run(args: argparse.Namespace) -> int:
    """Answer the queries; 1 when some failed (their rows say why), else 0."""
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
