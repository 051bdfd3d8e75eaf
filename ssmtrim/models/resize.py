"""Models at another input size: ``load_model(..., img_size=384)``, ``ssmtrim convert SRC --img-size 384``.

The weights of a Vim or a PlainMamba do not depend on the input size except for the learned position embedding,
which is stored for one token grid. Changing the size therefore means a new architecture config (``img_size``) and
the position embedding interpolated to the new grid, as the official code does to fine-tune and evaluate at a new
resolution (DeiT / Vim ``main.py``, mmcls ``resize_pos_embed``). How a family's embedding is laid out (Vim's middle
class token) is the family's business: each family provides ``resize_state_dict(config, state_dict, img_size)``, as
a method of its family object or, until it has one, as a function of the module ``<family module>_resize``
(``ssmtrim/models/vim_resize.py``, ``plainmamba_resize.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ssmtrim.errors import ConfigError
from ssmtrim.models.registry import get_family, list_models

Resizer = Callable[[Any, dict[str, Tensor], int], tuple[Any, dict[str, Tensor]]]


def _resizer(family_name: str) -> Resizer:
    method = getattr(get_family(family_name), "resize_state_dict", None)  # optional in the family adapter
    if method is None:
        raise ConfigError(f"the {family_name} family cannot change its input size; load it at its own size.")
    return method


def resize_state_dict(config: Any, state_dict: dict[str, Tensor], img_size: int) -> tuple[Any, dict[str, Tensor]]:
    """Pure: ``(config with img_size, state dict for it)``. Only the position embedding changes; other tensors are
    shared with ``state_dict``. A bad size (smaller than a patch, not a whole number of patches) raises
    :class:`~ssmtrim.errors.ConfigError`."""
    return _resizer(config.family)(config, state_dict, img_size)


def resize_model(model: nn.Module, img_size: int) -> nn.Module:
    """A new model (eval mode, CPU) at ``img_size`` with ``model``'s weights, provenance and eval preprocessing (the
    input size replaced, the crop fraction, interpolation and normalisation kept). ``model`` is left as it was."""
    from ssmtrim.models.loading import build_with_weights, data_config_of

    if getattr(model, "prune_config", None) is not None:  # ssmtrim.pruning.is_pruned, without importing upwards
        raise ConfigError("a pruned model cannot change its input size (its plan and thresholds were set for the "
                          "old token grid); resize the dense model, then prune it again.")
    config = model.config
    if img_size == config.img_size:
        return model
    source = getattr(model, "source", None)
    state_dict = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    new_config, new_state = resize_state_dict(config, state_dict, img_size)
    label = source.source if source is not None else type(model).__name__
    resized = build_with_weights(new_config, new_state, label)
    data = data_config_of(model)
    resized.data_config = dataclasses.replace(data, input_size=(*data.input_size[:-2], img_size, img_size))
    if source is not None:
        # the registered name of the old size would pair these weights with that size's preprocessing
        spec = next((s.name for s in list_models(include_test=True) if s.arch == new_config), None)
        resized.source = dataclasses.replace(source, spec=spec)
    return resized
