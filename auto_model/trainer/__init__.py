"""DRPO, Dynamic Rewarding with Prompt Optimization: the trainer behind the optimized prompts.

Stage 1 (:mod:`auto_model.trainer.icl`) improves the answers of the in-context example pool; stage 2
(:mod:`auto_model.trainer.search`) searches for the system prompt. The dynamic rewards (the LLM
judge), the request cache and usage accounting come from :mod:`auto_model.rewards`; ``templates/``
holds the optimizer's meta-prompts. The command line is ``auto-model-train``.
"""
