"""DRPO, Dynamic Rewarding with Prompt Optimization: the trainer behind the optimized prompts.

``DRPO(DRPOConfig(...)).run()`` (:mod:`auto_model.trainer.drpo`) runs a stage; the command line,
``auto-model-train``, builds the same :class:`DRPOConfig` from its flags. Stage 1
(:mod:`auto_model.trainer.icl`) improves the answers of the in-context example pool; stage 2
(:mod:`auto_model.trainer.search`) searches for the system prompt. The dynamic rewards (the LLM
judge), the request cache and usage accounting come from :mod:`auto_model.rewards`; ``templates/``
holds the optimizer's meta-prompts.
"""

from auto_model.trainer.config import DRPOConfig
from auto_model.trainer.drpo import DRPO, TrainResult

__all__ = ["DRPO", "DRPOConfig", "TrainResult"]
