"""vLLM's side of the loop cut: a logits processor that ends an answer once it starts to loop.

vLLM loads this module in its engine process (by the name :data:`LOGITS_PROCESSOR`, so it also
works where the engine runs in other processes). A request asks for the cut by carrying
``extra_args={EXTRA_ARG: token_id}``: the processor reads the request's text as its tokens arrive
(:class:`~auto_model.loops.LoopGuard`), and once the text loops it leaves ``token_id`` (the end of
the answer) as the only choice, so the loop stops costing tokens at the step it is seen. The SDK
then cuts the text at the loop's start (:func:`~auto_model.loops.cut_loop`).

Imported only by vLLM (it imports vllm and torch).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from auto_model.loops import LoopGuard

#: the ``SamplingParams.extra_args`` key that asks for the cut; its value is the token that ends the answer
EXTRA_ARG = "auto_model_cut_loops"
#: how ``vllm.LLM(logits_processors=[...])`` names the processor
LOGITS_PROCESSOR = "auto_model.backends.vllm_loops:LoopStopLogitsProcessor"


class LoopStopLogitsProcessor(AdapterLogitsProcessor):
    """Ends each request that asks for it (:data:`EXTRA_ARG`) where its answer starts to loop."""

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        from transformers import AutoTokenizer

        config = vllm_config.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(
            config.tokenizer, revision=config.tokenizer_revision, trust_remote_code=config.trust_remote_code
        )

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the greedy choice once a loop is seen

    def new_req_logits_processor(self, params: Any) -> Any:
        stop_token = (params.extra_args or {}).get(EXTRA_ARG)
        return None if stop_token is None else RequestLoopStop(self.tokenizer, int(stop_token))


class RequestLoopStop:
    """One request's watcher: decodes its tokens as they come and feeds the text to a guard."""

    def __init__(self, tokenizer: Any, stop_token: int):
        self.tokenizer, self.stop_token = tokenizer, stop_token
        self.guard = LoopGuard()

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not self.guard.looped and output_ids:
            self.guard.follow(self.tokenizer.decode(output_ids, skip_special_tokens=True))
        if self.guard.looped:
            forced = torch.full_like(logits, float("-inf"))
            forced[self.stop_token] = 0.0
            return forced
        return logits
