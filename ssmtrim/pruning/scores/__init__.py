"""Registered token scores (one module each); :func:`get_score` looks one up by name."""

from ssmtrim.pruning.scores import clipped, delta, l1, l2, random, unclipped  # noqa: F401  (register on import)
from ssmtrim.pruning.scores.base import Score, get_score, register_score, score_names, unregister_score

__all__ = ["Score", "get_score", "register_score", "score_names", "unregister_score"]
