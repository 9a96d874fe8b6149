"""Shared fixtures: real models, loaded once per session; caches in temporary folders; no Hub."""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# Idle OpenMP threads sleep instead of spinning (libgomp's OMP_WAIT_POLICY, read once when torch loads,
# so set before any test imports it, and inherited by every engine process the tests start). The
# suite runs several engines at once on two cores; spinning threads took the cores from the ones at
# work: test_vllm_backend 168.7 -> 135.2 s (280 -> 202 CPU-seconds), test_decoding with
# test_transformers_backend 213.9 -> 201.5 s (292 -> 247). A developer's own setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# With workers (pytest-xdist), every engine computes on one thread, unbound: the two workers' tests, the
# vLLM server and the processes they start share two cores, and on two threads vLLM's CPU attention
# kernel spins while it waits for a thread that lost its core to another process (perf: a third of
# the process's samples). 80 greedy tokens with the other core busy: on the vLLM server 9.4 s and 9.2
# CPU-seconds on two threads, 4.6 s and 4.5 on one (idle: 3.4 s and 4.9 against 4.5 and 4.6); on the
# in-process engine 8.6-13.9 CPU-seconds against 4.7-5.6. transformers takes the same CPU either way
# with the other core busy. ``make test`` from fresh clones, an hour apart:
# 17:12 and 1,853 user CPU-seconds before, 13:23 and 1,434 after. A developer's own settings are kept;
# a user's fresh process (``fresh_env``, ``SESSION_ENV``) does not get them.
WORKER_THREADS = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
SET_FOR_WORKERS: list[str] = []  # the names set here, which a user's fresh process does not get
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:  # read before torch loads
    SET_FOR_WORKERS = [name for name in WORKER_THREADS if name not in os.environ]
    os.environ.update({name: WORKER_THREADS[name] for name in SET_FOR_WORKERS})

HEAVY_MODULES = ("torch", "transformers", "vllm", "faiss", "sentence_transformers", "openai", "ray")


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
        mp.delenv("OPENAI_API_KEY", raising=False)
        mp.delenv("OPENAI_BASE_URL", raising=False)
        # vLLM on CPU: the engine core runs in-process (starts in ~13 s instead of ~20 s). The KV
        # cache is left to the SDK's sizing rule, which the tests check.
        mp.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        SESSION_ENV.clear()
        SESSION_ENV.update({k: v for k, v in os.environ.items() if k not in SET_FOR_WORKERS})
        yield cache


#: The environment as the session set it up, before any engine ran: an in-process vLLM engine writes
#: into os.environ (LD_PRELOAD with tcmalloc and libgomp, LOCAL_WORLD_SIZE, ...), which a child
#: process would inherit and a user's fresh process would not have.
SESSION_ENV: dict[str, str] = {}


@pytest.fixture(scope="session")
def fresh_env(isolated_env: Path) -> dict[str, str]:
    """The environment of a user's fresh process (vLLM picks its own engine-process mode there)."""
    return {k: v for k, v in SESSION_ENV.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}


class Launched:
    """A command started at once in a process of its own, its output gathered by a thread; :meth:`result`
    waits for it. A module starts its fresh-process runs this way as it begins, so that they run beside
    its in-process tests (each one mostly imports and loads on one core)."""

    def __init__(self, argv: list[str], *, timeout: float = 400, **popen: Any):
        import subprocess
        import threading

        self.argv = argv
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
        self._output = ("", "")
        self._thread = threading.Thread(target=self._gather, args=(timeout,), daemon=True)
        self._thread.start()

    def _gather(self, timeout: float) -> None:
        import subprocess

        try:
            self._output = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._output = self._proc.communicate()

    def result(self) -> Any:
        """The finished run (``subprocess.CompletedProcess``; killed after ``timeout`` seconds)."""
        import subprocess

        self._thread.join()
        return subprocess.CompletedProcess(self.argv, self._proc.returncode, *self._output)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._thread.join()


@pytest.fixture(scope="session")
def finish_later():
    """``finish_later(launched)``: a clean-up command that need not hold up the next test (stopping a
    cluster); the session waits for each before it ends."""
    pending: list[Launched] = []
    yield pending.append
    for launched in pending:
        launched.result()


def launch_collected(request: pytest.FixtureRequest, starts: dict[str, Any]) -> dict[str, Launched]:
    """Starts each run of ``starts`` (fixture name -> a function that returns a :class:`Launched`) that a
    collected test of the requesting module uses; those still running when the fixture ends are stopped."""
    started = {name: start() for name, start in starts.items() if collected(request, name)}
    request.addfinalizer(lambda: [launched.stop() for launched in started.values()])
    return started


def collected(request: pytest.FixtureRequest, fixture: str) -> bool:
    """Whether a test of the requesting module that is part of this run uses ``fixture``."""
    return any(
        getattr(item, "module", None) is request.module and fixture in getattr(item, "fixturenames", ())
        for item in request.session.items
    )


# -- Two workers (pytest-xdist) ---------------------------------------------------------------------
# The suite runs in two processes, which keep both cores busy (one process used about 1.5 of them).
# Modules are shared out whole (``--dist loadfile``), the slowest first, except that the modules that
# use the vLLM OpenAI server (or the reward model trained beside it as the session starts) are one
# unit of work that one worker runs: the server starts once. test_routing and test_heldout are another
# unit: they share one process's embeddings of the data files (:class:`EmbeddedOnce`). Each worker
# starts the in-process engines its tests use. ``-n 0`` runs everything in this process, in file order.

#: the modules with a test that uses ``vllm_server`` or ``small_rm``. The scheduler sees test ids
#: only, so they are named here, and collection fails when a module that uses one is missing.
SERVER_MODULES = ("test_best_of.py", "test_decoding.py", "test_evaluation_run.py", "test_feedback.py",
                  "test_openai_backend.py", "test_reward_model.py", "test_samples.py", "test_server_upstream.py",
                  "test_trainer_cli.py")  # fmt: skip
SERVER_FIXTURES = frozenset({"vllm_server", "small_rm"})
#: the modules that share the session's embeddings of the data files (:class:`EmbeddedOnce`)
EMBEDDING_MODULES = ("test_routing.py", "test_heldout.py")
#: modules handed out first, slowest first, so that the workers end together: those that take a minute
#: or more, then the type check (about 25 s on one core)
SLOW_MODULES = ("test_server.py", "test_vllm_backend.py", "test_default_path.py", "test_server_async.py",
                "test_transformers_backend.py", "test_routing.py", "test_model_api.py", "test_heldout.py",
                "test_replicas.py", "test_trainer_moves.py", "test_bench.py", "test_answer_check.py",
                "test_types.py")  # fmt: skip

_SETTING_UP: list[pytest.Item] = []  # the test whose fixtures are being set up


def _distributed(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")  # set in an xdist worker


def work_unit(nodeid: str) -> str:
    """What one worker runs together with the test ``nodeid``: the server's modules, the modules that
    embed every data file (:class:`EmbeddedOnce`), else its module."""
    module = nodeid.split("::", 1)[0]
    name = module.rsplit("/", 1)[-1]
    if name in SERVER_MODULES:
        return "the vLLM server's modules"
    return "the modules that embed the data files" if name in EMBEDDING_MODULES else module


def _uses(item: pytest.Item) -> set[str]:
    return set(getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = sorted({item.path.name for item in items if SERVER_FIXTURES & _uses(item)} - set(SERVER_MODULES))
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: add {', '.join(missing)} to SERVER_MODULES")
    if _distributed(config):
        # The server's modules first (their unit is the longest), those that do not use it first (it
        # starts meanwhile); then the slowest modules; the rest in file order. Every worker sorts the
        # same collection the same way.
        server = {item.path.name for item in items if "vllm_server" in _uses(item)}

        def rank(item: pytest.Item) -> tuple[int, int]:
            name = item.path.name
            if name in SERVER_MODULES:
                return 0, int(name in server)
            return (1, SLOW_MODULES.index(name)) if name in SLOW_MODULES else (2, 0)

        items.sort(key=rank)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _SETTING_UP[:] = [item]


def needed_by_this_worker() -> set[str]:
    """The fixtures that the tests of the running test's unit of work use (without workers: every test's)."""
    if not _SETTING_UP:
        return set()
    item = _SETTING_UP[0]
    if not _distributed(item.config):
        return {name for other in item.session.items for name in _uses(other)}
    unit = work_unit(item.nodeid)
    return {name for other in item.session.items if work_unit(other.nodeid) == unit for name in _uses(other)}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: two workers, or one on a single core (each worker loads its own engines, so more
    workers cost memory; ``-n N`` or ``PYTEST_XDIST_AUTO_NUM_WORKERS`` sets another number)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(2, cores))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile``, with the units of :func:`work_unit` (the server's modules, the embedding ones)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ServerModulesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ServerModulesTogether(config, log)


@pytest.fixture(scope="session")
def cache_dir(isolated_env: Path) -> Path:
    return isolated_env


@pytest.fixture(scope="session")
def smol(smol_folder: Path):
    """The embedded default model (SmolLM2-135M-Instruct) on the real transformers engine.

    (``backend="auto"`` would pick vLLM, which the test environment also has.)"""
    from auto_model import AutoModel

    model = AutoModel(backend="transformers", dtype="float32")
    yield model
    model.close()


class EarlyStarts:
    """The session's slowest set-up, started in the background as this process's first test begins,
    so that it overlaps the tests that run meanwhile (each part only where a test this process runs uses it:
    :func:`needed_by_this_worker`; a part a later group of tests needs starts with it): the embedded
    GGUF materialised into a folder (in a process of its own, off this one's interpreter lock; with
    workers, once for the run: see :meth:`_materialize`); then the
    real vLLM OpenAI server on that folder (``vllm_server``, about 40 s on 2 cores) and the first, killed
    run of the reward model's training (``small_rm``). The fixtures below wait for their part.

    Nothing here imports transformers in this process: its lazy attributes are not safe to resolve
    from two threads at once, and the ``smol`` fixture loads it as soon as the folder is there (the
    server's KV cache is sized in the materialising process)."""

    #: the server's engine settings, which its KV cache is sized for
    SERVER_DTYPE, SERVER_MAX_MODEL_LEN = "float32", 2048
    MATERIALIZE = (
        "from auto_model.backends.vllm_config import model_kv_cache_bytes\n"
        "from auto_model.constants import DEFAULT_MODEL\n"
        "from auto_model.resolve import materialize_gguf, resolve_model\n"
        "folder = materialize_gguf(resolve_model(DEFAULT_MODEL).path)\n"
        f"print(model_kv_cache_bytes(str(folder), {SERVER_DTYPE!r}, {SERVER_MAX_MODEL_LEN}))\n"
        "print(folder)\n"
    )

    def __init__(self, log_path: Path, rm_root: Path, shared: Path | None = None):
        import threading
        from concurrent.futures import Future, ThreadPoolExecutor

        self.log_path = log_path
        self.rm_root = rm_root
        self.shared = shared  # a folder the run's workers share (None without workers)
        self._pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="early-starts")
        self._lock = threading.Lock()
        self.kv_cache_bytes: int | None = None  # the server's, sized where the folder is made
        self.folder: Future[Path] | None = None
        self.server: Future[Any] | None = None
        self.rm_killed: Future[Any] | None = None

    def start(self, needed: set[str]) -> None:
        """Starts each part that a fixture in ``needed`` waits for and that is not started yet."""
        with self._lock:
            if self.folder is None and needed & {"smol_folder", "vllm_server", "small_rm"}:
                self.folder = self._pool.submit(self._materialize)
            if self.server is None and "vllm_server" in needed:
                self.server = self._pool.submit(self._serve)
            if self.rm_killed is None and "small_rm" in needed:
                self.rm_killed = self._pool.submit(self._train_rm_until_killed)

    def _materialize(self) -> Path:
        """The folder in this process's cache. With workers, the first one materialises it into the
        run's shared folder and each worker links its cache's copy there (one conversion, not one per
        worker); the rest of each worker's cache stays its own."""
        if self.shared is None:
            self.kv_cache_bytes, folder = self._run_materialize(None)
            return folder
        import fcntl
        import json

        from auto_model import constants

        self.shared.mkdir(exist_ok=True)
        with open(self.shared / "materialize.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait for the first one's folder
            record = self.shared / "materialized.json"
            if record.exists():
                self.kv_cache_bytes, made = json.loads(record.read_text())
            else:
                self.kv_cache_bytes, made = self._run_materialize(self.shared / "auto_model_cache")
                record.write_text(json.dumps([self.kv_cache_bytes, str(made)]))
        folder = constants.cache_dir() / "models" / Path(made).name
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.symlink_to(made, target_is_directory=True)
        return folder

    def _run_materialize(self, cache: Path | None) -> tuple[int, Path]:
        """Materialises in a fresh process (into ``cache``, else this process's cache): the server's KV
        cache size and the folder."""
        import subprocess
        import sys

        env = None if cache is None else {**os.environ, "AUTO_MODEL_CACHE": str(cache)}
        run = subprocess.run([sys.executable, "-c", self.MATERIALIZE], capture_output=True, text=True, timeout=600,
                             env=env)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        kv_cache_bytes, folder = run.stdout.strip().splitlines()[-2:]
        return int(kv_cache_bytes), Path(folder)

    def _serve(self):
        from auto_model.constants import DEFAULT_MODEL
        from bench.vllm_server import VLLMServer

        assert self.folder is not None
        server = VLLMServer(self.folder.result(), DEFAULT_MODEL, self.log_path, dtype=self.SERVER_DTYPE,
                            max_model_len=self.SERVER_MAX_MODEL_LEN, kv_cache_bytes=self.kv_cache_bytes)  # fmt: skip
        server.start(timeout=240)
        return server

    def _train_rm_until_killed(self) -> Any:
        """The first part of ``small_rm``: ``auto-model-rm train`` killed (SIGKILL) after its first
        checkpoint. Its data, output folder and arguments, and whether it left a finished model behind."""
        import signal
        import subprocess
        import sys
        import time
        from types import SimpleNamespace

        from rm_data import TRAIN_ARGS, comparisons

        assert self.folder is not None
        self.folder.result()  # the run loads the embedded model: materialised once, not twice at the same time
        data, output = comparisons(self.rm_root / "comparison.json"), self.rm_root / "rm"
        cli = Path(sys.executable).with_name("auto-model-rm")
        args = ["train", "--data", str(data), "--output", str(output), *TRAIN_ARGS]
        run = subprocess.Popen([str(cli), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "AUTO_MODEL_DEBUG": "1"})  # fmt: skip
        deadline = time.monotonic() + 180
        while not (output / "checkpoints" / "checkpoint-1" / "trainer_state.json").exists():
            assert run.poll() is None, run.stderr.read().decode() if run.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint in 180 s"
            time.sleep(0.2)
        run.send_signal(signal.SIGKILL)  # a crash: nothing is cleaned up
        run.wait()
        return SimpleNamespace(data=data, output=output, args=args,
                               killed_left_a_model=(output / "reward_model.json").exists())  # fmt: skip

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.server is not None and self.server.exception() is None:
            self.server.result().stop()


@pytest.fixture(scope="session", autouse=True)
def early_starts(request: pytest.FixtureRequest, isolated_env: Path, tmp_path_factory: pytest.TempPathFactory):
    log_path, rm_root = tmp_path_factory.mktemp("vllm_server") / "server.log", tmp_path_factory.mktemp("small_rm")
    # A worker's temp folder is popen-gwN inside the run's own folder, which the workers share.
    shared = tmp_path_factory.getbasetemp().parent / "shared" if _distributed(request.config) else None
    early = EarlyStarts(log_path, rm_root, shared)
    early.start(needed_by_this_worker())
    yield early
    early.close()


@pytest.fixture(scope="session")
def smol_folder(early_starts: EarlyStarts) -> Path:
    """The embedded SmolLM2 GGUF, materialised once into a plain HF folder (what vLLM loads)."""
    early_starts.start(needed_by_this_worker())
    if early_starts.folder is not None:
        return early_starts.folder.result()
    from auto_model.constants import DEFAULT_MODEL
    from auto_model.resolve import materialize_gguf, resolve_model

    return materialize_gguf(resolve_model(DEFAULT_MODEL).path)


@pytest.fixture(scope="session")
def smol_vllm(smol_folder: Path):
    """SmolLM2 on the real vLLM engine (vllm-cpu), float32 so greedy outputs compare exactly."""
    from auto_model import AutoModel

    model = AutoModel(backend="vllm", dtype="float32", max_model_len=2048, enforce_eager=True)
    yield model
    model.close()


@pytest.fixture(scope="session")
def vllm_server(early_starts: EarlyStarts) -> str:
    """A real vLLM OpenAI-compatible server for SmolLM2 on 127.0.0.1 (started early, stopped at the
    session's end); its base URL."""
    early_starts.start(needed_by_this_worker())
    if early_starts.server is None:  # asked for by name only (``request.getfixturevalue``)
        pytest.fail("vllm_server is started only for tests that name it as a fixture")
    try:
        return early_starts.server.result().url
    except RuntimeError as exc:
        pytest.fail(str(exc))


@functools.cache
def _minilm() -> Any:
    from auto_model.retrieval import load_embedder

    return load_embedder()


@pytest.fixture(scope="session")
def embedder():
    """The real all-MiniLM-L6-v2 sentence-transformers model, from its PyPI package."""
    return _minilm()


class EmbeddedOnce:
    """The session's MiniLM, each distinct text embedded once in this process: test_heldout compares
    the data files with each other many times over, and the router's training (test_routing) embeds
    the routing files among them again. One worker runs both modules (:func:`work_unit`)."""

    def __init__(self, model: Any):
        self.model = model
        self.cache: dict[str, Any] = {}

    def encode(self, texts: list[str], normalize_embeddings: bool = False, batch_size: int = 128, **kwargs: Any) -> Any:
        import numpy as np

        # What the SDK and the tests ask for: normalised vectors, as an array, without a progress bar.
        assert normalize_embeddings and isinstance(texts, list)
        assert kwargs.get("convert_to_numpy", True) and not kwargs.get("show_progress_bar", False)
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            vectors = self.model.encode(missing, normalize_embeddings=True, batch_size=batch_size)
            self.cache.update(zip(missing, vectors, strict=True))
        return np.stack([self.cache[t] for t in texts])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


@pytest.fixture(scope="session")
def embedded_once() -> EmbeddedOnce:
    return EmbeddedOnce(_minilm())  # the session's model (test_heldout's ``embedder`` is this fixture)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by Playwright (``make browser`` installs it). Module-scoped:
    Playwright's sync API keeps an event loop running while it is open, which ``asyncio.run`` in
    later tests would refuse."""
    import shutil

    chromium_path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium_path):
        pytest.skip("chromium is not installed: `make browser` installs it (apt-get, as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_offline_page(browser, html_file: Path, width: int, height: int):
    """A viewer page opened from its file in ``browser``, and the list its problems go to: console
    errors, page errors, and any request that is not for the file itself (the pages fetch nothing)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    problems: list[str] = []
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda request: request.url.startswith("file://") or problems.append(request.url))
    page.goto(html_file.as_uri())
    return page, problems


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where tests keep what a person may want to look at (screenshots): ``test-artifacts/`` or
    ``$AUTO_MODEL_TEST_ARTIFACTS``."""
    folder = Path(os.environ.get("AUTO_MODEL_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def small_rm(early_starts: EarlyStarts):
    """A reward model trained on the embedded model (``auto-model-rm train``, 2 steps, 1 layer): the run
    is killed (SIGKILL) after its first checkpoint (started as the session begins: ``EarlyStarts``) and
    resumed here with ``--resume``. Returns what that went through (for ``tests/test_reward_model.py``)
    and the finished folder (``.output``), which the tests of rewards and best-of-n score with."""
    import contextlib
    import io
    import json

    from auto_model.cli.rm import main

    early_starts.start(needed_by_this_worker())
    if early_starts.rm_killed is None:
        pytest.fail("small_rm is started only for tests that name it as a fixture")
    run = early_starts.rm_killed.result()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*run.args, "--resume"])
    assert code == 0, err.getvalue()[-2000:]
    run.summary = json.loads(out.getvalue())
    return run


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

    def __enter__(self) -> CallCounter:
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


@contextmanager
def _running(app, **config):
    """An ASGI app served by a real uvicorn on a free port of 127.0.0.1, in a thread; yields its root URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def running():
    """``with running(app) as url:`` serves an app on 127.0.0.1 for the block (real uvicorn)."""
    return _running


def pytest_report_header(config):
    return f"auto_model tests: real SmolLM2-135M + MiniLM, offline (HF_HUB_OFFLINE=1), cores={os.cpu_count()}"
