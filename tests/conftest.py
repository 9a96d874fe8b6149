"""Shared fixtures: real models, loaded once per session; caches in temporary folders; no Hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HEAVY_MODULES = ("torch", "transformers", "vllm", "faiss", "sentence_transformers", "openai")


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory):
    """Point every cache at a session temp folder and forbid Hub access for the whole run."""
    cache = tmp_path_factory.mktemp("auto_model_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTO_MODEL_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setenv("HF_HOME", str(cache / "hf_home"))
        mp.delenv("AUTO_MODEL_DEFAULT_MODEL", raising=False)
        mp.delenv("AUTO_MODEL_EMBEDDING_MODEL", raising=False)
        yield cache


@pytest.fixture(scope="session")
def cache_dir(isolated_env: Path) -> Path:
    return isolated_env


@pytest.fixture(scope="session")
def smol():
    """The embedded default model (SmolLM2-135M-Instruct) on the real transformers engine.

    (``backend="auto"`` would pick vLLM, which the test environment also has.)"""
    from auto_model import AutoModel

    model = AutoModel(backend="transformers", dtype="float32")
    yield model
    model.close()


@pytest.fixture(scope="session")
def embedder():
    """The real all-MiniLM-L6-v2 sentence-transformers model, from its PyPI package."""
    from auto_model.retrieval import load_embedder

    return load_embedder()


@pytest.fixture(scope="session")
def pool():
    from auto_model.retrieval import load_icl_pool

    return load_icl_pool()


class CallCounter:
    """Wraps a backend's generate to count engine calls and record the batch sizes (real engine underneath)."""

    def __init__(self, backend):
        self.backend = backend
        self.calls: list[int] = []
        self._original = backend.generate

    def __enter__(self) -> "CallCounter":
        def counted(requests, **kwargs):
            self.calls.append(len(requests))
            return self._original(requests, **kwargs)

        self.backend.generate = counted
        return self

    def __exit__(self, *exc) -> None:
        self.backend.generate = self._original


@pytest.fixture
def count_calls():
    return CallCounter


def pytest_report_header(config):
    return f"auto_model tests: real SmolLM2-135M + MiniLM, offline (HF_HUB_OFFLINE=1), cores={os.cpu_count()}"
