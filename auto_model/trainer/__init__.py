"""DRPO, Dynamic Rewarding with Prompt Optimization: the trainer behind the optimized prompts.

Stage 1 (:mod:`auto_model.trainer.icl`) improves the answers of the in-context example pool; stage 2
(:mod:`auto_model.trainer.search`) searches for the system prompt. :mod:`auto_model.trainer.judge`
holds the dynamic rewards, :mod:`auto_model.trainer.llm` the request cache and usage accounting,
``templates/`` the meta-prompts. The command line is ``auto-model-train``.
"""
