"""What ``ssmtrim info`` reports about a model: architecture, size, tokens, preprocessing and the scan backend."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssmtrim.checkpoint import load_model
from ssmtrim.models.loading import data_config_of, num_params, num_tokens
from ssmtrim.models.registry import DataConfig, create_model, find_spec
from ssmtrim.models.resize import resize_model
from ssmtrim.models.sizes import ImgSize
from ssmtrim.ops.backend import describe_backends, resolve_backend


@dataclass
class ModelInfo:
    name: str
    family: str
    arch: dict[str, Any]
    parameters: int
    tokens: int
    input_size: tuple[int, int, int]
    preprocessing: dict[str, Any]
    weights: str
    backend: str
    backends: dict[str, str] = field(default_factory=dict)
    pretrained: list[dict[str, Any]] = field(default_factory=list)
    gflops: dict[str, float] = field(default_factory=dict)  # per image: "paper" and "full" conventions
    pruning: dict[str, Any] | None = None  # the plan of a pruned model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gflops(model: nn.Module) -> dict[str, float]:
    """GFLOPs per image in both conventions; left out, said aloud, when fvcore is not installed."""
    from ssmtrim.errors import MissingDependencyError
    from ssmtrim.flops import count_flops_all
    from ssmtrim.notices import notice

    try:
        return {c: r.gflops for c, r in count_flops_all(model).items()}
    except MissingDependencyError:
        notice("no-fvcore", "fvcore is not installed, so the GFLOPs are left out; pip install fvcore to count them.")
        return {}


def _geometry(data: DataConfig) -> dict[str, Any]:
    """The resize and crop of the eval transform (:func:`ssmtrim.data.resize_crop`)."""
    h, w = data.input_size[-2:]
    if h == w:
        return {"resize_short_side": round(w / data.crop_pct), "center_crop": w}
    return {"resize": f"{math.floor(h / data.crop_pct)}x{math.floor(w / data.crop_pct)}", "center_crop": f"{h}x{w}"}


def describe_model(source: str | os.PathLike | nn.Module, device: str = "cpu", flops: bool = True,
                   img_size: ImgSize | None = None) -> ModelInfo:
    """Describe a model. A registered name is described from its architecture alone (nothing is downloaded).
    ``flops`` adds the GFLOPs per image (one fvcore trace, about a second on CPU). ``img_size`` (N or (H, W))
    describes it loaded for another input size (:func:`ssmtrim.models.resize.resize_model`)."""
    from ssmtrim.devices import check_device

    device = str(check_device(device))
    spec = None
    if isinstance(source, nn.Module):
        model = source if img_size is None else resize_model(source, img_size)
        loaded_from = getattr(model, "source", None)
        weights = f"{loaded_from.kind}: {loaded_from.path}" if loaded_from is not None else "in memory"
    elif (spec := find_spec(str(source))) is not None and not Path(str(source)).exists():
        model = create_model(spec.name)
        if img_size is not None:
            model.data_config = spec.data  # resized with the registered preprocessing, at the new size
            model = resize_model(model, img_size)
        weights = "not loaded (architecture only)"
    else:
        model = load_model(source, device=device, img_size=img_size)
        weights = f"{model.source.kind}: {model.source.path}"
    config = model.config
    data = spec.data if spec is not None and getattr(model, "data_config", None) is None else data_config_of(model)
    source_spec = getattr(getattr(model, "source", None), "spec", None)
    spec = spec or (find_spec(source_spec) if source_spec else None)
    return ModelInfo(
        name=spec.name if spec else type(model).__name__,
        family=config.family,
        arch=config.to_dict(),
        parameters=num_params(model),
        tokens=num_tokens(config),
        input_size=tuple(data.input_size),
        preprocessing={**_geometry(data), "interpolation": data.interpolation, "mean": data.mean, "std": data.std},
        weights=weights,
        # the backend for the --device asked for (a model given in memory: where its weights are)
        backend=resolve_backend(next(model.parameters()).device if isinstance(source, nn.Module)
                                and any(True for _ in model.parameters()) else torch.device(device)),
        backends=describe_backends(),
        pretrained=[asdict(p) for p in spec.pretrained] if spec else [],
        gflops=_gflops(model) if flops else {},
        pruning=model.prune_config.to_dict() if getattr(model, "prune_config", None) is not None else None,
    )
