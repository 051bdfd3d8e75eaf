"""A tiny workspace for command-line tests: a dense vim_test checkpoint (file and ssmtrim folder), its pruned
folder, and 2 class folders of 4 random images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ssmtrim
from ssmtrim.pruning import PruneConfig, apply_pruning


def build_workspace(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    torch.manual_seed(0)
    model = ssmtrim.create_model("vim_test", depth=2, num_classes=2)
    torch.save({"model": model.state_dict()}, root / "dense.pth")
    ssmtrim.save_model(model, root / "dense")
    ssmtrim.save_model(apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,))), root / "pruned")
    return {"root": root, "images": root / "images", "dense_file": root / "dense.pth", "dense": root / "dense",
            "pruned": root / "pruned"}
