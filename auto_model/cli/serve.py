"""``auto-model serve``: an OpenAI-compatible server, in-process or in front of an upstream.

auto-model serve --model HuggingFaceTB/SmolLM2-135M-Instruct --api-key "$KEY"
auto-model serve --upstream http://127.0.0.1:8001/v1 --model NAME
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from auto_model import constants
from auto_model.errors import InvalidRequestError, MissingDependencyError
from auto_model.flags import add_best_of, check_best_of
from auto_model.logs import redact_url

#: ``auto-model serve``'s limits on a request body (:class:`~auto_model.server.ServerLimits`): flag, default, what
_BODY_LIMITS = (
    ("--max-stop", 8, "stop strings in a request"),
    ("--max-stop-chars", 200, "characters in a stop string"),
    ("--max-messages", 256, "messages in a conversation"),
    ("--max-parts", 64, "content parts in a message"),
    ("--max-prompts", 64, "prompts in a /v1/completions request"),
    ("--max-depth", 32, "levels of nesting in a request body"),
)


def add_parser(sub: Any) -> None:
    """The ``serve`` subcommand and its flags."""
    serve = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API, its alignment applied")
    serve.add_argument(
        "--model", default=None, help=f"model name, folder or .gguf file (default: {constants.DEFAULT_MODEL})"
    )
    serve.add_argument(
        "--backend",
        default="auto",
        help="in-process engine: auto (vllm-async where vLLM is installed, else transformers), vllm-async "
        "(continuous batching, token streaming), vllm (the offline engine, micro-batched) or transformers",
    )
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("--prompt-path", default=None, help="prompt artifact (.json) or plain-text prompt (.txt)")
    serve.add_argument("--icl-path", default=None, help="ICL pool JSON to retrieve examples from")
    serve.add_argument("--served-model-name", default=None, help="the name clients ask for (default: --model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="a key clients must send (repeatable; also AUTO_MODEL_API_KEYS, comma-separated)",
    )
    serve.add_argument(
        "--insecure", action="store_true", help="allow listening on a non-loopback address without a key"
    )
    serve.add_argument(
        "--upstream",
        default=None,
        metavar="URL",
        help="forward to this OpenAI-compatible server (e.g. http://127.0.0.1:8001/v1) instead of running the "
        "model in-process; --model is then its name there",
    )
    serve.add_argument(
        "--upstream-api-key",
        default=None,
        help="the upstream's key (default: AUTO_MODEL_UPSTREAM_API_KEY, better: a command line is visible to other "
        "users); never logged or returned",
    )
    serve.add_argument(
        "--client-system",
        default="prepend",
        choices=("prepend", "replace", "drop"),
        help="a client's own system message: prepend (the optimized prompt first, the client's after it; "
        "default), replace (it replaces the optimized prompt) or drop (ignored)",
    )
    serve.add_argument(
        "--key-file", default=None, metavar="PATH",
        help="a JSON file of keys and what each may do (or AUTO_MODEL_KEY_FILE): "
        '{"keys": [{"key": "sk-...", "name": "app", "may": ["override_alignment", "skip_answer_check"], '
        '"requests_per_minute": 60}]}',
    )  # fmt: skip
    serve.add_argument(
        "--metrics-key", default=None, metavar="KEY",
        help="the key /metrics needs (Authorization: Bearer KEY; or AUTO_MODEL_METRICS_KEY); with --api-key, any "
        "API key works too; without either, /metrics is open",
    )  # fmt: skip
    serve.add_argument(
        "--forward-field", action="append", default=[], metavar="NAME",
        help="with --upstream: forward this request field too (repeatable); the fields that would reveal or "
        "bypass the alignment (echo, chat_template, ...) cannot be",
    )  # fmt: skip
    serve.add_argument(
        "--allow-alignment-override",
        action="store_true",
        help='let a request switch its alignment with "auto_model": {"optimized_prompt": ..., "optimized_icl": '
        '..., "num_optimized_icl": ...} (refused by default)',
    )
    serve.add_argument(
        "--unchecked-key",
        action="append",
        default=[],
        help='a key (one of --api-key) whose requests may turn the answer check off with "auto_model": '
        '{"check_answers": false} (repeatable; also AUTO_MODEL_UNCHECKED_KEYS, comma-separated)',
    )
    serve.add_argument(
        "--check-window",
        type=int,
        default=None,
        metavar="CHARS",
        help="characters of a streamed answer between two answer checks (default: the artifact's, 200); a client "
        "sees only text that passed a check",
    )
    serve.add_argument("--icl", type=int, default=None, metavar="N",
                       help="in-context examples to inject (default: the artifact's, else 3)")  # fmt: skip
    add_best_of(serve, "answer each sampled, non-streaming request with the best of N samples by --reward-model")
    serve.add_argument(
        "--max-tokens", "--max-tokens-cap", dest="max_tokens", type=int, default=4096,
        help="the most new tokens a request may ask for (4096); without max_tokens, an upstream request gets "
        "this, an in-process one 512",
    )  # fmt: skip
    serve.add_argument(
        "--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get a 413 (4 MiB)"
    )
    serve.add_argument("--max-queue", type=int, default=256, help="requests that may wait; beyond it a 429 (256)")
    serve.add_argument(
        "--max-concurrency", type=int, default=64, help="requests in flight to the upstream at once (64)"
    )
    serve.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a 504 (600)")
    serve.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive; a 408 beyond (30)"
    )
    serve.add_argument(
        "--batch-window-ms",
        type=float,
        default=10.0,
        help="in-process: milliseconds to wait for more requests to batch with the first (10)",
    )
    serve.add_argument("--max-batch", type=int, default=16, help="in-process: most requests per engine call (16)")
    for flag, default, what in _BODY_LIMITS:
        serve.add_argument(flag, type=int, default=default, help=f"the most {what}; beyond it a 400 ({default})")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (uvicorn's workers); in-process, each loads its own engine (1)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until stopped."""
    """Check the options, load the model, and serve it until interrupted."""
    import ipaddress
    import os

    from auto_model.options import GenerationOptions
    from auto_model.retrieval import load_icl_pool

    try:
        import uvicorn

        from auto_model.server import ServerLimits, Upstream
        from auto_model.server.factory import OPTIONS_ENV, build, prepare_process
        from auto_model.server.protocol import check_forward_fields
        from auto_model.server.security import check_key, load_key_file
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "fastapi", "serve", purpose="to serve a model") from exc

    keys = [k for k in args.api_key if k] + constants.env_list("AUTO_MODEL_API_KEYS")
    unchecked = [k for k in args.unchecked_key if k] + constants.env_list("AUTO_MODEL_UNCHECKED_KEYS")
    key_file = args.key_file or constants.env_value("AUTO_MODEL_KEY_FILE")
    file_keys = [policy.key for policy in load_key_file(key_file)] if key_file else []  # checked before loading
    if set(unchecked) - set(keys + file_keys):
        raise InvalidRequestError(
            "--unchecked-key must be one of the server's keys (--api-key or AUTO_MODEL_API_KEYS)."
        )
    for key in [*keys, *unchecked, *([args.metrics_key] if args.metrics_key else [])]:
        check_key(key)
    if args.check_window is not None:
        from auto_model.answer_check import check_window

        check_window(args.check_window)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not (keys or file_keys) and not args.insecure:
        raise InvalidRequestError(
            f"Refusing to listen on {args.host} without an API key: pass --api-key (or AUTO_MODEL_API_KEYS), "
            "or --insecure to serve it open."
        )
    if not 0 < args.port < 65536:
        raise InvalidRequestError(f"--port must be in 1..65535, got {args.port}.")
    if args.icl is not None and args.icl < 0:
        raise InvalidRequestError(f"--icl must be >= 0, got {args.icl}.")
    if args.backend not in ("auto", "vllm-async", "vllm", "transformers"):
        raise InvalidRequestError(f"--backend must be auto, vllm-async, vllm or transformers, got {args.backend!r}.")
    GenerationOptions(num_optimized_icl=args.icl).check_pool(len(load_icl_pool(args.icl_path)))
    limits = {
        "max_body_bytes": args.max_body_bytes,
        "max_tokens": args.max_tokens,
        "max_queue": args.max_queue,
        "max_concurrency": args.max_concurrency,
        "request_timeout": args.request_timeout,
        "body_timeout": args.body_timeout,
        "batch_window": args.batch_window_ms / 1000,
        "max_batch": args.max_batch,
        **{flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in _BODY_LIMITS},
    }
    ServerLimits(**limits)  # checked before anything loads
    check_forward_fields(args.forward_field)
    if args.upstream:
        if not args.model:
            raise InvalidRequestError("--upstream needs --model: the model's name on the upstream server.")
        Upstream(args.upstream)
    if args.workers < 1:
        raise InvalidRequestError(f"--workers must be >= 1, got {args.workers}.")
    check_best_of(args.best_of, args.reward_model)
    upstream_key = args.upstream_api_key or os.environ.get("AUTO_MODEL_UPSTREAM_API_KEY")
    options = {
        "model": args.model,
        "backend": args.backend,
        "dtype": args.dtype,
        "prompt_path": args.prompt_path,
        "icl_path": args.icl_path,
        "served_model_name": args.served_model_name,
        "client_system": args.client_system,
        "icl": args.icl,
        "upstream": args.upstream,
        "allow_alignment_override": args.allow_alignment_override,
        "limits": limits,
        "best_of": args.best_of,
        "reward_model": args.reward_model,
        "check_window": args.check_window,
        "hosts": [args.host],
        "forward_fields": args.forward_field,
        "key_file": key_file,
    }
    metrics_key = args.metrics_key or constants.env_value("AUTO_MODEL_METRICS_KEY")
    name = args.served_model_name or args.model or constants.default_model()
    target = f" in front of {redact_url(args.upstream)}" if args.upstream else ""
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    if args.workers > 1:
        # Each worker process builds its own app from the options; the keys travel in the environment
        # (never in a file), as they may have come.
        os.environ[OPTIONS_ENV] = json.dumps(options)
        os.environ["AUTO_MODEL_API_KEYS"] = ",".join(keys)
        os.environ["AUTO_MODEL_UNCHECKED_KEYS"] = ",".join(unchecked)
        if metrics_key:
            os.environ["AUTO_MODEL_METRICS_KEY"] = metrics_key
        if upstream_key:
            os.environ["AUTO_MODEL_UPSTREAM_API_KEY"] = upstream_key
        print(f"auto-model: serving {name} on http://{args.host}:{args.port}/v1{target}{workers} (Ctrl-C stops)",
              file=sys.stderr)  # fmt: skip
        uvicorn.run("auto_model.server.factory:app_from_env", factory=True, workers=args.workers, host=args.host,
                    port=args.port, log_level="warning")  # fmt: skip
        return 0
    prepare_process(options)
    app, model = build({**options, "api_keys": keys, "unchecked_keys": unchecked,
                        "upstream_api_key": upstream_key, "metrics_key": metrics_key})  # fmt: skip
    # uvicorn stops gracefully on SIGTERM, then raises the signal again with the handler it found: the
    # default one ended the process before ``model.close()``, and vLLM's engine process lived on (2.3 GB,
    # polling). Found as SIGTERM's handler, SystemExit lets the engine close first (exit status 143).
    previous = _exit_on(signal.SIGTERM)
    try:
        print(f"auto-model: serving {name} on http://{args.host}:{args.port}/v1{target} (Ctrl-C stops)",
              file=sys.stderr)  # fmt: skip
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        model.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_on(signum: int) -> Any:
    """Make ``signum`` raise SystemExit(128 + signum) in the main thread; the handler it replaces (None
    off the main thread, where handlers cannot be set)."""

    def leave(received: int, frame: Any) -> None:
        raise SystemExit(128 + received)

    try:
        return signal.signal(signum, leave)
    except ValueError:  # not the main thread
        return None
