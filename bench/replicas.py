"""11. Replicas: the same batch on 2 engine replicas vs 1, on a two-node Ray cluster on this machine.

A Ray cluster of two nodes (``ray.cluster_utils.Cluster``: two raylets, one CPU each) runs
``AutoModel(backend="transformers", replicas=N, ray_address=...)``: one transformers engine per
Ray actor, one actor per node. The same greedy queries are answered with 1 and with 2 replicas
(the first as a Ray actor too, so only the replica count differs), after a warm-up, alternating
the order between repetitions; for reference, one in-process engine with both cores. Throughput
is completion tokens per second of wall time; the per-replica figures come from
``AutoModel.replica_stats()``. On 2 cores each replica gets one: the ideal is 2x.
"""

from __future__ import annotations

import logging
import sys
import time

from bench._common import Ratio, Record, finish, log, median, parser, queries, smoke_done

TARGET = 1.6


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.set_defaults(reps=2)
    args = p.parse_args(argv)
    qs = queries(args.queries)
    if args.smoke:
        plan = f"{len(qs)} queries x {args.new_tokens} tokens: 1 and 2 replicas on 2 nodes"
        return smoke_done("replicas", plan, needs=("ray",))

    import ray
    from ray.cluster_utils import Cluster

    from auto_model import AutoModel

    sampling = {"temperature": 0, "max_new_tokens": args.new_tokens, "return_details": True}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    measured: dict[str, list[tuple[int, float]]] = {"1 replica": [], "2 replicas": []}
    per_replica: list[dict] = []
    answers: dict[str, list[str]] = {}
    try:
        ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
        models = {"1 replica": AutoModel(backend="transformers", dtype="float32", replicas=1,
                                         ray_address=cluster.address)}  # fmt: skip
        # The one replica leaves a CPU free for the second model's second replica: load them one at a time.
        for name in ("1 replica", "2 replicas"):
            if name == "2 replicas":
                models["1 replica"].close()
                models[name] = AutoModel(backend="transformers", dtype="float32", replicas=2,
                                         ray_address=cluster.address)  # fmt: skip
            model = models[name]
            log(f"replicas: {name}: warm-up")
            model.generate(qs[:2], **sampling)
            for rep in range(args.reps):
                t0 = time.perf_counter()
                results = model.generate(qs, **sampling)
                seconds = time.perf_counter() - t0
                tokens = sum(r.completion_tokens for r in results)
                measured[name].append((tokens, seconds))
                answers[name] = [r.text for r in results]
                log(f"replicas: {name} rep {rep + 1}: {tokens} tokens in {seconds:.1f} s")
            if name == "2 replicas":
                per_replica = model.replica_stats()
        models["2 replicas"].close()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    log("replicas: one in-process engine (2 cores)")
    local = AutoModel(backend="transformers", dtype="float32")
    local.generate(qs[:2], **sampling)
    local_runs = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        results = local.generate(qs, **sampling)
        local_runs.append((sum(r.completion_tokens for r in results), time.perf_counter() - t0))
    same = [r.text for r in results] == answers["2 replicas"] == answers["1 replica"]
    local.close()

    def rate(runs: list[tuple[int, float]]) -> float:
        return median([t / s for t, s in runs])

    rows = [[name, runs[-1][0], median([s for _, s in runs]), rate(runs)] for name, runs in measured.items()]
    rows.append(["in-process engine, 2 cores (no Ray)", local_runs[-1][0], median([s for _, s in local_runs]),
                 rate(local_runs)])  # fmt: skip
    speedup = rate(measured["2 replicas"]) / rate(measured["1 replica"])
    record = Record(
        "replicas",
        f"11. Replicas on a two-node Ray cluster ({len(qs)} queries, up to {args.new_tokens} tokens, transformers)",
        {"queries": len(qs), "new_tokens": args.new_tokens, "reps": args.reps, "cpus_per_node": 1},
        ["configuration", "tokens", "seconds", "tokens/s"],
        rows,
        [Ratio("2 replicas / 1 replica (throughput)", speedup, TARGET)],
        notes=[
            "per replica (2 replicas, all repetitions): "
            + "; ".join(f"{s['requests']} requests, {s['tokens_per_s']} tok/s busy" for s in per_replica),
            f"greedy answers identical across the three configurations: {same}",
            "each node has one of this machine's 2 cores; more nodes (or cores) scale the same way until the "
            "driver's prompt assembly and Ray's transport become the limit",
        ],
    )
    return finish(record, args)


if __name__ == "__main__":
    sys.exit(main())
