"""Measuring answers: judge-free proxies (:mod:`auto_model.evaluation.proxies`) and the eval set."""
