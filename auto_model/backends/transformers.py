"""The transformers engine: the CPU fallback that runs the embedded default model.

Loads a local Hugging Face folder, a GGUF file (materialised once into a plain folder in the
cache, see :func:`auto_model.resolve.materialize_gguf`) or a Hub id. A batch is generated in
micro-batches of similar length (requests that begin alike together), the beginning they share
taken from the prefix cache (:mod:`auto_model.backends.transformers_prefix`); temperature 0 is
greedy decoding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from auto_model import constants
from auto_model.backends.base import (
    Backend,
    Completion,
    CompletionCallback,
    FinishReason,
    GenerationRequest,
    Outcome,
    SamplingParams,
    StopCutter,
    StreamEnd,
    check_one_sample,
    choose_prompt_style,
    cpu_dtype,
    cut_at_stop,
    dtype_name,
    encode_prompt,
    with_samples,
)
from auto_model.backends.transformers_prefix import PrefixCache, supports_prefix_cache
from auto_model.backends.transformers_sampling import (
    AnswerStop,
    OutputPenalty,
    RowSeededSampler,
    global_seed,
    sample_seed,
    samples_per_row,
    sampling_key,
    turn_taking_streamer,
)
from auto_model.errors import (
    GenerationError,
    InvalidRequestError,
    MissingDependencyError,
    ModelNotFoundError,
)
from auto_model.logs import engine_progress_bars
from auto_model.resolve import ModelSource, gguf_parsed_once, gguf_special_token_flags, materialize_gguf

logger = logging.getLogger(__name__)


def _import_torch_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise MissingDependencyError("transformers", "hf", purpose="for the transformers backend") from exc
    return torch, transformers


class TransformersBackend(Backend):
    """Local generation with ``transformers``.

    Args:
        source: the resolved model.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``. ``"auto"`` is float32 on a
            CPU (see :func:`~auto_model.backends.base.cpu_dtype`), the checkpoint's dtype on CUDA.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; default: CUDA when available, else CPU.
        num_gpus: on CUDA, how many of the visible devices to spread the model over.
        cuda_visible_devices: on CUDA, which device indices to use (``"0,1"``); no environment is changed.
        gpu_memory_utilization: on CUDA, the fraction of each device's memory the weights may take.
        max_model_len: longest prompt + answer allowed (default: the model's context length).
        prompt_format: ``"auto"`` (chat if the model has a chat template and is not a known base
            model), ``"chat"`` or ``"base"``.
        batch_size: requests per forward batch.
        materialize_gguf: convert GGUF once to a cached folder (fast reloads) instead of
            de-quantising it on every load.
        enable_prefix_caching: keep the KV cache of recent prompts and reuse the beginning that
            requests share (the route's system prompt), as vLLM does; on by default. See
            :mod:`auto_model.backends.transformers_prefix`.
        trust_remote_code: run code shipped with a Hub model; off unless you ask.
        **from_pretrained_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` unchanged.
    """

    tokenizer: Any  # loaded with the model

    name = "transformers"
    supports_chat = False  # chat is rendered locally with the tokenizer's template
    # frequency and presence penalties are this backend's own logits processor (OutputPenalty)
    decoding_settings = frozenset(
        {"repetition_penalty", "no_repeat_ngram_size", "frequency_penalty", "presence_penalty"}
    )

    def __init__(
        self,
        source: ModelSource,
        *,
        dtype: str = "auto",
        device: str | None = None,
        num_gpus: int = 1,
        cuda_visible_devices: str | int | Sequence[int] | None = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        prompt_format: str = "auto",
        batch_size: int = 8,
        materialize_gguf: bool = True,
        enable_prefix_caching: bool = True,
        trust_remote_code: bool = False,
        **from_pretrained_kwargs: Any,
    ):
        torch, transformers = _import_torch_transformers()
        self._torch, self._transformers = torch, transformers
        self.model_id = source.model_id
        self.source = source
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidRequestError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size = batch_size
        load_kwargs: dict[str, Any] = dict(from_pretrained_kwargs)
        if trust_remote_code:
            load_kwargs["trust_remote_code"] = True
        load_kwargs.update(self._placement(device, num_gpus, cuda_visible_devices, gpu_memory_utilization))
        torch_dtype = self._dtype(cpu_dtype(dtype) if self.device == "cpu" else dtype)

        path, tok_kwargs = self._weights(source, materialize_gguf)
        if source.kind == "hub" and constants.offline():
            tok_kwargs["local_files_only"] = True
            load_kwargs["local_files_only"] = True
        try:
            with gguf_parsed_once():  # a GGUF file is parsed once, not once per part read from it
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                    path, **tok_kwargs, **({"trust_remote_code": True} if trust_remote_code else {})
                )
                with engine_progress_bars():
                    self.model = transformers.AutoModelForCausalLM.from_pretrained(
                        path, dtype=torch_dtype, **tok_kwargs, **load_kwargs
                    )
                if "gguf_file" in tok_kwargs:  # read straight from GGUF: restore the BOS/EOS flags it records
                    for flag, value in gguf_special_token_flags(Path(source.path)).items():
                        setattr(self.tokenizer, flag, value)
        except OSError as exc:
            raise ModelNotFoundError(
                f"Could not load {source.name!r} with transformers: {exc}. Pass a local folder or .gguf file, "
                "a packaged model (e.g. HuggingFaceTB/SmolLM2-135M-Instruct), or a Hub id that is in your cache."
            ) from exc
        self.model.eval()
        if "device_map" not in load_kwargs:
            self.model.to(self.device)
        self.tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos_ids = self._eos_ids()
        self.prefix_cache = (
            PrefixCache(self.model) if enable_prefix_caching and supports_prefix_cache(self.model) else None
        )
        self.context_length = max_model_len or getattr(self.model.config, "max_position_embeddings", None)
        self.prompt_style = choose_prompt_style(
            prompt_format, bool(getattr(self.tokenizer, "chat_template", None)), source.chat, source.model_id
        )
        logger.info(
            "Loaded %s with transformers on %s (%s, %s prompts)",
            source.model_id,
            self.device,
            self.model.dtype,
            self.prompt_style,
        )

    # -- loading -----------------------------------------------------------------------------

    def _dtype(self, dtype: Any) -> Any:
        name = dtype_name(dtype)
        return "auto" if name == "auto" else getattr(self._torch, name)

    def _placement(
        self, device: str | None, num_gpus: int, cuda_visible_devices: Any, gpu_memory_utilization: float
    ) -> dict[str, Any]:
        torch = self._torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if not device.startswith("cuda"):
            ignored = {
                "num_gpus": num_gpus if num_gpus != 1 else None,
                "cuda_visible_devices": cuda_visible_devices,
                "gpu_memory_utilization": gpu_memory_utilization if gpu_memory_utilization != 0.9 else None,
            }
            ignored = {k: v for k, v in ignored.items() if v is not None}
            if ignored:
                logger.debug("Running on %s: GPU-only arguments %s are ignored", device, ignored)
            self.device = device
            return {}
        if not torch.cuda.is_available():
            raise InvalidRequestError(f"device={device!r} was asked for but CUDA is not available; use device='cpu'.")
        count = torch.cuda.device_count()
        if cuda_visible_devices is None:
            ids = list(range(count))
        elif isinstance(cuda_visible_devices, int):
            ids = [cuda_visible_devices]
        elif isinstance(cuda_visible_devices, str):
            ids = [int(x) for x in cuda_visible_devices.replace(" ", "").split(",") if x]
        else:
            ids = [int(x) for x in cuda_visible_devices]
        bad = [i for i in ids if not 0 <= i < count]
        if bad:
            raise InvalidRequestError(
                f"cuda_visible_devices names devices {bad}, but only {count} CUDA device(s) are visible."
            )
        if not isinstance(num_gpus, int) or num_gpus < 1 or num_gpus > len(ids):
            raise InvalidRequestError(
                f"num_gpus must be between 1 and {len(ids)} (the devices available), got {num_gpus!r}."
            )
        if not 0 < gpu_memory_utilization <= 1:
            raise InvalidRequestError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}.")
        ids = ids[:num_gpus]
        self.device = f"cuda:{ids[0]}"
        if device.startswith("cuda:") and len(ids) == 1 and cuda_visible_devices is None:
            self.device = device
            return {}
        max_memory = {i: int(torch.cuda.get_device_properties(i).total_memory * gpu_memory_utilization) for i in ids}
        return {"device_map": "auto" if len(ids) > 1 else {"": ids[0]}, "max_memory": max_memory}

    @staticmethod
    def _weights(source: ModelSource, materialize: bool) -> tuple[str, dict[str, Any]]:
        if source.kind != "gguf":
            return source.path, {}
        if materialize:
            return str(materialize_gguf(source.path)), {}
        gguf = Path(source.path)
        return str(gguf.parent), {"gguf_file": gguf.name}

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(int(v) for v in value)
        return ids

    # -- generation --------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerationRequest], *, on_completion: CompletionCallback | None = None
    ) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(requests)

        def finish(i: int, outcome: Outcome) -> None:
            results[i] = outcome
            if on_completion is not None:
                on_completion(i, outcome)

        encoded: dict[int, list[int]] = {}
        for i, req in enumerate(requests):
            try:
                encoded[i] = self._checked_encode(i, req)
            except InvalidRequestError as exc:  # this request alone is bad; the others still run
                finish(i, exc)
        # Group identical sampling settings (the seed aside: each row samples from its own stream),
        # then batch neighbours in length so padding stays small.
        groups: dict[str, list[int]] = {}
        for i in encoded:
            groups.setdefault(sampling_key(requests[i].sampling), []).append(i)
        chunks = [chunk for indices in groups.values() for chunk in self._batches(indices, encoded)]
        for chunk in chunks:
            t0 = time.perf_counter()
            try:
                outs: list[Outcome] = list(
                    self._generate_batch(
                        [encoded[i] for i in chunk],
                        requests[chunk[0]].sampling,
                        seeds=[requests[i].sampling.seed for i in chunk],
                    )
                )
            except GenerationError as exc:  # one bad row fails the batch: each request again, alone
                outs = [exc] if len(chunk) == 1 else [self._alone(encoded[i], requests[i]) for i in chunk]
            latency = time.perf_counter() - t0
            for i, outcome in zip(chunk, outs, strict=True):
                if isinstance(outcome, Completion):
                    outcome = replace(
                        outcome,
                        latency_s=latency,
                        samples=tuple(replace(s, latency_s=latency) for s in outcome.samples),
                    )
                finish(i, outcome)
        return [r for r in results if r is not None]

    def _batches(self, indices: list[int], encoded: dict[int, list[int]]) -> list[list[int]]:
        """``indices`` cut into batches: neighbours in length, so that padding stays small; with the
        prefix cache, requests that begin alike (the same system prompt) are batched together first."""
        by_length = sorted(indices, key=lambda i: len(encoded[i]))
        families = [by_length]
        if self.prefix_cache is not None:
            families = self.prefix_cache.families([encoded[i] for i in by_length], by_length)
        return [
            family[start : start + self.batch_size]
            for family in families
            for start in range(0, len(family), self.batch_size)
        ]

    def _alone(self, ids: list[int], request: GenerationRequest) -> Outcome:
        """One request in a batch of its own: its completion, or the error it fails with."""
        try:
            return self._generate_batch([ids], request.sampling, seeds=[request.sampling.seed])[0]
        except GenerationError as exc:
            return exc

    def stream(self, request: GenerationRequest, end: StreamEnd | None = None) -> Iterator[str]:
        """Yield text as tokens are generated (a background thread runs ``model.generate``, a token
        at a time while this generator is read: between two chunks it stands still)."""
        ids = self._checked_encode(0, request)
        cancelled = threading.Event()
        streamer = turn_taking_streamer(self.tokenizer, cancelled, keep_rng=global_seed(request.sampling) is not None)
        failure: list[BaseException] = []
        finished: list[Completion] = []

        def run() -> None:
            try:
                finished.extend(self._generate_batch([ids], request.sampling, streamer=streamer, cancelled=cancelled))
            except BaseException as exc:  # surfaced in the caller's thread below
                failure.append(exc)
                streamer.on_finalized_text("", stream_end=True)

        worker = threading.Thread(target=run, name="auto-model-stream", daemon=True)
        worker.start()
        cutter = StopCutter(request.sampling.stop)
        try:
            for piece in streamer:
                out = cutter.feed(piece)
                if out:
                    yield out
            tail = cutter.flush()
            if tail:
                yield tail
        finally:
            cancelled.set()  # a caller that stops reading stops the generation at the next token
            streamer.stop()
            worker.join()
        if failure:
            raise failure[0]
        if end is not None and finished:
            end.fill(finished[0])

    def _checked_encode(self, i: int, req: GenerationRequest) -> list[int]:
        if not isinstance(req.prompt, str):
            raise InvalidRequestError(
                f"Request {i}: the transformers backend takes rendered text prompts, not message lists; "
                "assemble with format='chat' and the backend's tokenizer."
            )
        check_one_sample(req.sampling.extra, f"Request {i}: ")
        if req.sampling.json_schema is not None:
            raise InvalidRequestError(
                f"Request {i}: the transformers backend cannot constrain a reply to a JSON schema; "
                "use the vllm or openai backend, or leave json_schema unset."
            )
        ids = self._encode(req.prompt)
        if self.context_length and len(ids) + req.sampling.max_new_tokens > self.context_length:
            raise InvalidRequestError(
                f"Request {i}: {len(ids)} prompt tokens + max_new_tokens={req.sampling.max_new_tokens} exceed "
                f"the context length {self.context_length}; shorten the query, lower max_new_tokens or "
                "num_optimized_icl."
            )
        return ids

    def _encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.prompt_style)

    def _generate_batch(
        self,
        batch: list[list[int]],
        sampling: SamplingParams,
        streamer: Any = None,
        seeds: Sequence[int | None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> list[Completion]:
        """One ``model.generate`` call. ``seeds``: one per row (default: ``sampling.seed`` for all);
        ``cancelled``: once set, generation stops at the next token. With ``sampling.n`` > 1, each
        row is sampled n times in the same call (the row repeated n times, as ``num_return_sequences``
        does, which transformers allows only for its own sampler); its first sample draws from the
        row's seed, as a request with n = 1 would, the others from seeds derived from it."""
        torch = self._torch
        n = sampling.n
        if n > 1 and sampling.temperature == 0:
            raise InvalidRequestError("n > 1 samples need temperature > 0: greedy answers would all be the same.")
        rows = [ids for ids in batch for _ in range(n)]
        width = max(len(ids) for ids in rows)
        pad = self.tokenizer.pad_token_id
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "pad_token_id": pad,
            "eos_token_id": sorted(self.eos_ids) or None,
        }
        seeds = list(seeds) if seeds is not None else [sampling.seed] * len(batch)
        own_sampler = samples_per_row(sampling)
        if sampling.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        elif own_sampler:
            # Unseeded rows draw their seed from torch's generator (torch.manual_seed still fixes them).
            row_seeds = [int(torch.randint(2**62, ())) if s is None else int(s) for s in seeds]
            row_seeds = [sample_seed(seed, j) for seed in row_seeds for j in range(n)]  # one per sample
            try:
                sampler = RowSeededSampler(row_seeds, sampling.temperature, sampling.top_p)
            except (ValueError, OverflowError) as exc:  # a seed torch cannot take
                raise GenerationError(f"transformers generation failed: {exc}") from exc
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            kwargs["logits_processor"] = self._transformers.LogitsProcessorList([sampler])
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        extra = dict(sampling.extra)
        penalty = OutputPenalty(width, extra.pop("frequency_penalty", 0.0), extra.pop("presence_penalty", 0.0))
        if penalty.active:  # before the row sampler, which must see the final logits
            processors = [penalty, *kwargs.get("logits_processor", [])]
            kwargs["logits_processor"] = self._transformers.LogitsProcessorList(processors)
        kwargs.update(extra)
        if streamer is not None:
            kwargs["streamer"] = streamer
        criteria: list[Any] = []
        if cancelled is not None:
            event = cancelled

            def stop_when_cancelled(input_ids: Any, scores: Any, **_: Any) -> Any:
                return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool)

            criteria.append(stop_when_cancelled)
        if sampling.stop or sampling.cut_loops:
            criteria.append(AnswerStop(self.tokenizer, width, len(rows), sampling.stop, sampling.cut_loops))
        if criteria:
            kwargs["stopping_criteria"] = self._transformers.StoppingCriteriaList(criteria)
        seed = global_seed(sampling)
        rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
        try:
            with rng, torch.inference_mode():
                # The beginning the rows share comes from the prefix cache (see transformers_prefix): each
                # row is that beginning, its padding, then its own tokens. Without it, padding comes first.
                shared, cache = self.prefix_cache.for_rows(rows) if self.prefix_cache else (0, None)
                layout = [(ids[:shared], [pad] * (width - len(ids)), ids[shared:]) for ids in rows]
                input_ids = torch.tensor([a + b + c for a, b, c in layout], device=self.device)
                mask = [[1] * len(a) + [0] * len(b) + [1] * len(c) for a, b, c in layout]
                attention = torch.tensor(mask, device=self.device)
                if seed is not None:
                    torch.manual_seed(seed)  # inside fork_rng: the caller's RNG state is restored
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=attention, past_key_values=cache, **kwargs
                )
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GenerationError(f"transformers generation failed: {exc}") from exc
        completions = []
        for r, ids in enumerate(batch):
            samples = [self._completion(row[width:].tolist(), len(ids), sampling) for row in out[r * n : (r + 1) * n]]
            completions.append(with_samples(samples))
        return completions

    def _completion(self, generated: list[int], prompt_tokens: int, sampling: SamplingParams) -> Completion:
        pad = self.tokenizer.pad_token_id
        n, ended = len(generated), False
        for j, tok in enumerate(generated):
            if tok in self.eos_ids:
                n, ended = j + 1, True
                break
            if tok == pad:  # finished early by a stop string; the rest is padding
                n = j
                break
        text, cut = cut_at_stop(self.tokenizer.decode(generated[:n], skip_special_tokens=True), sampling.stop)
        ended = ended or cut
        finish: FinishReason = "stop" if ended or n < sampling.max_new_tokens else "length"
        return Completion(text=text, finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=n)

    def close(self) -> None:
        self.model = self.prefix_cache = None  # the cache holds the model and its KV
