"""A model as a backbone for dense tasks, in timm's ``features_only`` convention: ``Backbone(model)(x)`` is the list
of each stage's output on its full grid (B C H W), from a dense model or a reduced one (tokens restored to the grid,
:func:`ssmtrim.pruning.feature_maps`), and ``feature_info`` says what each map is: its channels (``num_chs``), its
stride in input pixels (``reduction``) and the block that ends its stage (``module``).
``ssmtrim.load_model(source, features_only=True)`` loads any source, a saved reduced folder included, as one.
Unlike :func:`~ssmtrim.pruning.feature_maps` the forward keeps gradients, for a head trained on the backbone."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssmtrim.errors import ConfigError
from ssmtrim.models.registry import family_of, stages_of
from ssmtrim.models.sizes import size_hw
from ssmtrim.pruning.config import PruneConfig
from ssmtrim.pruning.engine import reduced_forward

__all__ = ["Backbone"]


def _plan(model: nn.Module) -> PruneConfig:
    """The model's reduction plan, or one that reduces nothing (the dense forward through the same driver)."""
    config = getattr(model, "prune_config", None)
    if config is not None:
        return config
    if family_of(model).depth(model.config) < 2:
        raise ConfigError("a one-block model has no reduction plan to run its feature maps through.")
    return PruneConfig(layers=(1,), keep=(1.0,))


class Backbone(nn.Module):
    """``model`` (dense or reduced) giving its stages' feature maps; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(family_of(model), "feature_map", None) is None:
            raise ConfigError(f"a {family_of(model).name} model gives no feature maps (its family defines no "
                              "feature_map), so it cannot serve as a backbone.")
        self.model = model
        self.feature_info = self._describe()

    def _describe(self) -> list[dict]:
        model = self.model
        h, w = size_hw(model.config.img_size)
        with torch.no_grad():
            maps = self(torch.zeros(1, model.config.in_chans, h, w))
        family = family_of(model)
        ends = [first - 1 for first, _ in stages_of(family, model.config)[1:]] + [family.depth(model.config) - 1]
        return [{"num_chs": int(m.shape[1]), "reduction": h // int(m.shape[2]),
                 "module": family.block_name(model.config, end)} for m, end in zip(maps, ends, strict=True)]

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self.feature_info]

    def reductions(self) -> list[int]:
        return [f["reduction"] for f in self.feature_info]

    def forward(self, x: Tensor) -> list[Tensor]:
        return reduced_forward(self.model, x, _plan(self.model), maps=True).maps
