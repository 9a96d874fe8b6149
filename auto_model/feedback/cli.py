"""``auto-model-feedback``: synthetic feedback, ALMoST's stages, with the original's argument names.

    auto-model-feedback --mode cs --output_dir DIR --rubric BEST SECOND THIRD

``cs`` reads each configuration's responses (``DIR/<name>.json``, ``auto_model.responses/v1``) and
writes ``DIR/comparison.json`` (:mod:`auto_model.feedback.comparisons`). Flags are kebab-case;
the original's snake_case spellings work too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auto_model.errors import ArtifactError, InvalidRequestError
from auto_model.feedback.comparisons import compare
from auto_model.files import atomic_write_text
from auto_model.flags import ArgumentParser

RESPONSES_FORMAT = "auto_model.responses/v1"


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="auto-model-feedback", description=__doc__.splitlines()[0], snake_case_aliases=True)
    p.add_argument("--mode", required=True, choices=("cs",), help="cs: comparisons from responses, by the rubric")
    p.add_argument("--output-dir", required=True, help="the run's folder: responses in, comparison.json out")
    p.add_argument("--rubric", nargs="+", default=None, help="configuration names, best first (cs)")
    return p


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

    args = _parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    return run_reporting_errors("auto-model-feedback", lambda: _comparisons(output_dir, args.rubric))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
