"""14. A short request beside a long stream, on an engine that runs one batch at a time (transformers).

One transformers engine (the embedded model, float32), greedy. Measured, each ``--reps`` times
(the median is kept):

* **the short request alone**: ``generate`` of one question, ``--short-tokens`` new tokens;
* **the long stream alone**: ``stream`` of a story, exactly ``--long-tokens`` new tokens, read to its end;
* **together**: the same stream, and once its first chunk is read, the short request from another
  thread, as a second user of the same model (or of ``auto-model serve``) sends it.

The engine takes one batch at a time; a stream lets the requests that wait go first between two of
its chunks (:class:`auto_model.engine.Turns`). Figures: the short request's time beside the stream
against its time alone (target at most 2x; a request that waited for the whole stream would take
the stream's time), and the stream's time with the short request against alone (at most 1.25x).
The answer check and the loop cut are off for both: only the engine's sharing is measured.
"""

from __future__ import annotations

import sys
import threading
import time

from bench._common import Ratio, Record, finish, log, median, parser, smoke_done, timed

SHORT_TARGET = 2.0
STREAM_TARGET = 1.25
SHORT = "Name a fruit."
LONG = "Tell me a long story about a dragon."


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--short-tokens", type=int, default=8)
    p.add_argument("--long-tokens", type=int, default=150)
    args = p.parse_args(argv)
    if args.smoke:
        plan = f"{args.short_tokens}-token request beside a {args.long_tokens}-token stream, transformers"
        return smoke_done("stream_sharing", plan, needs=("transformers",))

    from auto_model import AutoModel

    model = AutoModel(backend="transformers", dtype="float32")
    plain = {"temperature": 0, "check_answers": False, "cut_loops": False}
    short = {**plain, "max_new_tokens": args.short_tokens}
    long = {**plain, "max_new_tokens": args.long_tokens, "min_new_tokens": args.long_tokens}

    def ask() -> float:
        return timed(lambda: model.generate(SHORT, **short))[1]

    def together() -> tuple[float, float]:
        took: list[float] = []
        t0 = time.perf_counter()
        chunks = model.stream(LONG, **long)
        next(chunks)
        other = threading.Thread(target=lambda: took.append(ask()))
        other.start()
        "".join(chunks)
        streamed = time.perf_counter() - t0
        other.join()
        return took[0], streamed

    log("stream_sharing: warm-up")
    model.generate(SHORT, **short)
    times: dict[str, list[float]] = {"short": [], "stream": [], "short beside": [], "stream beside": []}
    for rep in range(args.reps):
        times["short"].append(ask())
        times["stream"].append(timed(lambda: "".join(model.stream(LONG, **long)))[1])
        beside, streamed = together()
        times["short beside"].append(beside)
        times["stream beside"].append(streamed)
        log(f"stream_sharing: rep {rep + 1}: short {times['short'][-1]:.2f} s alone, {beside:.2f} s beside the "
            f"stream; stream {times['stream'][-1]:.2f} s alone, {streamed:.2f} s with it")  # fmt: skip
    model.close()

    m = {name: median(values) for name, values in times.items()}
    rows = [
        [f"short request ({args.short_tokens} tokens)", m["short"], m["short beside"]],
        [f"long stream ({args.long_tokens} tokens)", m["stream"], m["stream beside"]],
    ]
    record = Record(
        "stream_sharing",
        "14. A short request beside a long stream (transformers, SmolLM2-135M-Instruct)",
        {"short_tokens": args.short_tokens, "long_tokens": args.long_tokens, "reps": args.reps, "greedy": True},
        ["request", "alone, s (median)", "together, s (median)"],
        rows,
        [
            Ratio("short request beside the stream / alone", m["short beside"] / m["short"], SHORT_TARGET, False),
            Ratio("stream with the short request / alone", m["stream beside"] / m["stream"], STREAM_TARGET, False),
        ],
        notes=["the short request is sent once the stream's first chunk is read; float32; check and loop cut off"],
    )
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
