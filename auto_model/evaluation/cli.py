"""``auto-model-eval``: answer an eval set under several configurations, judge, and report.

Examples::

    # The default model alone, with its optimized prompt, and with prompt + 3 examples; judged by itself.
    auto-model-eval --output eval-out

    # Your own configurations, judged by a server.
    auto-model-eval --output eval-out \\
        --config "alone: model=my-org/my-model; prompt=off" \\
        --config "tuned: model=my-org/my-model; icl=3" \\
        --judge gpt-4o-mini

Rerunning the same command reads every answer and judgement from ``OUTPUT/cache.sqlite``: it sends
nothing, and a run that was interrupted goes on where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from auto_model.errors import InvalidRequestError
from auto_model.flags import ArgumentParser, add_replica_flags, replica_options, with_replicas


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="auto-model-eval",
        description="Measure answers the just-eval way: 1-5 judge scores on helpfulness, clarity, factuality, depth, "
        "engagement (regular queries) and safety (harmful requests), plus judge-free proxies.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="A configuration spec is 'NAME: key=value; key=value' with keys model, backend, prompt (on|off), "
        "prompt_path (a .json/.txt file, or packaged:candidates/<file>), system (text), icl (examples per "
        "query), base_url, dtype, prompt_format, best_of and reward_model (the best of N samples by a reward "
        "model), temperature. Without --config/--configs: the default model alone, with "
        "its prompt, and with prompt + 3 examples.",
    )
    p.add_argument(
        "--output",
        "-o",
        required=True,
        help="folder for report.md, report.html, report.json, report.png and the request cache",
    )
    p.add_argument(
        "--config", "-c", action="append", default=[], metavar="SPEC", help="a configuration (repeat for more)"
    )
    p.add_argument("--configs", metavar="FILE", help="configurations from a TOML ([[config]] tables) or JSON file")
    p.add_argument("--model", help="model for the default configurations (default: the embedded default model)")
    p.add_argument("--backend", default="auto", help="backend for the default configurations")
    p.add_argument("--eval-set", help="eval JSONL (id, query, kind regular|safety, tags); default: the packaged set")
    p.add_argument("--limit", type=int, help="evaluate only this many items, in proportion to each kind")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default 512)")
    p.add_argument(
        "--judge", help="judge model (default: the embedded default model, a weak judge); 'none': proxies only"
    )
    p.add_argument("--judge-backend", default="auto")
    p.add_argument("--judge-base-url", help="OpenAI-compatible server for the judge")
    p.add_argument("--judge-dtype", default="auto")
    p.add_argument(
        "--judge-attempts", type=int, default=3, help="asks per judgement before it is recorded as a failure"
    )
    p.add_argument("--judge-max-new-tokens", type=int, default=320)
    p.add_argument("--judge-per-aspect", action="store_true", help="one request per aspect (helps small judges)")
    p.add_argument(
        "--judge-json-schema",
        action="store_true",
        help="constrain the judge's replies to their JSON schema (vllm and openai judges): every reply is readable",
    )
    p.add_argument(
        "--reward-model",
        metavar="PATH",
        help="a reward model folder (auto-model-rm train): score every answer, and each configuration's "
        "preference over --baseline on the regular items (win rate with a 95%% interval)",
    )
    p.add_argument("--baseline", metavar="NAME", help="the configuration preferences are measured against "
                   "(default: the first)")  # fmt: skip
    add_replica_flags(p, "each local engine")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite report.md, report.html and report.png from OUTPUT/report.json; runs and loads nothing",
    )
    p.add_argument("--verbose", "-v", action="count", default=0)
    return p


def _run(args: argparse.Namespace, model_factory: Any = None) -> int:
    """The command; ``model_factory`` (default :class:`AutoModel`) builds the engines."""
    from auto_model import AutoModel, constants
    from auto_model.evaluation.configs import default_configs, load_config_file, parse_config_spec
    from auto_model.evaluation.eval_set import load_eval_set, take
    from auto_model.evaluation.report import build_report, render_markdown, write_report
    from auto_model.evaluation.runner import JudgeSettings, run_evaluation

    if args.render_only:
        return _render_only(args.output)
    replica_options(args)  # checked before anything loads
    configs = [parse_config_spec(s) for s in args.config]
    if args.configs:
        configs += load_config_file(args.configs)
    if not configs:
        configs = default_configs(args.model, args.backend)
    elif args.model:
        raise InvalidRequestError(
            "--model sets the default configurations; with --config, name the model in each spec."
        )
    if args.judge_attempts < 1 or args.judge_max_new_tokens < 1:
        raise InvalidRequestError("--judge-attempts and --judge-max-new-tokens must be >= 1.")
    if args.baseline is not None and args.baseline not in [c.name for c in configs]:
        raise InvalidRequestError(
            f"--baseline {args.baseline!r} is not a configuration; choose from {', '.join(c.name for c in configs)}."
        )
    items = take(load_eval_set(args.eval_set), args.limit)
    judge_model = args.judge if args.judge is not None else constants.default_model()
    judge = (
        None
        if judge_model.lower() == "none"
        else JudgeSettings(
            judge_model,
            args.judge_backend,
            args.judge_base_url,
            args.judge_dtype,
            args.judge_attempts,
            args.judge_max_new_tokens,
            args.judge_per_aspect,
            args.judge_json_schema,
        )
    )
    print(
        f"auto-model-eval: {len(configs)} configurations x {len(items)} items"
        + (f", judge {judge.model}" if judge else ", no judge"),
        flush=True,
    )
    run = run_evaluation(
        configs,
        items,
        output_dir=args.output,
        judge=judge,
        max_new_tokens=args.max_new_tokens,
        model_factory=with_replicas(model_factory or AutoModel, args),
        progress=lambda m: print(f"  {m}", flush=True),
        reward_model=args.reward_model,
    )
    eval_set = str(args.eval_set) if args.eval_set else "data/eval/eval.jsonl (packaged)"
    report = build_report(run, eval_set=eval_set, baseline=args.baseline)
    paths = write_report(report, args.output)
    print()
    print(render_markdown(report))
    total = run.usage["total"]
    print(
        f"requests sent: {total['calls']}, from cache: {total['cached']}, failed: {total['failed']}; "
        f"{run.seconds:.1f} s"
    )
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _render_only(output: str) -> int:
    import json
    from pathlib import Path

    from auto_model.evaluation.report import REPORT_FORMAT, write_report

    source = Path(output) / "report.json"
    if not source.is_file():
        raise InvalidRequestError(f"{output} holds no report.json: give the --output folder of an earlier run.")
    report = json.loads(source.read_text(encoding="utf-8"))
    if report.get("format") != REPORT_FORMAT:
        raise InvalidRequestError(f"{source} is not a {REPORT_FORMAT} report (format {report.get('format')!r}).")
    print("wrote " + ", ".join(str(p) for p in write_report(report, output).values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from auto_model.flags import run_reporting_errors
    from auto_model.logs import configure_cli_logging

    args = _parser().parse_args(argv)
    configure_cli_logging(args.verbose)
    return run_reporting_errors(
        "auto-model-eval",
        lambda: _run(args),
        interrupted="interrupted; finished answers are cached, rerun the same command to go on",
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
