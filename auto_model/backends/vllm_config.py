"""What a vLLM engine gets on this machine, decided before vLLM loads: the GPUs it may see, whether
the CPU computes in bfloat16, the KV cache a CPU engine is sized to (from the model, never a share of
the RAM), and the checked keyword arguments of ``vllm.LLM``. Pure; nothing here imports vLLM, so the
benchmarks' vLLM OpenAI servers are sized by the same rule.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence
from typing import Any

from auto_model.backends.base import dtype_name
from auto_model.constants import is_whole
from auto_model.errors import InvalidRequestError

logger = logging.getLogger("auto_model.backends.vllm")  # the engine's own log

#: The executors vLLM knows (``distributed_executor_backend``).
_EXECUTORS = {"mp", "ray", "uni", "external_launcher"}


def apply_cuda_visible_devices(value: str | int | Sequence[int] | None) -> str | None:
    """Restrict this process to the given GPUs, before CUDA starts; an error once it has.

    ``CUDA_VISIBLE_DEVICES`` is read by CUDA once, when it initialises, so the variable is set
    only while that can still take effect (and logged); setting it later would silently do nothing.
    Returns the value applied, or None when nothing was asked for.
    """
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        wanted = str(int(value))
    elif isinstance(value, str):
        wanted = ",".join(part.strip() for part in value.split(",") if part.strip())
    elif isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Integral) for v in value):
        wanted = ",".join(str(int(v)) for v in value)
    else:
        raise InvalidRequestError(f"cuda_visible_devices must be like '0,1', an int or a list of ints, got {value!r}.")
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current == wanted:
        return wanted
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise InvalidRequestError(
            f"cuda_visible_devices={wanted!r} cannot take effect: CUDA is already initialised in this process "
            f"(CUDA_VISIBLE_DEVICES={current!r}). Set CUDA_VISIBLE_DEVICES before starting Python, or create the "
            "AutoModel before anything else uses the GPU."
        )
    logger.info("Setting CUDA_VISIBLE_DEVICES=%s for this process (was %r)", wanted, current)
    os.environ["CUDA_VISIBLE_DEVICES"] = wanted
    return wanted


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (or the text given); None where it has none.

    The first processor speaks for all.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 names them flags, Arm features
            return set(value.split())
    return None


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes in bfloat16 natively (x86: AVX512-BF16 or AMX-BF16; Arm: BF16).

    Reads ``/proc/cpuinfo`` (or the text given); None where that says nothing (not Linux).
    """
    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


#: On CPUs the KV cache holds this many sequences of ``max_model_len`` tokens ...
CPU_KV_CACHE_SEQUENCES = 4
#: ... but no more than this (bytes), unless one sequence alone needs more.
CPU_KV_CACHE_CAP = 512 * 2**20
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_cache_shape(config: Any) -> tuple[int, int, int, int]:
    """``(layers, kv_heads, head_dim, context length)`` of a transformers model config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or (int(text.hidden_size) // heads))
    context = int(getattr(text, "max_position_embeddings", 0) or 0)
    return layers, kv_heads, head_dim, context


def cpu_kv_cache_bytes(
    layers: int,
    kv_heads: int,
    head_dim: int,
    max_model_len: int,
    dtype: str,
    *,
    sequences: int = CPU_KV_CACHE_SEQUENCES,
    cap: int = CPU_KV_CACHE_CAP,
) -> int:
    """The KV cache a vLLM engine on a CPU gets: what the model and the batch need, not a share of the RAM.

    ``sequences`` full-length sequences (keys and values of every layer, in the engine's dtype),
    capped at ``cap`` bytes; never less than one full sequence (plus 5% for vLLM's reserved
    block), which vLLM needs to start at all.
    """
    per_token = 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype_name(dtype), 4)
    one_sequence = per_token * max_model_len
    return max(int(one_sequence * 1.05), min(one_sequence * sequences, cap))


def model_kv_cache_bytes(
    model: str, dtype: str, max_model_len: int | None = None, *, trust_remote_code: bool = False
) -> int | None:
    """:func:`cpu_kv_cache_bytes` for a model folder (or Hub id) and the engine's dtype; None where
    the model's configuration cannot be read or says nothing of its length.

    The vLLM OpenAI servers the tests and benchmarks start get ``--kv-cache-memory-bytes`` from here,
    so every vLLM engine on a CPU is sized by the same rule.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        layers, kv_heads, head_dim, context = kv_cache_shape(config)
    except (OSError, ValueError, AttributeError, TypeError, ZeroDivisionError) as exc:
        logger.debug("Cannot size the KV cache of %s: %s", model, exc)
        return None
    length = max_model_len or context
    return cpu_kv_cache_bytes(layers, kv_heads, head_dim, int(length), dtype) if length else None


def engine_arguments(
    model: str,
    *,
    dtype: str = "auto",
    num_gpus: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    distributed_executor_backend: str | None = None,
    enable_prefix_caching: bool = True,
    trust_remote_code: bool = False,
    **engine_kwargs: Any,
) -> dict[str, Any]:
    """The keyword arguments ``vllm.LLM`` gets for the SDK's arguments (validated)."""
    if not is_whole(num_gpus, 1):
        raise InvalidRequestError(f"num_gpus must be an integer >= 1, got {num_gpus!r}.")
    if not isinstance(gpu_memory_utilization, numbers.Real) or not 0 < gpu_memory_utilization <= 1:
        raise InvalidRequestError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}.")
    if max_model_len is not None and (not isinstance(max_model_len, numbers.Integral) or max_model_len < 1):
        raise InvalidRequestError(f"max_model_len must be a positive integer or None, got {max_model_len!r}.")
    if isinstance(distributed_executor_backend, str) and distributed_executor_backend not in _EXECUTORS:
        raise InvalidRequestError(
            f"distributed_executor_backend must be one of {sorted(_EXECUTORS)} (use 'ray' across nodes), "
            f"got {distributed_executor_backend!r}."
        )
    args: dict[str, Any] = {
        "model": model,
        "dtype": dtype_name(dtype),
        "tensor_parallel_size": int(num_gpus),
        "gpu_memory_utilization": float(gpu_memory_utilization),
        "enable_prefix_caching": enable_prefix_caching,
        "trust_remote_code": trust_remote_code,
    }
    if max_model_len is not None:
        args["max_model_len"] = int(max_model_len)
    if distributed_executor_backend is not None:
        args["distributed_executor_backend"] = distributed_executor_backend
    args.update(engine_kwargs)  # anything else vLLM accepts, unchanged
    return args


__all__ = [
    "CPU_KV_CACHE_CAP",
    "CPU_KV_CACHE_SEQUENCES",
    "apply_cuda_visible_devices",
    "cpu_flags",
    "cpu_has_native_bf16",
    "cpu_kv_cache_bytes",
    "engine_arguments",
    "kv_cache_shape",
    "model_kv_cache_bytes",
]
