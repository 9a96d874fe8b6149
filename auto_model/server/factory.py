"""The server ``auto-model serve`` starts, built from its options — in one process, or in each of
``--workers`` processes (uvicorn's own multi-process mode calls :func:`app_from_env` in each).

The server keeps no state about a client between requests, so workers (or replicas on several
machines behind a load balancer) need nothing shared. In-process, each worker loads its own engine;
in front of an upstream, a worker builds no engine (:class:`~auto_model.server.proxy.ProxiedModel`)
and costs the embedder only, which runs on one CPU thread there.
"""

from __future__ import annotations

import json
import os
from typing import Any

from auto_model import constants
from auto_model.backends import resolve_backend_name
from auto_model.model import AutoModel
from auto_model.server.app import ServerLimits, create_app
from auto_model.server.proxy import ProxiedModel
from auto_model.server.security import load_key_file
from auto_model.server.upstream import Upstream

#: The options of ``auto-model serve``, as JSON, for ``--workers`` processes.
OPTIONS_ENV = "AUTO_MODEL_SERVE_OPTIONS"


def prepare_process(options: dict[str, Any]) -> None:
    """What a serving process sets for itself before it builds its app (the command's process, and
    each ``--workers`` process; never a caller of :func:`build`): in front of an upstream, its only
    torch work is embedding queries, and one thread does that faster here (measured with
    bench/server_proxy.py: 7.9 ms instead of 13.9 per request in front of an idle upstream, and 151
    instead of 112 requests per second at 64 in flight)."""
    if options.get("upstream"):
        import torch

        torch.set_num_threads(1)


def serving_backend(backend: str, model: str | None) -> str:
    """The in-process engine ``auto-model serve`` starts: where ``backend="auto"`` would pick vLLM,
    vLLM's asynchronous engine (``vllm-async``: continuous batching, token streaming), as vLLM's own
    server runs; any backend named is that one."""
    if backend.strip().lower() != "auto":
        return backend
    name = resolve_backend_name("auto", model or constants.DEFAULT_MODEL)
    return "vllm-async" if name == "vllm" else name


def build(options: dict[str, Any]) -> tuple[Any, AutoModel | ProxiedModel]:
    """The app and the model for these options (the names of ``auto-model serve``'s flags)."""
    limits = ServerLimits(**options.get("limits", {}))
    upstream = None
    if options.get("upstream"):
        upstream = Upstream(options["upstream"], options.get("upstream_api_key"))
        model: AutoModel | ProxiedModel = ProxiedModel(
            options["model"],
            upstream,
            prompt_path=options.get("prompt_path"),
            icl_path=options.get("icl_path"),
            reward_model=options.get("reward_model"),
        )
    else:
        model = AutoModel(
            options.get("model"),
            dtype=options.get("dtype", "auto"),
            backend=serving_backend(options.get("backend", "auto"), options.get("model")),
            prompt_path=options.get("prompt_path"),
            icl_path=options.get("icl_path"),
            reward_model=options.get("reward_model"),
        )
    app = create_app(
        model,
        served_name=options.get("served_model_name"),
        api_keys=options.get("api_keys", []),
        client_system=options.get("client_system", "prepend"),
        num_examples=options.get("icl"),
        upstream=upstream,
        allow_alignment_override=bool(options.get("allow_alignment_override")),
        limits=limits,
        best_of=options.get("best_of", 1),
        unchecked_keys=options.get("unchecked_keys", []),
        check_window=options.get("check_window"),
        hosts=options.get("hosts", ()),
        forward_fields=options.get("forward_fields", ()),
        metrics_key=options.get("metrics_key"),
        key_policies=load_key_file(options["key_file"]) if options.get("key_file") else (),
    )
    return app, model


def app_from_env() -> Any:
    """The app of one ``--workers`` process: the options the parent put in :data:`OPTIONS_ENV`."""
    options = json.loads(os.environ[OPTIONS_ENV])
    options["api_keys"] = constants.env_list("AUTO_MODEL_API_KEYS")
    options["unchecked_keys"] = constants.env_list("AUTO_MODEL_UNCHECKED_KEYS")
    options["upstream_api_key"] = constants.env_value("AUTO_MODEL_UPSTREAM_API_KEY")
    options["metrics_key"] = constants.env_value("AUTO_MODEL_METRICS_KEY")
    prepare_process(options)
    app, _ = build(options)
    return app
