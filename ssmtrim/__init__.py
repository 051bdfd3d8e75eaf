"""ssmtrim: post-training token reduction for vision state-space models (Vim, Mamba®, PlainMamba, VMamba,
MambaVision).

Public API (imported lazily so that ``import ssmtrim`` stays light and never touches CUDA, mamba-ssm or onnx):
``load_model`` (``features_only=True``: a :class:`Backbone`), ``create_model``, ``list_models``, ``save_model``,
``describe_model``, ``count_flops``, ``PruneConfig``, ``describe_options`` (the strategies' and scores' options),
``prune``, ``calibrate``, ``apply_pruning``, ``feature_maps``, ``prune_and_save``, ``export_model`` /
``export_onnx`` / ``OnnxModel`` (ONNX, the ``export`` extra), ``selective_scan``, ``set_backend``, ``use_backend``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "ssmtrim.checkpoint",
    "resolve_source": "ssmtrim.models.loading",
    "create_model": "ssmtrim.models.registry",
    "list_models": "ssmtrim.models.registry",
    "get_spec": "ssmtrim.models.registry",
    "save_model": "ssmtrim.checkpoint",
    "describe_model": "ssmtrim.info",
    "count_flops": "ssmtrim.flops",
    "count_flops_all": "ssmtrim.flops",
    "PruneConfig": "ssmtrim.pruning",
    "describe_options": "ssmtrim.pruning",
    "apply_pruning": "ssmtrim.pruning",
    "remove_pruning": "ssmtrim.pruning",
    "prune": "ssmtrim.pruning",
    "feature_maps": "ssmtrim.pruning",
    "Backbone": "ssmtrim.pruning.backbone",
    "calibrate": "ssmtrim.pruning.calibrate",
    "prune_and_save": "ssmtrim.api",
    "export_model": "ssmtrim.api",
    "export_onnx": "ssmtrim.export",
    "OnnxModel": "ssmtrim.export",
    "selective_scan": "ssmtrim.ops",
    "selective_scan_ref": "ssmtrim.ops",
    "set_backend": "ssmtrim.ops",
    "use_backend": "ssmtrim.ops",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ssmtrim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
