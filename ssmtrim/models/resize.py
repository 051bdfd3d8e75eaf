"""Models at another input size: ``load_model(..., img_size=384)``, ``ssmtrim convert SRC --img-size 384``.

The weights of a Vim or a PlainMamba do not depend on the input size except for the learned position embedding,
which is stored for one token grid. Changing the size therefore means a new architecture config (``img_size``) and
the position embedding interpolated to the new grid, as the official code does to fine-tune and evaluate at a new
resolution (DeiT / Vim ``main.py``, mmcls ``resize_pos_embed``). How a family's embedding is laid out (Vim's middle
class token) is the family's business: each family provides ``resize_state_dict(config, state_dict, img_size)``, as
a method of its family object or, until it has one, as a function of the module ``<family module>_resize``
(``ssmtrim/models/vim_resize.py``, ``plainmamba_resize.py``).

An input size is ``N`` (square) or ``(H, W)`` (:mod:`ssmtrim.models.sizes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ssmtrim.errors import ConfigError
from ssmtrim.memory import available_bytes
from ssmtrim.models.registry import get_family, list_models
from ssmtrim.models.sizes import ImgSize, normalize_img_size, size_hw, size_text

__all__ = ["ImgSize", "normalize_img_size", "resize_model", "resize_state_dict", "size_hw", "size_text"]

Resizer = Callable[[Any, dict[str, Tensor], ImgSize], tuple[Any, dict[str, Tensor]]]


def _resizer(family_name: str) -> Resizer:
    method = getattr(get_family(family_name), "resize_state_dict", None)  # optional in the family adapter
    if method is None:
        raise ConfigError(f"the {family_name} family cannot change its input size; load it at its own size.")
    return method


def resize_state_dict(config: Any, state_dict: dict[str, Tensor], img_size: ImgSize,
                      ) -> tuple[Any, dict[str, Tensor]]:
    """Pure: ``(config with img_size, state dict for it)``; ``img_size`` is ``N`` or ``(H, W)``. Only the position
    embedding changes; other tensors are shared with ``state_dict``. A bad size (smaller than a patch, not a whole
    number of patches) raises :class:`~ssmtrim.errors.ConfigError`."""
    return _resizer(config.family)(config, state_dict, normalize_img_size(img_size))


def check_fits_in_memory(img_size: ImgSize, in_chans: int = 3) -> None:
    """Refuse, before anything is allocated, an input size whose activations cannot fit in this machine's free memory
    (one image's float32 input alone is counted, and the first feature maps are several times larger): a huge size
    would otherwise be met by the allocator part-way, or by the system's out-of-memory killer."""
    h, w = size_hw(img_size)
    image = h * w * in_chans * 4
    free = available_bytes()
    if free is not None and 8 * image > free:
        raise ConfigError(f"--img-size {size_text(img_size)}: one image alone is {image / 2**30:.1f} GiB as float32 "
                          f"and its activations several times that, more than this machine's {free / 2**30:.1f} GiB "
                          "of free memory; give a smaller size.")


def resize_model(model: nn.Module, img_size: ImgSize) -> nn.Module:
    """A new model (eval mode, CPU) at ``img_size`` (``N`` or ``(H, W)``) with ``model``'s weights, provenance and eval
    preprocessing (the input size replaced, the crop fraction, interpolation and normalisation kept). ``model`` is
    left as it was; at its own size (a pruned model too) it is returned as it is."""
    from ssmtrim.models.loading import build_with_weights, data_config_of

    img_size = normalize_img_size(img_size)
    config = model.config
    if img_size == normalize_img_size(config.img_size):
        return model
    check_fits_in_memory(img_size, getattr(config, "in_chans", 3))
    if getattr(model, "prune_config", None) is not None:  # ssmtrim.pruning.is_pruned, without importing upwards
        raise ConfigError(f"a pruned model cannot change its input size ({size_text(config.img_size)} to "
                          f"{size_text(img_size)}: its plan and thresholds were set for the old token grid); resize "
                          "the dense model, then prune it again.")
    source = getattr(model, "source", None)
    state_dict = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    new_config, new_state = resize_state_dict(config, state_dict, img_size)
    label = source.source if source is not None else type(model).__name__
    resized = build_with_weights(new_config, new_state, label)
    data = data_config_of(model)
    resized.data_config = dataclasses.replace(data, input_size=(*data.input_size[:-2], *size_hw(img_size)))
    if source is not None:
        # the registered name of the old size would pair these weights with that size's preprocessing
        spec = next((s.name for s in list_models(include_test=True) if s.arch == new_config), None)
        resized.source = dataclasses.replace(source, spec=spec)
    return resized
