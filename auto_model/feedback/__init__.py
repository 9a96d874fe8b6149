"""Synthetic feedback (ALMoST): responses by configuration, ranked into comparisons by rules of thumb.

So far the ``rg`` stage (:func:`~auto_model.feedback.responses.generate_responses`) and the ``cs``
stage (:func:`~auto_model.feedback.comparisons.compare`), and ``auto-model-feedback --mode rg|cs``.
"""

from __future__ import annotations

from auto_model.feedback.comparisons import COMPARISONS_FORMAT, compare, response_problem

__all__ = ["COMPARISONS_FORMAT", "compare", "response_problem"]
