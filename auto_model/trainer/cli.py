"""``auto-model-train``: DRPO, Dynamic Rewarding with Prompt Optimization.

    auto-model-train [prompt] --base-model-name M --eval-model-name J --log-dir runs/m   # stage 2
    auto-model-train icl --eval-model-name J --log-dir runs/icl                          # stage 1
    auto-model-train --config run.json --resume

The parameters keep the names of the original DRPO scripts, as kebab-case flags; their spellings
with underscores (``--base_model_name``, ``--is_GPT``) are accepted too. ``--config`` reads them
from a JSON (or TOML) file, and flags given on the command line win (see :mod:`auto_model.flags`).
Every model is reached through the SDK, so any backend works for any role.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import fields

from auto_model import constants
from auto_model.errors import AutoModelError, EngineOutageError
from auto_model.flags import ArgumentParser, add_replica_flags, bool_arg
from auto_model.trainer.config import ORIGINAL_DEFAULT_PROMPT, DRPOConfig, redacted
from auto_model.trainer.drpo import DRPO

__all__ = ["ORIGINAL_DEFAULT_PROMPT", "main", "parse_args", "parser", "redacted", "run"]


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="auto-model-train",
        snake_case_aliases=True,
        description="DRPO: optimize a model's system prompt (stage 2, "
        "'prompt', the default) or its in-context examples (stage 1, 'icl'); or train the router that "
        "picks each request's route ('router', no engine needed), or the answer check ('answer-check "
        "--answers REPORT.json', no engine needed). Every flag is also "
        "accepted with underscores, as the original scripts spelled it (--max-new-tokens).",
    )
    add = p.add_argument
    add("stage", nargs="?", choices=["prompt", "icl", "router"], metavar="command",
        help="the stage to run: prompt, icl or router (default prompt)")  # fmt: skip
    # The original parameters, same names.
    add("--base-model-name", help=f"the model to optimize for (default {constants.DEFAULT_MODEL})")
    add("--base-model-family", help="accepted for compatibility; the family is detected")
    add("--eval-model-name", help="scores answers (default: the base model)")
    add("--metrics-model-name", help="picks the aspects per query (default: the eval model)")
    add("--optimize-model-name", help="rewrites prompts and answers (default: the eval model)")
    add("--initial-system-prompt", help="text, or a path to a text file")
    add("--n-actions", type=int, help="rewrites per candidate and level")
    add("--temperature", type=float, help="the optimizer's sampling temperature")
    add("--depth", type=int, help="levels of the search (one training query each)")
    add("--max-depth-increase", type=int, help="extra levels a path may get by keeping good prompts")
    add("--beam-size", type=int)
    add("--log-dir", help="where outputs, the checkpoint and the request cache go (default runs/<model>)")
    add("--disable-log", action="store_true", help="no log.txt")
    add("--disable-tqdm", action="store_true", help="no progress bars")
    add("--base-model-download-dir", help="download folder for Hub models (vLLM download_dir)")
    add("--data-dir", help="folder with train.jsonl (default: the packaged training queries)")
    add("--metrics-cache-path", help="aspect choices per query (default <log_dir>/metrics_cache.json)")
    add("--num-training-examples", type=int)
    add("--logging-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add("--ret-icl", type=bool_arg, help="retrieve in-context examples for the base model (true/false)")
    add("--is-gpt", type=bool_arg, help="the base model is served by the OpenAI API (true/false)")
    add("--k", type=int, help="in-context examples retrieved per query (default: with --route, the "
        "artifact's number for the route; else 2)")  # fmt: skip
    add("--cuda-visible-devices")
    add("--num-gpus", type=int)
    # Additions.
    add("--config", help="JSON or TOML file with any of these parameters")
    add("--seed", type=int, help="fixes the training sample and the optimizer's sampling")
    add("--resume", action="store_true", help="continue the run in --log-dir from its checkpoint")
    add("--max-calls", type=int, help="stop cleanly (resumable) before sending more LLM requests")
    add("--max-new-tokens", type=int, help="longest answer of the base model")
    add("--judge-max-new-tokens", type=int, help="longest reply of the metrics, eval and optimize models")
    add(
        "--batch-size",
        type=int,
        help="most requests per engine call (1 sends them one at a time, as the original scripts did)",
    )
    add("--dry-run", action="store_true", help="print the planned number of calls and exit")
    add("--output", help="where the artifact (or the new ICL pool) goes")
    add("--backend", help="engine for every role: auto, vllm, openai or transformers")
    add(
        "--base-url",
        help="OpenAI-compatible server for the metrics, eval and optimize models "
        "(and for the base model with --is-gpt true)",
    )
    add("--dtype")
    add_replica_flags(p, "each local engine (the base model's answers, and the judge's on the same engine)")
    add(
        "--eval-per-aspect",
        type=bool_arg,
        help="ask the eval model for one aspect per request (true/false): for small judges",
    )
    add(
        "--judge-json-schema",
        type=bool_arg,
        help="constrain metrics and eval replies to their JSON schema (true/false; vllm and openai engines): "
        "every reply is then readable, even from a small judge",
    )
    add(
        "--route",
        choices=["everyday", "safety"],
        help="prompt: optimize this route's prompt, on the training queries of the route (category harmful: "
        "safety), answered down it, from its current prompt; the artifact keeps the other route and the routing",
    )
    add(
        "--reward",
        help="what scores answers: llm (the judge roles), rm:PATH (a reward model from auto-model-rm train), "
        "metric:NAME (refusal, no_repetition, clean_ending, no_loop), or several, comma-separated, each with an "
        "optional @WEIGHT (e.g. rm:rm-out@1,metric:refusal@2)",
    )
    add(
        "--skip-threshold",
        type=float,
        help="an answer this good on every aspect is not rewritten (default 4.5 for llm, 1 for metrics alone; none "
        "with a reward model)",
    )
    add(
        "--moves",
        help="prompt: how candidates change, comma-separated: rewrite (the optimize model rewrites the prompt), "
        "decoding (one decoding setting one step), examples (one example more or fewer per request, or a pool "
        "example dropped, added from --example-bank, or replaced), sentences (a guideline sentence added, a "
        "sentence dropped, two swapped), shorten (a retrieved pool example's answer cut to its first sentences); "
        "all but rewrite need --route",
    )
    add("--queries-per-level", type=int, help="prompt: training queries each candidate answers per level")
    add("--token-cost", type=float, help="prompt: reward taken per 1,000 prompt tokens of a request")
    add("--min-examples", type=int, help="prompt: the fewest examples per request the examples move "
        "goes down to (a base model answers off-topic without one)")  # fmt: skip
    add("--example-bank", help="prompt: examples the examples move may add: an ICL pool file, or the "
        "responses of auto-model-feedback --mode rg (filtered: no loop, no refusal, 12-120 words)")  # fmt: skip
    add("--guidelines", help="prompt: sentences the sentences move may add, one a line (default: the "
        "packaged guidelines)")  # fmt: skip
    add("--num-iters", type=int, help="icl: rewrite rounds per example")
    add("--icl-path", help="icl: the pool to improve; router: the pool (default: the packaged pool)")
    add("--prompt-path", help="router and --route: the artifact to start from (default: the model's own)")
    add("--routing-data", help="router: labelled queries (.jsonl; default: the packaged ones)")
    add(
        "--form-data",
        help="router: the routing queries reworded (.jsonl with a 'pair' per row); the classifiers train on "
        "them, the vote does not read them (default: the packaged ones)",
    )
    add("--no-form-data", action="store_true", help="router: train on the routing queries as written only")
    add("--router-c", type=float, help="router: inverse regularisation strength of the regression")
    add(
        "--max-false-positive",
        type=float,
        help="router: the share of other queries the calibrated threshold may route to safety",
    )
    add("--route-threshold", type=float, help="router: use this threshold instead of calibrating one")
    add(
        "--classifier-weight",
        type=float,
        help="router: the embedding classifier's share of the safety score (the vote of the nearest labelled "
        "queries has what the classifiers do not take; 1: the classifier alone)",
    )
    add(
        "--lexical-weight",
        type=float,
        help="router: the lexical (words and word pairs) classifier's share of the safety score (0: none)",
    )
    add("--lexical-c", type=float, help="router: inverse regularisation strength of the lexical one")
    # Every default is the config's (one place); --config and --dry-run are the command line's own.
    p.set_defaults(**{f.name: f.default for f in fields(DRPOConfig)}, config=None, dry_run=False)
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[DRPOConfig, bool]:
    """The run's :class:`DRPOConfig` from the command line (and ``--config``), and whether
    ``--dry-run`` was given."""
    args = vars(parser().with_config(list(sys.argv[1:] if argv is None else argv)))
    args.pop("config")
    dry_run = args.pop("dry_run")
    return DRPOConfig(**args), dry_run


def run(config: DRPOConfig, dry_run: bool = False) -> int:
    """Run ``config``'s stage as the command line does: progress and usage on stderr, the output's
    path on stdout; exit 3 when the call budget ran out, 4 when an engine is down (both resumable)."""
    from auto_model.rewards.requests import BudgetExhausted

    drpo = DRPO(config)
    if dry_run:
        plan = drpo.plan()
        print(
            f"planned calls: at most {sum(plan.values())} ("
            + ", ".join(f"{k} {v}" for k, v in plan.items())
            + "), plus up to 2 retries per unreadable judge reply"
        )
        return 0
    root = logging.getLogger("auto_model")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    try:
        result = drpo.run()
        if result.table:
            print(result.table, file=sys.stderr)
        print(result.summary)
    except BudgetExhausted as exc:  # logged by the run (log.txt and the console)
        print(f"auto-model-train: stopped: {exc}", file=sys.stderr)
        return 3
    except EngineOutageError as exc:
        print(f"auto-model-train: stopped: {exc}", file=sys.stderr)
        return 4
    finally:
        root.removeHandler(console)
        if drpo.usage is not None:
            print("\nusage of the run (calls sent to engines; cached answers reused):\n" + drpo.usage.table(),
                  file=sys.stderr)  # fmt: skip
    return 0


def visualize(argv: Sequence[str]) -> int:
    """``auto-model-train visualize LOG_DIR [-o FILE.html]``: the run's search tree as one HTML page."""
    from auto_model.viewer import write_tree_html

    p = ArgumentParser(prog="auto-model-train visualize", description="Write a DRPO run's search tree as one "
                       "self-contained HTML page (LOG_DIR/algo_output/tree.html unless -o says where).")  # fmt: skip
    p.add_argument("log_dir", help="the run's --log-dir")
    p.add_argument("-o", "--output", default=None, help="the page to write")
    args = p.parse_args(list(argv))
    print(write_tree_html(args.log_dir, args.output))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from auto_model.flags import run_reporting_errors

    def body() -> int:
        given = list(sys.argv[1:] if argv is None else argv)
        if given[:1] == ["visualize"]:
            return visualize(given[1:])
        if given[:1] == ["answer-check"]:
            from auto_model.trainer.answer_check import main as answer_check

            return answer_check(given[1:])
        return run(*parse_args(argv))

    return run_reporting_errors(
        "auto-model-train",
        body,
        expected=(AutoModelError, ValueError, OSError),
        interrupted="interrupted; continue with --resume",
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
