"""``auto-model-feedback``: synthetic feedback, ALMoST's stages, with the original's argument names.

    auto-model-feedback --mode rg --output_dir DIR --model_name_or_path M --prompt_file_path careful --n_shot 3
    auto-model-feedback --mode cs --output_dir DIR --rubric BEST SECOND THIRD
    auto-model-feedback --list-demos

``rg`` answers every prompt of ``DIR/prompts.txt`` (one a line) with one configuration and writes
``DIR/<model>-<demos>-<n>shot.json`` (:mod:`auto_model.feedback.responses`). ``cs`` reads each
configuration's responses and writes ``DIR/comparison.json``
(:mod:`auto_model.feedback.comparisons`). Flags are kebab-case; the original's snake_case spellings
work too.
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
from auto_model.flags import ArgumentParser, bool_arg


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="auto-model-feedback", description=__doc__.splitlines()[0], snake_case_aliases=True)
    p.add_argument("--mode", choices=("rg", "cs"), help="rg: responses of one configuration; cs: comparisons")
    p.add_argument("--output-dir", help="the run's folder: prompts.txt, the responses, comparison.json")
    p.add_argument("--list-demos", action="store_true", help="print the shipped demonstration files and exit")
    p.add_argument("--model-name-or-path", default=None, help="rg: the model (default: the embedded one)")
    p.add_argument("--prompt-file-path", default="careful", help="rg: a demonstration file, or careful / plain")
    p.add_argument("--n-shot", type=int, default=3, help="rg: demonstrations per prompt (1, 3, 5...)")
    p.add_argument("--use-hf", type=bool_arg, nargs="?", const=True, default=False,
                   help="rg: the transformers engine instead of vLLM (a bare --use_hf, or true/false)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--rubric", nargs="+", default=None, help="cs: configuration names, best first")
    return p


def _responses(args: Any, output_dir: Path) -> int:
    from auto_model import AutoModel
    from auto_model.constants import default_model
    from auto_model.options import GenerationOptions

    demos = load_demos(args.prompt_file_path)  # checked before any engine loads
    options = GenerationOptions(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    prompts_file = output_dir / "prompts.txt"
    try:
        prompts = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        raise InvalidRequestError(f"{prompts_file} does not exist: write the prompts there, one a line.") from None
    check_n_shot(demos, args.n_shot)  # before the engine loads
    model_name = args.model_name_or_path or default_model()
    target = output_dir / f"{config_name(model_name, demos, args.n_shot)}.json"
    with AutoModel(model_name, backend="transformers" if args.use_hf else "auto") as model:
        record = generate_responses(model, prompts, demos, args.n_shot, options)
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
    from auto_model.cli import run_reporting_errors

    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_demos:
        for name, path in sorted(shipped_demos().items()):
            print(f"{name}\t{path}")
        return 0
    if not args.mode or not args.output_dir:
        parser.error("--mode and --output_dir are required (or --list-demos)")
    output_dir = Path(args.output_dir)
    if args.mode == "rg":
        return run_reporting_errors("auto-model-feedback", lambda: _responses(args, output_dir))
    return run_reporting_errors("auto-model-feedback", lambda: _comparisons(output_dir, args.rubric))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
