"""Measuring answers: judge-free proxies (:mod:`auto_model.rewards.proxies`) and the eval set."""
