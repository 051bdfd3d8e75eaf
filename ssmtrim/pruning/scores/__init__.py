"""Registered token scores (one module each); :func:`get_score` looks one up by name."""

from ssmtrim.pruning.scores import (  # noqa: F401  (register on import)
    clipped,
    cls_attention,
    delta,
    l1,
    l2,
    neighbour,
    random,
    unclipped,
)
from ssmtrim.pruning.scores.base import Score, get_score, register_score, score_names, unregister_score

__all__ = ["Score", "get_score", "register_score", "score_names", "unregister_score"]
