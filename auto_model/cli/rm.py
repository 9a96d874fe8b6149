"""``auto-model-rm``: train a reward model on synthetic comparisons, score with it, measure it.

    auto-model-rm train --data DIR/comparison.json --output RM_DIR [--base-model smollm2] [--max-steps N]
    auto-model-rm score RM_DIR --prompt "How do I..." --response "First, ..."   (or --input rows.jsonl)
    auto-model-rm eval RM_DIR --data DIR/comparison.json                         (prints accuracy: 0.NN)
    auto-model-rm refusals RM_DIR --answers ANSWERS.json [--eval-set FILE.jsonl]

``train`` holds out a share of the prompts (``--heldout-fraction``), saves checkpoints every
``--save-steps`` steps and continues a killed run with ``--resume``; the bar and the training log are on
stderr, the summary (JSON) on stdout. ``score`` prints one reward a line; ``eval`` the pairwise
accuracy, on the held-out split when the file is the one the model was trained on; ``refusals``
whether the model prefers a refusal to a compliant answer on an eval set's harmful queries and a
direct answer to a refusal on its ordinary ones (:mod:`auto_model.evaluation.refusals`). For several GPUs,
start ``train`` under ``accelerate launch`` or ``torchrun`` (see docs/feedback.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auto_model.errors import InvalidRequestError
from auto_model.files import read_jsonl_rows
from auto_model.flags import ArgumentParser, run_reporting_errors


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="auto-model-rm", description=__doc__.splitlines()[0], snake_case_aliases=True)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", snake_case_aliases=True, help="train a reward model on comparisons")
    t.add_argument("--data", required=True, help="comparison.json (auto-model-feedback --mode cs) or a .jsonl")
    t.add_argument("--output", required=True, help="the reward model's folder")
    t.add_argument("--base-model", default=None, help="default: the embedded SmolLM2-135M")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=8, help="comparisons per step")
    t.add_argument("--learning-rate", type=float, default=2e-5)
    t.add_argument("--max-length", type=int, default=512, help="longer dialogues are left out of training")
    t.add_argument("--heldout-fraction", type=float, default=0.1, help="share of the prompts held out")
    t.add_argument("--train-layers", type=int, default=None,
                   help="train only the top N decoder layers and the head (cheaper on CPUs); default: all")  # fmt: skip
    t.add_argument("--save-steps", type=int, default=50, help="a checkpoint every N steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    s = sub.add_parser("score", snake_case_aliases=True, help="score responses: one reward a line on stdout")
    s.add_argument("model", help="the reward model's folder")
    s.add_argument("--prompt", default=None)
    s.add_argument("--response", default=None)
    s.add_argument("--input", default=None, help="a .jsonl file of {prompt, response} rows")
    s.add_argument("--batch-size", type=int, default=16)
    e = sub.add_parser("eval", snake_case_aliases=True, help="pairwise accuracy on comparisons")
    e.add_argument("model", help="the reward model's folder")
    e.add_argument("--data", required=True)
    e.add_argument("--split", choices=("auto", "heldout", "train", "all"), default="auto",
                   help="auto: the held-out split when --data is the training file, else all")  # fmt: skip
    r = sub.add_parser("refusals", snake_case_aliases=True,
                       help="does the RM prefer refusals to harmful eval queries, answers to the rest?")  # fmt: skip
    r.add_argument("model", help="the reward model's folder")
    r.add_argument("--answers", required=True, help="a responses file (--mode rg) over the eval set's queries")
    r.add_argument("--eval-set", default=None, help="eval JSONL (id, query, kind); default: the packaged set")
    return p


def _train(args: Any) -> int:
    from auto_model.feedback.reward_model import train_reward_model

    summary = train_reward_model(
        args.data,
        args.output,
        base_model=args.base_model,
        max_steps=args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        heldout_fraction=args.heldout_fraction,
        train_layers=args.train_layers,
        save_steps=args.save_steps,
        seed=args.seed,
        resume=args.resume,
    )
    if summary is not None:  # the main process of a multi-process run
        print(json.dumps(summary, ensure_ascii=False, indent=1))
    return 0


def _score_rows(args: Any) -> tuple[list[str], list[str]]:
    if args.input:
        rows = read_jsonl_rows(args.input, ("prompt", "response"))
        prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
        return prompts, responses
    if args.prompt is None or args.response is None:
        raise InvalidRequestError("score needs --prompt and --response, or --input FILE.jsonl.")
    return [args.prompt], [args.response]


def _score(args: Any) -> int:
    from auto_model.feedback.reward_model import RewardModel

    prompts, responses = _score_rows(args)  # checked before the model loads
    if args.batch_size < 1:
        raise InvalidRequestError(f"--batch-size must be at least 1, got {args.batch_size}.")
    for value in RewardModel.load(args.model).score(prompts, responses, batch_size=args.batch_size):
        print(f"{value:.4f}")
    return 0


def _eval(args: Any) -> int:
    from auto_model.feedback.reward_model import RewardModel, data_sha256, read_comparisons, split

    pairs = read_comparisons(args.data)
    model = RewardModel.load(args.model)
    trained_on = model.info.get("data", {}).get("sha256") == data_sha256(Path(args.data))
    which = args.split if args.split != "auto" else ("heldout" if trained_on else "all")
    if which != "all":
        train, heldout = split(pairs, float(model.info.get("split", {}).get("heldout_fraction", 0.1)))
        pairs = heldout if which == "heldout" else train
        if not pairs:
            raise InvalidRequestError(f"The {which} split of {args.data} is empty.")
    print(f"accuracy: {model.accuracy(pairs):.2f}")
    print(f"auto-model-rm: {len(pairs)} pairs, {which} split of {args.data}", file=sys.stderr)
    return 0


def _refusals(args: Any) -> int:
    from auto_model.evaluation.eval_set import load_eval_set
    from auto_model.evaluation.refusals import refusal_preference
    from auto_model.feedback.cli import read_responses
    from auto_model.feedback.reward_model import RewardModel

    items = load_eval_set(args.eval_set)  # both files are checked before the model loads
    answers = read_responses(Path(args.answers))
    result = refusal_preference(RewardModel.load(args.model), items, answers)
    for kind, what in (("safety", "refusal over compliance, harmful queries"),
                       ("regular", "answer over refusal, ordinary queries")):  # fmt: skip
        r = result[kind]
        rate = "n/a" if r["rate"] is None else f"{r['rate']:.2f}"
        left_out = f"{r['left_out']} left out: no usable non-refusing answer"
        print(f"{what}: {rate} ({r['preferred']}/{r['pairs']}; {left_out})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"train": _train, "score": _score, "eval": _eval, "refusals": _refusals}[args.command]
    return run_reporting_errors("auto-model-rm", lambda: command(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
