"""Reduction options shared by ``prune`` and ``report``, declared once, and their parsing into a
:class:`~ssmtrim.pruning.PruneConfig`'s fields."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ssmtrim.errors import ConfigError

LayersOpt = Annotated[str | None, typer.Option("--layers", help="1-based blocks after which to reduce, e.g. 5,10,15.")]
KeepOpt = Annotated[str | None, typer.Option("--keep", help="Fraction of patch tokens kept at each layer (one or per "
                                             "layer; default 0.8).")]
ScoreOpt = Annotated[str | None, typer.Option("--score", help="Token importance: clipped, unclipped, l1, l2, delta, "
                                              "cls-attention, random, or another registered score (default: the "
                                              "family's recommendation).")]
ArrangementOpt = Annotated[str | None, typer.Option("--arrangement", help="Reduction strategy: merge, unmerge, align, "
                                                    "tome, keep-order, reorder, quartermap (VMamba), or another "
                                                    "registered one (default: the family's recommendation: merge on "
                                                    "Vim, Mamba® and PlainMamba, unmerge on VMamba and "
                                                    "MambaVision).")]
TaskOpt = Annotated[str | None, typer.Option("--task", help="What the reduced model is for, which picks the family's "
                                              "defaults: classify, or dense (its feature maps feed a detection or "
                                              "segmentation head; a family may set another plan for it: "
                                              "MambaVision's runs the MLPs on a fifth of the tokens, not a tenth, "
                                              "past its mixers-whole plan's reach). [default: classify]")]
GapOpt = Annotated[str | None, typer.Option("--gap", help="Δ estimate for skipped positions: bias (default), mean or "
                                            "zero.")]
ConvOpt = Annotated[str | None, typer.Option("--conv", help="Conv neighbours of a reduced Vim: original positions or "
                                             "the kept tokens (Vim's default: kept).")]
MetricOpt = Annotated[str | None, typer.Option("--metric", help="Merging: token similarity on the normed mixer input "
                                               "(input, default), the SSM output (y), softplus(Δ) (delta) or "
                                               "the SSM's B and C (bc; Vim, Mamba®).")]
CompensateOpt = Annotated[str | None, typer.Option("--compensate", help="Closed-form correction fitted on the "
                                                   "calibration images and folded into the classifier: head or none "
                                                   "(default: the family's recommendation, head).")]
CompensateAlphaOpt = Annotated[float | None, typer.Option("--compensate-alpha", help="Ridge strength of --compensate "
                                                          "(default 0.1).")]
DropFractionOpt = Annotated[float | None, typer.Option("--drop-fraction", help="merge: share of the removed tokens "
                                                       "(least important) dropped instead of merged (default 0).")]
ModeOpt = Annotated[str, typer.Option("--mode", help="count (fixed tokens per layer) or threshold.")]
OptionOpt = Annotated[list[str] | None, typer.Option("--option", metavar="NAME=VALUE", help="Any other option a "
                                                     "strategy or score declares (repeatable; `ssmtrim options` "
                                                     "lists them), e.g. --option mlp_share=0.2.")]


def parse_options(texts: list[str] | None) -> dict[str, Any] | None:
    """``--option NAME=VALUE`` (repeatable) -> the plan's ``options``, each checked by the plug-in declaring it."""
    if not texts:
        return None
    from ssmtrim.pruning.config import OPTION_FIELDS, declared_options
    from ssmtrim.pruning.options import parse_option

    declared = {k: v for k, v in declared_options().items() if k not in OPTION_FIELDS}
    for text in texts:
        name, sep, _ = text.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if sep and name in OPTION_FIELDS:
            raise ConfigError(f"--option {name}: it has its own flag; give --{name.replace('_', '-')} instead.")
    return dict(parse_option(text, declared) for text in texts)


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


def strategy_fields(score: str | None, arrangement: str | None, gap: str | None, conv: str | None,
                    ) -> dict[str, Any]:
    """The PruneConfig fields that say how tokens are reduced (not where or how many); None: not given."""
    return {"score": score, "arrangement": arrangement, "gap": gap, "conv": conv}
