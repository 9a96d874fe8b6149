"""``auto-model-feedback``: synthetic feedback, ALMoST's stages, with the original's argument names.

    auto-model-feedback --mode pg --output_dir DIR --prompt_file_path general --num_generation 200
    auto-model-feedback --mode rg --output_dir DIR --model_name_or_path M --prompt_file_path careful --n_shot 3
    auto-model-feedback --mode cs --output_dir DIR --rubric BEST SECOND THIRD
    auto-model-feedback --list-demos

``pg`` writes ``DIR/prompts.txt``: new prompts a model writes from a seed file
(:mod:`auto_model.feedback.prompts`). ``rg`` answers every prompt of ``DIR/prompts.txt`` with one
configuration and writes ``DIR/<model>-<demos>-<n>shot.json`` (:mod:`auto_model.feedback.responses`).
``cs`` reads each configuration's responses and writes ``DIR/comparison.json``
(:mod:`auto_model.feedback.comparisons`). Flags are kebab-case; the original's snake_case spellings
work too. Requests go through the request cache (``--cache_dir``, default ``DIR/cache``): a rerun
with the same arguments and ``--seed`` only sends what is not done yet.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auto_model.errors import ArtifactError, InvalidRequestError
from auto_model.feedback.comparisons import compare
from auto_model.feedback.responses import (
    RESPONSES_FORMAT,
    check_n_shot,
    config_name,
    generate_responses,
    load_demos,
    shipped_demos,
)
from auto_model.files import atomic_write_text
from auto_model.flags import ArgumentParser, add_replica_flags, bool_arg, replica_options


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="auto-model-feedback", description=__doc__.splitlines()[0], snake_case_aliases=True)
    p.add_argument("--mode", choices=("pg", "rg", "cs"),
                   help="pg: prompts from seeds; rg: responses of one configuration; cs: comparisons")  # fmt: skip
    p.add_argument("--output-dir", help="the run's folder: prompts.txt, the responses, comparison.json")
    p.add_argument("--list-demos", action="store_true", help="print the shipped demonstration files and exit")
    p.add_argument("--model-name-or-path", default=None, help="pg, rg: the model (default: the embedded one)")
    p.add_argument("--prompt-file-path", default=None,
                   help="pg: a seed file or 'general' (default); rg: a demonstration file, or 'careful' (default) / "
                        "'plain'")  # fmt: skip
    p.add_argument("--num-generation", type=int, default=100, help="pg: new prompts to keep")
    p.add_argument("--max-rounds", type=int, default=20, help="pg: rounds of requests at most")
    p.add_argument("--cache-dir", default=None, help="pg, rg: the request cache's folder (default: DIR/cache)")
    p.add_argument("--n-shot", type=int, default=3, help="rg: demonstrations per prompt (1, 3, 5...)")
    p.add_argument("--use-hf", type=bool_arg, nargs="?", const=True, default=False,
                   help="pg, rg: the transformers engine instead of vLLM (a bare --use_hf, or true/false)")  # fmt: skip
    p.add_argument("--backend", default="auto", help="pg, rg: auto, vllm, transformers or openai")
    p.add_argument("--base-url", default=None,
                   help="pg, rg: an OpenAI-compatible server, e.g. vLLM's (key: OPENAI_API_KEY)")  # fmt: skip
    p.add_argument("--num-gpus", type=int, default=None, help="pg, rg: vLLM's tensor-parallel size")
    p.add_argument("--distributed-executor-backend", default=None,
                   help="pg, rg: vLLM's executor across nodes ('ray' on a Ray cluster)")  # fmt: skip
    add_replica_flags(p, "pg, rg: the engine")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: pg 64, rg 128")
    p.add_argument("--temperature", type=float, default=None, help="default: pg 1.2, rg 0.7")
    p.add_argument("--top-p", type=float, default=None, help="default: pg 0.9, rg 1.0")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed reuses the cache")
    p.add_argument("--rubric", nargs="+", default=None, help="cs: configuration names, best first")
    return p


def _options(args: Any, defaults: dict[str, float]) -> Any:
    from auto_model.options import GenerationOptions

    values = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    return GenerationOptions(
        temperature=values["temperature"],
        top_p=values["top_p"],
        max_new_tokens=int(values["max_new_tokens"]),
        seed=args.seed,
        optimized_prompt=False,
        optimized_icl=False,
        check_answers=False,  # the model's own responses are the data
    )


def _role(model: Any, args: Any, output_dir: Path) -> Any:
    """The model behind the request cache (the trainer's), so a rerun only sends what is not done."""
    from auto_model.rewards.requests import RequestCache, Role, Usage

    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "cache"
    # Up to 256 requests per engine call (the Role's chunk), each chunk cached as it returns.
    return Role(args.mode, model, RequestCache(cache_dir / "requests.sqlite"), Usage())


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="request", file=sys.stderr, disable=None)  # a bar on a terminal only


def _load(args: Any) -> Any:
    from auto_model import AutoModel
    from auto_model.backends import resolve_backend_name
    from auto_model.constants import default_model

    kwargs: dict[str, Any] = {}
    if args.base_url:  # "auto" then picks the openai backend
        kwargs["base_url"] = args.base_url
    if args.num_gpus is not None:
        kwargs["num_gpus"] = args.num_gpus
    if args.distributed_executor_backend:
        kwargs["distributed_executor_backend"] = args.distributed_executor_backend
    backend = "transformers" if args.use_hf else args.backend
    name = args.model_name_or_path or default_model()
    kwargs.update(replica_options(args, resolve_backend_name(backend, name, base_url=args.base_url)))
    return AutoModel(name, backend=backend, **kwargs)


def _prompts(args: Any, output_dir: Path) -> int:
    from auto_model.feedback.prompts import PG_SAMPLING, check_generation, generate_prompts, load_seeds

    seeds = load_seeds(args.prompt_file_path or "general")  # checked before any engine loads
    options = _options(args, {**PG_SAMPLING})
    check_generation(args.num_generation, args.max_rounds)
    output_dir.mkdir(parents=True, exist_ok=True)
    bar = _progress(args.num_generation, "prompts kept")

    def save(kept: list[str], record: dict[str, Any]) -> None:  # after every round: a crash keeps what is done
        atomic_write_text(output_dir / "prompts.txt", "".join(f"{p}\n" for p in kept))
        atomic_write_text(output_dir / "prompts.json", json.dumps(record, ensure_ascii=False, indent=1) + "\n")
        bar.update(len(kept) - bar.n)

    with _load(args) as model:
        role = _role(model, args, output_dir)
        try:
            record = generate_prompts(model, role.run, seeds, args.num_generation, options, seed=args.seed,
                                      max_rounds=args.max_rounds, on_round=save)  # fmt: skip
        finally:
            bar.close()
            role.cache.close()
    counts = record["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items()) or "none"
    print(f"auto-model-feedback: {counts['kept']} prompts kept in {record['rounds']} rounds (dropped: {dropped}) "
          f"-> {output_dir / 'prompts.txt'}", file=sys.stderr)  # fmt: skip
    if counts["kept"] < args.num_generation:
        print(f"auto-model-feedback: only {counts['kept']} of {args.num_generation} after --max_rounds "
              f"{args.max_rounds}; raise it (finished requests come from the cache)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _responses(args: Any, output_dir: Path) -> int:
    demos = load_demos(args.prompt_file_path or "careful")  # checked before any engine loads
    options = _options(args, {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 128})
    prompts_file = output_dir / "prompts.txt"
    try:
        prompts = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        raise InvalidRequestError(f"{prompts_file} does not exist: write the prompts there, one a line.") from None
    check_n_shot(demos, args.n_shot)  # before the engine loads
    with _load(args) as model:
        target = output_dir / f"{config_name(model.model_name, demos, args.n_shot)}.json"
        role = _role(model, args, output_dir)
        bar = _progress(len(prompts), "responses")
        try:
            record = generate_responses(model, prompts, demos, args.n_shot, options,
                                        run=lambda requests: role.run(requests, progress=bar.update))  # fmt: skip
        finally:
            bar.close()
            role.cache.close()
    atomic_write_text(target, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(record["counts"].items()))
    print(f"auto-model-feedback: {len(prompts)} responses ({counts}) -> {target}", file=sys.stderr)
    return 0


def read_responses(path: Path) -> dict[str, str]:
    """{prompt: response} of one configuration's responses file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRequestError(f"{path} does not exist: run --mode rg for that configuration first.") from None
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != RESPONSES_FORMAT
        or not isinstance(data.get("responses"), list)
    ):
        raise ArtifactError(f"{path} is not a responses file ({RESPONSES_FORMAT}).")
    rows = data["responses"]
    if not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
        raise ArtifactError(f"{path}: every response needs a 'prompt' string.")
    return {r["prompt"]: r.get("response") if isinstance(r.get("response"), str) else "" for r in rows}


def _comparisons(output_dir: Path, rubric: Sequence[str] | None) -> int:
    if not rubric:
        raise InvalidRequestError("--mode cs needs --rubric: the configuration names, best first.")
    responses = {name: read_responses(output_dir / f"{name}.json") for name in rubric}
    result = compare(responses, rubric)
    atomic_write_text(output_dir / "comparison.json", json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    counts: dict[str, Any] = result["counts"]
    filters = ("too_short", "bad_chosen", "identical", "over_limit")
    dropped = ", ".join(f"{k} {v}" for k, v in counts.items() if k in filters)
    target = output_dir / "comparison.json"
    print(f"auto-model-feedback: {counts.get('kept', 0)} comparisons of {counts.get('pairs', 0)} pairs"
          f"{f' (dropped: {dropped})' if dropped else ''} -> {target}", file=sys.stderr)  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from auto_model.flags import run_reporting_errors

    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_demos:
        from auto_model.feedback.prompts import shipped_seeds

        for name, path in sorted(shipped_demos().items()):
            print(f"{name}\t{path}")
        for name, path in sorted(shipped_seeds().items()):
            print(f"{name}\t{path}\t(seed prompts, --mode pg)")
        return 0
    if not args.mode or not args.output_dir:
        parser.error("--mode and --output_dir are required (or --list-demos)")
    output_dir = Path(args.output_dir)
    if args.mode == "pg":
        return run_reporting_errors("auto-model-feedback", lambda: _prompts(args, output_dir))
    if args.mode == "rg":
        return run_reporting_errors("auto-model-feedback", lambda: _responses(args, output_dir))
    return run_reporting_errors("auto-model-feedback", lambda: _comparisons(output_dir, args.rubric))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
