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

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from auto_model import constants
from auto_model.artifacts import PromptArtifact, save_prompt_artifact
from auto_model.errors import AutoModelError, EngineOutageError, InvalidRequestError
from auto_model.files import atomic_write_text
from auto_model.flags import ArgumentParser, add_replica_flags, bool_arg, kebab, replica_options
from auto_model.logs import redact_url
from auto_model.rewards.base import reward_failures

logger = logging.getLogger("auto_model.trainer")

ORIGINAL_DEFAULT_PROMPT = "You are a helpful assistant."
#: A parameter is a secret when one of the words of its name is one of these: ``api_key``,
#: ``hf_token``, ``client_secret``; not ``max_new_tokens`` or ``keyword``.
SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credentials"})


def is_secret_name(name: str) -> bool:
    """Whether a parameter named ``name`` holds a secret (by the words of its name)."""
    return any(word in SECRET_WORDS for word in re.split(r"[^a-z0-9]+", name.lower()))


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
    add(
        "command",
        nargs="?",
        choices=["prompt", "icl", "router"],
        default="prompt",
        help="the stage to run (default prompt)",
    )
    # The original parameters, same names.
    add("--base-model-name", default=None, help=f"the model to optimize for (default {constants.DEFAULT_MODEL})")
    add("--base-model-family", default=None, help="accepted for compatibility; the family is detected")
    add("--eval-model-name", default=None, help="scores answers (default: the base model)")
    add("--metrics-model-name", default=None, help="picks the aspects per query (default: the eval model)")
    add("--optimize-model-name", default=None, help="rewrites prompts and answers (default: the eval model)")
    add("--initial-system-prompt", default=ORIGINAL_DEFAULT_PROMPT, help="text, or a path to a text file")
    add("--n-actions", type=int, default=3, help="rewrites per candidate and level")
    add("--temperature", type=float, default=0.2, help="the optimizer's sampling temperature")
    add("--depth", type=int, default=20, help="levels of the search (one training query each)")
    add("--max-depth-increase", type=int, default=10, help="extra levels a path may get by keeping good prompts")
    add("--beam-size", type=int, default=2)
    add("--log-dir", default=None, help="where outputs, the checkpoint and the request cache go (default runs/<model>)")
    add("--disable-log", action="store_true", help="no log.txt")
    add("--disable-tqdm", action="store_true", help="no progress bars")
    add("--base-model-download-dir", default=None, help="download folder for Hub models (vLLM download_dir)")
    add("--data-dir", default=None, help="folder with train.jsonl (default: the packaged training queries)")
    add("--metrics-cache-path", default=None, help="aspect choices per query (default <log_dir>/metrics_cache.json)")
    add("--num-training-examples", type=int, default=180)
    add("--logging-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add("--ret-icl", type=bool_arg, default=True, help="retrieve in-context examples for the base model (true/false)")
    add("--is-gpt", type=bool_arg, default=False, help="the base model is served by the OpenAI API (true/false)")
    add("--k", type=int, default=None, help="in-context examples retrieved per query (default: with --route, the "
        "artifact's number for the route; else 2)")  # fmt: skip
    add("--cuda-visible-devices", default=None)
    add("--num-gpus", type=int, default=1)
    # Additions.
    add("--config", default=None, help="JSON or TOML file with any of these parameters")
    add("--seed", type=int, default=42, help="fixes the training sample and the optimizer's sampling")
    add("--resume", action="store_true", help="continue the run in --log-dir from its checkpoint")
    add("--max-calls", type=int, default=None, help="stop cleanly (resumable) before sending more LLM requests")
    add("--max-new-tokens", type=int, default=512, help="longest answer of the base model")
    add("--judge-max-new-tokens", type=int, default=512, help="longest reply of the metrics, eval and optimize models")
    add(
        "--batch-size",
        type=int,
        default=256,
        help="most requests per engine call (1 sends them one at a time, as the original scripts did)",
    )
    add("--dry-run", action="store_true", help="print the planned number of calls and exit")
    add("--output", default=None, help="where the artifact (or the new ICL pool) goes")
    add("--backend", default="auto", help="engine for every role: auto, vllm, openai or transformers")
    add(
        "--base-url",
        default=None,
        help="OpenAI-compatible server for the metrics, eval and optimize models "
        "(and for the base model with --is-gpt true)",
    )
    add("--dtype", default="auto")
    add_replica_flags(p, "each local engine (the base model's answers, and the judge's on the same engine)")
    add(
        "--eval-per-aspect",
        type=bool_arg,
        default=False,
        help="ask the eval model for one aspect per request (true/false): for small judges",
    )
    add(
        "--judge-json-schema",
        type=bool_arg,
        default=False,
        help="constrain metrics and eval replies to their JSON schema (true/false; vllm and openai engines): "
        "every reply is then readable, even from a small judge",
    )
    add(
        "--route",
        default=None,
        choices=["everyday", "safety"],
        help="prompt: optimize this route's prompt, on the training queries of the route (category harmful: "
        "safety), answered down it, from its current prompt; the artifact keeps the other route and the routing",
    )
    add(
        "--reward",
        default="llm",
        help="what scores answers: llm (the judge roles), rm:PATH (a reward model from auto-model-rm train), "
        "metric:NAME (refusal, no_repetition, clean_ending, no_loop), or several, comma-separated, each with an "
        "optional @WEIGHT (e.g. rm:rm-out@1,metric:refusal@2)",
    )
    add(
        "--skip-threshold",
        type=float,
        default=None,
        help="an answer this good on every aspect is not rewritten (default 4.5 for llm, 1 for metrics alone; none "
        "with a reward model)",
    )
    add(
        "--moves",
        default="rewrite",
        help="prompt: how candidates change, comma-separated: rewrite (the optimize model rewrites the prompt), "
        "decoding (one decoding setting one step), examples (one example more or fewer per request, or a pool "
        "example dropped, added from --example-bank, or replaced), sentences (a guideline sentence added, a "
        "sentence dropped, two swapped), shorten (a retrieved pool example's answer cut to its first sentences); "
        "all but rewrite need --route",
    )
    add("--queries-per-level", type=int, default=1, help="prompt: training queries each candidate answers per level")
    add("--token-cost", type=float, default=0.0, help="prompt: reward taken per 1,000 prompt tokens of a request")
    add("--min-examples", type=int, default=0, help="prompt: the fewest examples per request the examples move "
        "goes down to (a base model answers off-topic without one)")  # fmt: skip
    add("--example-bank", default=None, help="prompt: examples the examples move may add: an ICL pool file, or the "
        "responses of auto-model-feedback --mode rg (filtered: no loop, no refusal, 12-120 words)")  # fmt: skip
    add("--guidelines", default=None, help="prompt: sentences the sentences move may add, one a line (default: the "
        "packaged guidelines)")  # fmt: skip
    add("--num-iters", type=int, default=3, help="icl: rewrite rounds per example")
    add("--icl-path", default=None, help="icl: the pool to improve; router: the pool (default: the packaged pool)")
    add("--prompt-path", default=None, help="router and --route: the artifact to start from (default: the model's own)")
    add("--routing-data", default=None, help="router: labelled queries (.jsonl; default: the packaged ones)")
    add(
        "--form-data",
        default=None,
        help="router: the routing queries reworded (.jsonl with a 'pair' per row); the classifiers train on "
        "them, the vote does not read them (default: the packaged ones)",
    )
    add("--no-form-data", action="store_true", help="router: train on the routing queries as written only")
    add("--router-c", type=float, default=16.0, help="router: inverse regularisation strength of the regression")
    add(
        "--max-false-positive",
        type=float,
        default=0.05,
        help="router: the share of other queries the calibrated threshold may route to safety",
    )
    add("--route-threshold", type=float, default=None, help="router: use this threshold instead of calibrating one")
    add(
        "--classifier-weight",
        type=float,
        default=0.25,
        help="router: the embedding classifier's share of the safety score (the vote of the nearest labelled "
        "queries has what the classifiers do not take; 1: the classifier alone)",
    )
    add(
        "--lexical-weight",
        type=float,
        default=0.25,
        help="router: the lexical (words and word pairs) classifier's share of the safety score (0: none)",
    )
    add("--lexical-c", type=float, default=4.0, help="router: inverse regularisation strength of the lexical one")
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[str, argparse.Namespace]:
    args = parser().with_config(list(sys.argv[1:] if argv is None else argv))
    _validate(args)
    if args.route is not None and args.command != "prompt":
        raise InvalidRequestError(f"--route trains a route's prompt: use it with the prompt stage, not {args.command}.")
    return args.command, args


def search_config(args: argparse.Namespace, k: int) -> Any:
    """The :class:`~auto_model.trainer.tree.SearchConfig` of the parsed flags, with ``k`` examples
    per request (checked when made: a bad flag is a typed error naming it)."""
    from auto_model.trainer.tree import SearchConfig

    return SearchConfig(
        depth=args.depth,
        beam_size=args.beam_size,
        n_actions=args.n_actions,
        max_depth_increase=args.max_depth_increase,
        temperature=args.temperature,
        skip_threshold=args.skip_threshold,
        ret_icl=args.ret_icl,
        k=k,
        max_new_tokens=args.max_new_tokens,
        optimizer_max_new_tokens=args.judge_max_new_tokens,
        seed=args.seed,
        route=args.route,
        moves=args.moves,
        queries_per_level=args.queries_per_level,
        token_cost=args.token_cost,
        min_examples=args.min_examples,
    )


def _validate(args: argparse.Namespace) -> None:
    for name in ("num_training_examples", "num_gpus", "num_iters", "batch_size"):
        if getattr(args, name) < 1:
            raise InvalidRequestError(f"{kebab('--' + name)} must be >= 1, got {getattr(args, name)}.")
    args.moves = tuple(m.strip() for m in str(args.moves).split(",") if m.strip())
    search_config(args, 0 if args.k is None else args.k)  # the search's settings, checked before anything loads
    if args.example_bank is not None and "examples" not in args.moves:
        raise InvalidRequestError("--example-bank is what the examples move adds from: add examples to --moves.")
    if args.max_calls is not None and args.max_calls < 0:
        raise InvalidRequestError(f"--max-calls must be >= 0, got {args.max_calls}.")
    from auto_model.rewards.combine import check_reward_specs, parse_reward_specs

    args.reward_specs = parse_reward_specs(args.reward)
    check_reward_specs(args.reward_specs)


def resolve(args: argparse.Namespace, command: str) -> argparse.Namespace:
    """Fill in the defaults that depend on other parameters."""
    args.base_model_name = args.base_model_name or constants.default_model()
    args.eval_model_name = args.eval_model_name or args.base_model_name
    args.metrics_model_name = args.metrics_model_name or args.eval_model_name
    args.optimize_model_name = args.optimize_model_name or args.eval_model_name
    if args.log_dir is None:
        slug = "".join(c if c.isalnum() else "-" for c in args.base_model_name.lower()).strip("-")
        args.log_dir = str(Path("runs") / f"{command}-{slug}")
    if args.metrics_cache_path is None:
        args.metrics_cache_path = str(Path(args.log_dir) / "metrics_cache.json")
    if args.skip_threshold is None:
        kinds = {spec.kind for spec in args.reward_specs}
        args.skip_threshold = 4.5 if kinds == {"llm"} else 1.0 if kinds == {"metric"} else None
    prompt_file = Path(args.initial_system_prompt).expanduser()
    if len(args.initial_system_prompt) < 4096 and prompt_file.is_file():
        args.initial_system_prompt = prompt_file.read_text(encoding="utf-8").strip()
    return args


def redacted(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as written to ``args.txt`` and ``output.json``: secrets and the
    credentials in addresses hidden."""
    return {k: _shown(k, v) for k, v in sorted(vars(args).items()) if k != "reward_specs"}


def _shown(name: str, value: Any) -> Any:
    if value and is_secret_name(name):
        return "<redacted>"
    return redact_url(value) if name.endswith("url") and isinstance(value, str) else value


def uses_judge(args: argparse.Namespace) -> bool:
    """Whether the reward includes the LLM judge (and so needs the metrics and eval models)."""
    return any(spec.kind == "llm" for spec in args.reward_specs)


def planned_calls(args: argparse.Namespace, command: str, pool_size: int = 0) -> dict[str, int]:
    """Upper bounds on the requests a run sends, before retries of unreadable judge replies."""
    judged = uses_judge(args)
    if command == "icl":
        rewrites = pool_size * args.n_actions * args.num_iters
        return {"metrics": pool_size * judged, "eval": (pool_size + rewrites) * judged, "optimize": rewrites, "base": 0}
    levels = min(args.depth + args.max_depth_increase, -(-args.num_training_examples // args.queries_per_level))
    width = args.beam_size * args.n_actions * len(args.moves)
    candidates = 1 + width * (levels - 1)
    rewrites = args.beam_size * args.n_actions * (levels - 1) if "rewrite" in args.moves else 0
    answers = candidates * args.queries_per_level
    return {"base": answers, "metrics": levels * args.queries_per_level * judged, "eval": answers * judged,
            "optimize": rewrites}  # fmt: skip


def build_roles(args: argparse.Namespace, cache: Any, usage: Any) -> dict[str, Any]:
    from auto_model import AutoModel
    from auto_model.backends import resolve_backend_name
    from auto_model.rewards.requests import Role

    models: dict[tuple[str, str], Any] = {}
    names = {
        "base": args.base_model_name,
        "metrics": args.metrics_model_name,
        "eval": args.eval_model_name,
        "optimize": args.optimize_model_name,
    }
    if not uses_judge(args):  # no judge: its models are not loaded
        del names["metrics"], names["eval"]
    roles = {}
    for role, name in names.items():
        # The judge roles use the server at --base-url when one is given; the base model only with --is-gpt.
        url = args.base_url if role != "base" or args.is_gpt else None
        backend = resolve_backend_name("openai" if role == "base" and args.is_gpt else args.backend, name, base_url=url)
        key = (name, backend)
        if key not in models:
            kwargs: dict[str, Any] = {"backend": backend}
            if backend == "openai":
                if url:
                    kwargs["base_url"] = url
            else:
                kwargs.update(num_gpus=args.num_gpus, cuda_visible_devices=args.cuda_visible_devices, dtype=args.dtype)
                kwargs.update(replica_options(args, backend))
                if (
                    args.base_model_download_dir and role == "base"
                ):  # vLLM calls it download_dir, transformers cache_dir
                    kwargs["download_dir" if backend == "vllm" else "cache_dir"] = args.base_model_download_dir
            logger.info("Loading %s for %s (%s)", name, role, backend)
            models[key] = AutoModel(name, **kwargs)
        roles[role] = Role(role, models[key], cache, usage, chunk_size=args.batch_size)
    return roles


def _setup_logging(args: argparse.Namespace) -> list[logging.Handler]:
    root = logging.getLogger("auto_model")
    root.setLevel(getattr(logging, args.logging_level))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    if not args.disable_log:
        file = logging.FileHandler(Path(args.log_dir) / "log.txt", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file)
    for handler in handlers:
        root.addHandler(handler)
    return handlers


def run(command: str, args: argparse.Namespace) -> int:
    from auto_model.rewards.combine import build_reward
    from auto_model.rewards.judge import Judge
    from auto_model.rewards.requests import (
        BudgetExhausted,
        RequestCache,
        RoleUsage,
        Usage,
    )
    from auto_model.trainer.tree import ROLES

    if command == "router":
        return _run_router(args)
    log_dir = Path(args.log_dir)
    out_dir = log_dir / "algo_output"
    checkpoint = out_dir / ("checkpoint.json" if command == "prompt" else "icl_checkpoint.json")
    if args.dry_run:
        pool_size = 0
        if command == "icl":
            from auto_model.retrieval import load_icl_pool

            pool_size = len(load_icl_pool(args.icl_path))
        plan = planned_calls(args, command, pool_size)
        print(
            f"planned calls: at most {sum(plan.values())} ("
            + ", ".join(f"{k} {v}" for k, v in plan.items())
            + "), plus up to 2 retries per unreadable judge reply"
        )
        return 0
    if checkpoint.exists() and not args.resume:
        raise InvalidRequestError(
            f"{log_dir} already holds a run; pass --resume to continue it, or choose a new --log-dir."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    handlers = _setup_logging(args)
    atomic_write_text(log_dir / "args.txt", json.dumps({"command": command, **redacted(args)}, indent=2) + "\n")
    started = time.perf_counter()
    cache = RequestCache(log_dir / "cache" / "requests.sqlite")
    usage = Usage(roles={r: RoleUsage() for r in ROLES}, max_calls=args.max_calls)
    usage_path = out_dir / "usage.json"
    if args.resume and usage_path.exists():  # totals are for the whole run, across resumes
        usage.load(json.loads(usage_path.read_text(encoding="utf-8"))["run"])
    try:
        roles = build_roles(args, cache, usage)
        reward = build_reward(
            args.reward_specs,
            lambda: Judge(
                roles["eval"],
                roles["metrics"],
                metrics_cache_path=args.metrics_cache_path,
                max_new_tokens=args.judge_max_new_tokens,
                per_aspect=args.eval_per_aspect,
                json_schema=args.judge_json_schema,
            ),
        )
        if command == "icl":
            code = _run_icl(args, roles, reward, out_dir)
        else:
            code = _run_prompt(args, roles, reward, out_dir, checkpoint, usage, started)
    except BudgetExhausted as exc:
        logger.warning("%s", exc)
        print(f"auto-model-train: stopped: {exc}", file=sys.stderr)
        code = 3
    except EngineOutageError as exc:
        logger.error("%s", exc)
        print(f"auto-model-train: stopped: {exc}", file=sys.stderr)
        code = 4
    finally:
        atomic_write_text(usage_path, json.dumps(usage.snapshot(), indent=2) + "\n")
        print("\nusage of the run (calls sent to engines; cached answers reused):\n" + usage.table(), file=sys.stderr)
        cache.close()
        for handler in handlers:
            logging.getLogger("auto_model").removeHandler(handler)
            handler.close()
    return code


def _run_prompt(
    args: argparse.Namespace,
    roles: dict[str, Any],
    reward: Any,
    out_dir: Path,
    checkpoint: Path,
    usage: Any,
    started: float,
) -> int:
    from auto_model.trainer.data import load_training_queries, sample_training_queries
    from auto_model.trainer.moves import Candidate, guideline_bank, load_example_bank
    from auto_model.trainer.search import BeamSearch

    rows = load_training_queries(args.data_dir)
    base_artifact = None
    bank = load_example_bank(args.example_bank, args.route) if args.example_bank else []  # checked before loading
    guidelines = guideline_bank(args.guidelines) if "sentences" in args.moves else []
    if args.route is not None:
        from auto_model.artifacts import prompt_for_model

        base_artifact = prompt_for_model(args.base_model_name, args.prompt_path)
        rows = [r for r in rows if (r.get("category") == "harmful") == (args.route == "safety")]
        if not rows:
            raise InvalidRequestError(
                f"No training queries of the {args.route} route (category 'harmful' is safety, any other everyday)."
            )
        if args.initial_system_prompt == ORIGINAL_DEFAULT_PROMPT:  # not given: the route's current prompt
            args.initial_system_prompt = base_artifact.prompt_for(args.route)
        # The base model answers with that artifact: its routing, and its pool with the artifact's edits.
        roles["base"].model.prompt_artifact = base_artifact
    if args.k is None:
        args.k = base_artifact.examples_for(args.route) if base_artifact is not None else 2
    rows = sample_training_queries(rows, args.num_training_examples, args.seed)
    # The search starts from what the route holds now: its prompt, decoding settings and examples.
    initial = Candidate(args.initial_system_prompt, examples=args.k)
    if base_artifact is not None:
        initial = initial.with_decoding(base_artifact.decoding_for(args.route))
    config = search_config(args, args.k)
    bar = None
    if not args.disable_tqdm:
        from tqdm import tqdm

        bar = tqdm(
            total=min(args.depth + args.max_depth_increase, -(-len(rows) // args.queries_per_level)),
            desc="DRPO levels",
            unit="level",
            file=sys.stderr,
        )

    def level_done(message: str) -> None:
        _level_done(message, bar, usage, out_dir)
        _write_tree(search, args, reward, usage, out_dir, started, "running")  # the tree and its page, to watch

    search = BeamSearch(
        roles["base"],
        roles["optimize"],
        reward,
        config,
        [r["query"] for r in rows],
        args.initial_system_prompt,
        checkpoint,
        harmful=[r["category"] == "harmful" if r.get("category") else None for r in rows],
        progress=level_done,
        initial=initial,
        bank=bank,
        guidelines=guidelines,
    )
    if args.resume and search.load():
        logger.info("Resumed from %s at level %d", checkpoint, search.level)
        if bar:
            bar.update(search.level)
    try:
        best = search.run()
    finally:
        if bar:
            bar.close()
        _write_tree(search, args, reward, usage, out_dir, started)
    (out_dir / "trace.txt").write_text(search.trace(best), encoding="utf-8")
    judge_is_base = uses_judge(args) and {args.eval_model_name, args.metrics_model_name,
                                          args.optimize_model_name} == {args.base_model_name}  # fmt: skip
    provenance = {
        "created": datetime.now(timezone.utc).date().isoformat(),
        "base_model": args.base_model_name,
        "eval_model": args.eval_model_name,
        "metrics_model": args.metrics_model_name,
        "optimize_model": args.optimize_model_name,
        "judged_by_itself": judge_is_base,
        "reward": [str(spec) for spec in args.reward_specs],
        "search": {
            "depth": args.depth,
            "beam_size": args.beam_size,
            "n_actions": args.n_actions,
            "max_depth_increase": args.max_depth_increase,
            "training_queries": len(rows),
            "ret_icl": args.ret_icl,
            "k": args.k,
            "seed": args.seed,
            "moves": list(args.moves),
            "queries_per_level": args.queries_per_level,
            "token_cost": args.token_cost,
            "min_examples": args.min_examples,
        },
        "best_node": best.id,
        "best": {
            "decoding": best.decoding,
            "examples": best.examples,
            "pool_drop": best.pool_drop,
            "pool_add": best.pool_add,
            "prompt_tokens": best.prompt_tokens,
        },  # fmt: skip
        "path_rewards": best.path_rewards,
        "path_mean": best.path_mean if best.path_rewards else None,  # None: no level was scored
        "levels": search.summary(),
    }
    state = search.candidate(best)
    artifact = _trained_artifact(args, state, provenance, base_artifact, search.added(state))
    output = Path(args.output) if args.output else out_dir / "optimized_prompt.json"
    save_prompt_artifact(artifact, output)
    print(search.summary_table(), file=sys.stderr)
    mean = f"path mean {best.path_mean:.2f}" if best.path_rewards else "no scored level"
    print(f"best prompt ({mean} over {len(best.path_rewards)} scored levels) -> {output}")
    return 0


def _trained_artifact(
    args: argparse.Namespace, best: Any, provenance: dict[str, Any], base: PromptArtifact | None, added: Any = ()
) -> PromptArtifact:
    """The artifact a run writes: its prompt alone (v1), or, with --route, the model's artifact with
    that route's state replaced: its prompt, and what the moves changed (its decoding settings, its
    examples per request, the pool's edits); the other route, the routing and the aliases kept."""
    from dataclasses import replace

    prompt = best.prompt
    if base is None or args.route is None:
        return PromptArtifact(model_id=args.base_model_name, system_prompt=prompt, method="drpo", provenance=provenance)
    made = {"method": "drpo", "route": args.route, **provenance}
    model_id = base.model_id if base.model_id not in (None, "default") else args.base_model_name
    state: dict[str, Any] = {}
    if best.settings != base.decoding_for(args.route):
        state["route_decoding"] = {**base.route_decoding, args.route: best.settings}
    if best.examples != base.examples_for(args.route):
        state["route_examples"] = {**base.route_examples, args.route: best.examples}
    if best.drop or best.add:
        state["pool_drop"] = (*base.pool_drop, *best.drop)
        state["pool_add"] = (*base.pool_add, *added)
    if args.route == "everyday":  # the artifact's main prompt is the everyday route's (no prompt of its own)
        routes = {name: text for name, text in base.routes.items() if name != args.route}
        return replace(base, model_id=model_id, system_prompt=prompt, routes=routes, method="drpo", source=None,
                       provenance={**made, "previous": base.provenance}, **state)  # fmt: skip
    return replace(
        base,
        model_id=model_id,
        source=None,
        routes={**base.routes, args.route: prompt},
        route_provenance={**base.route_provenance, args.route: made},
        **state,
    )


def _level_done(message: str, bar: Any, usage: Any, out_dir: Path) -> None:
    logger.info(message)
    atomic_write_text(out_dir / "usage.json", json.dumps(usage.snapshot(), indent=2) + "\n")
    if bar is not None:
        bar.update(1)


def _write_tree(
    search: Any,
    args: argparse.Namespace,
    reward: Any,
    usage: Any,
    out_dir: Path,
    started: float,
    status: str | None = None,
) -> None:
    """``output.json`` (the whole tree, the run's settings and usage) and its page, ``tree.html``."""
    from auto_model.viewer import tree_html

    tree = {
        "format": "auto_model.drpo_run/v1",
        "status": status or ("finished" if search.done() else "stopped"),
        "config": redacted(args),
        **search.report(),
        "judge_failures": reward_failures(reward),
        "usage": usage.snapshot(),
        "wall_clock_s": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(out_dir / "output.json", json.dumps(tree, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / "tree.html", tree_html(tree))


def _run_icl(args: argparse.Namespace, roles: dict[str, Any], reward: Any, out_dir: Path) -> int:
    from auto_model.retrieval import load_icl_pool
    from auto_model.trainer.icl import optimize_pool

    pool = load_icl_pool(args.icl_path)
    output = Path(args.output) if args.output else out_dir / "ICL_examples.json"
    states = optimize_pool(
        pool,
        roles["optimize"],
        reward,
        output,
        num_iters=args.num_iters,
        n_actions=args.n_actions,
        temperature=args.temperature,
        skip_threshold=args.skip_threshold,
        seed=args.seed,
        max_new_tokens=args.judge_max_new_tokens,
        progress=logger.info,
    )
    history = [{"query": s.example.query, "history": s.history} for s in states]
    atomic_write_text(
        out_dir / "icl_output.json",
        json.dumps({"examples": history, "judge_failures": reward_failures(reward)}, indent=1, ensure_ascii=False)
        + "\n",
    )
    print(f"new pool ({len(states)} examples) -> {output}")
    return 0


def _run_router(args: argparse.Namespace) -> int:
    """Fit the routing classifier and write the artifact that carries it (no engine is loaded)."""
    from dataclasses import replace

    from auto_model.artifacts import prompt_for_model
    from auto_model.retrieval import ICLRetriever, load_icl_pool
    from auto_model.routing import (
        RoutingSettings,
        packaged_form_file,
        packaged_routing_files,
        read_labelled_queries,
        routing_set,
    )
    from auto_model.trainer.router import fit_router

    if args.route_threshold is not None and not 0 <= args.route_threshold <= 1:
        raise InvalidRequestError(f"--route-threshold must be in [0, 1], got {args.route_threshold}.")
    if (args.routing_data or args.data_dir or args.icl_path) and args.classifier_weight + args.lexical_weight < 1:
        raise InvalidRequestError(
            "A mixed safety score is calibrated with the vote of the packaged routing set, which requests meet at "
            "run time; with --routing-data, --data-dir or --icl-path, the classifiers must make up the whole score: "
            "pass --classifier-weight and --lexical-weight that add up to 1 (e.g. --classifier-weight 1 "
            "--lexical-weight 0)."
        )
    artifact = prompt_for_model(args.base_model_name, args.prompt_path)
    pool = load_icl_pool(args.icl_path)
    routing_file, train_file = packaged_routing_files()
    if args.data_dir is not None:
        train_file = Path(args.data_dir).expanduser()
        train_file = train_file / "train.jsonl" if train_file.is_dir() else train_file
    items = routing_set(pool, [args.routing_data or routing_file, train_file])
    voters = [True] * len(items)
    if not args.no_form_data:
        known = {item.query for item in items}
        forms = [f for f in read_labelled_queries(args.form_data or packaged_form_file()) if f.query not in known]
        items, voters = items + forms, voters + [False] * len(forms)
    retriever = ICLRetriever(pool)
    queries = [item.query for item in items]
    old = RoutingSettings.from_dict(artifact.routing) if artifact.routing else RoutingSettings()
    classifier, lexical, threshold = fit_router(
        queries,
        [item.harmful for item in items],
        retriever.embed(queries),
        retriever.embedding_model,
        c=args.router_c,
        weight=args.classifier_weight,
        lexical_weight=args.lexical_weight,
        lexical_c=args.lexical_c,
        neighbours=old.neighbours,
        temperature=old.temperature,
        max_false_positive=args.max_false_positive,
        threshold=args.route_threshold,
        seed=args.seed,
        voters=voters,
        groups=[item.group or item.query for item in items],
    )
    # The vote that the classifier is mixed with is the one it was calibrated with: the routing set's.
    whole = classifier.weight + (lexical.weight if lexical is not None else 0.0) >= 1 - 1e-9
    vote_set = old.vote_set if whole else "labelled"
    routing = replace(old, threshold=threshold, vote_set=vote_set, classifier=classifier, lexical=lexical).to_dict()
    output = Path(args.output) if args.output else Path(args.log_dir) / "optimized_prompt.json"
    save_prompt_artifact(replace(artifact, routing=routing, source=None), output)
    p = classifier.provenance
    print(
        f"router: {p['queries']} queries ({p['harmful']} harmful), classifier weight {classifier.weight}, "
        f"lexical weight {lexical.weight if lexical is not None else 0}, "
        f"threshold {threshold}; cross-validated: {p['cv_recall']:.1%} of harmful queries to safety, "
        f"{p['cv_false_positive']:.1%} of the others -> {output}"
    )
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
        command, args = parse_args(argv)
        return run(command, resolve(args, command))

    return run_reporting_errors(
        "auto-model-train",
        body,
        expected=(AutoModelError, ValueError, OSError),
        interrupted="interrupted; continue with --resume",
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
