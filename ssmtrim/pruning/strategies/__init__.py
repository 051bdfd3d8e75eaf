"""Registered reduction strategies (one module each); :func:`get_strategy` looks one up by name."""

from ssmtrim.pruning.strategies import (  # noqa: F401  (register on import)
    align,
    keep_order,
    merge,
    quartermap,
    reorder,
    tome,
    unmerge,
)
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
