"""Reduction options shared by ``prune`` and ``report``, declared once, and their parsing into a
:class:`~ssmtrim.pruning.PruneConfig`'s fields."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ssmtrim.errors import ConfigError

LayersOpt = Annotated[str | None, typer.Option("--layers", help="1-based blocks after which to reduce, e.g. 5,10,15.")]
KeepOpt = Annotated[str | None, typer.Option("--keep", help="Fraction of patch tokens kept at each layer (one or per "
                                             "layer; default 0.8).")]
ScoreOpt = Annotated[str, typer.Option("--score", help="Token importance: clipped (default), unclipped, l1, l2, "
                                       "random, or another registered score.")]
ArrangementOpt = Annotated[str, typer.Option("--arrangement", help="Reduction strategy: align (default), keep-order, "
                                             "reorder, or another registered one.")]
GapOpt = Annotated[str, typer.Option("--gap", help="Δ estimate for pruned positions: bias (default), mean or zero.")]
ConvOpt = Annotated[str, typer.Option("--conv", help="align's conv neighbours (Vim): original positions (default) or "
                                      "the kept tokens.")]
ModeOpt = Annotated[str, typer.Option("--mode", help="count (fixed tokens per layer) or threshold.")]


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, e.g. 0.8 or 0.9,0.8,0.7; got {text!r}.") from None


def parse_layers(text: str | None, flag: str = "--layers") -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated block numbers, e.g. 5,10,15; got {text!r}.") from None


def strategy_fields(score: str, arrangement: str, gap: str, conv: str, mode: str = "count") -> dict[str, Any]:
    """The PruneConfig fields that say how tokens are reduced (not where or how many)."""
    return {"score": score, "arrangement": arrangement, "gap": gap, "conv": conv, "mode": mode}
