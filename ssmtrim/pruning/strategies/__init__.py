"""Registered reduction strategies (one module each); :func:`get_strategy` looks one up by name."""

from ssmtrim.pruning.strategies import align, keep_order, merge, reorder, tome  # noqa: F401  (register on import)
from ssmtrim.pruning.strategies.base import (
    Strategy,
    centre_protected,
    even_when_centred,
    gather_streams,
    get_strategy,
    register_strategy,
    strategy_names,
    unregister_strategy,
)  # fmt: skip

__all__ = [
    "Strategy", "centre_protected", "even_when_centred", "gather_streams", "get_strategy", "register_strategy",
    "strategy_names", "unregister_strategy",
]  # fmt: skip
