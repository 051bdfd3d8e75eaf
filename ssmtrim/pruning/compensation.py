"""Closed-form compensation, fitted on the calibration images with no gradient training, folded into weights so that
a reduced checkpoint runs no new op.

``head``: a ridge regression maps the reduced model's final feature f_r (B D: Vim's normed class token, PlainMamba's
size-weighted pooled tokens) to the dense model's f_d on the same images, shrunk toward the identity, and is folded
into the classifier: with X = f_r - mean(f_r), Y = f_d - mean(f_d), G = XᵀX, λ = α · trace(G) / D,

    M = (G + λ I)⁻¹ (XᵀY + λ I),   c = mean(f_d) - mean(f_r) M,   W' = W Mᵀ,   b' = W c + b

so that logits = (f_r M + c) Wᵀ + b. Measured on the project's CIFAR-10 models (README, "The method, measured"):
+1.3 points on the Vim and +0.3 on the PlainMamba at -30% FLOPs over merging alone; α = 0.1 was within 0.2 points of
the best α on half of the test set in every case tried. It changes the classifier's weights: their dense values are
kept (:func:`ssmtrim.pruning.engine.record_dense`), saved with the checkpoint and restored by ``dense_of``.

The fit needs only sums over the images (counts, feature sums, XᵀX and XᵀY about zero, squared norms), so inside
:func:`ssmtrim.distributed.sharded` each rank sums its block of the images and the sums are added across ranks.

Shapes: N images, D feature width.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ssmtrim.distributed import sum_counts, sum_floats, sum_tensor
from ssmtrim.errors import ConfigError
from ssmtrim.models.registry import family_of
from ssmtrim.notices import notice
from ssmtrim.pruning.config import PruneConfig
from ssmtrim.pruning.engine import is_pruned, record_dense, reduced_forward

COMPENSATIONS = ("none", "head")


@dataclass
class CompensationResult:
    kind: str
    alpha: float  # the α used (raised when there were fewer images than feature channels)
    num_images: int
    feature_error_before: float  # mean ||f_r - f_d||² / mean ||f_d - mean f_d||² on the fitting images
    feature_error_after: float
    changed: list[str]  # parameters whose values changed (their dense values travel with the checkpoint)
    seconds: float
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _features(model: nn.Module, images: Tensor, config: PruneConfig, batch_size: int) -> Tensor:
    outs = [reduced_forward(model, images[lo : lo + batch_size], config).features.double()
            for lo in range(0, images.shape[0], batch_size)]  # fmt: skip
    return torch.cat(outs)


@torch.no_grad()
def compensate_head(model: nn.Module, images: Tensor, alpha: float = 0.1, batch_size: int = 64,
                    ) -> CompensationResult:
    """Fit the ``head`` compensation of a reduced ``model`` on ``images`` (N 3 H W, transformed) and fold it into the
    classifier, in place."""
    if not is_pruned(model):
        raise ConfigError("compensation fits a reduced model to its dense one; apply a reduction plan first.")
    start = time.perf_counter()
    family = family_of(model)
    head = family.classifier(model)
    if not isinstance(head, nn.Linear) or head.bias is None:
        raise ConfigError("--compensate head needs a linear classifier with a bias; this model has none (num_classes "
                          "0?), so leave --compensate out.")
    n = sum_counts(images.shape[0])[0]
    if n < 2:
        raise ConfigError(f"--compensate head needs at least 2 calibration images, got {n}; give more with --data "
                          "or leave --compensate out.")
    plan = model.prune_config
    dense_plan = PruneConfig(layers=(1,), keep=(1.0,))  # nothing reduced: the dense forward
    f_d = _features(model, images, dense_plan, batch_size)
    f_r = _features(model, images, plan, batch_size)
    d = f_r.shape[1]
    note = ""
    if n < d:  # fewer images than the map has rows: lean harder on the identity
        alpha = alpha * d / n
        note = f"only {n} images for a {d}-channel feature: α raised to {alpha:.3g}"
        notice("compensation-few-images", f"--compensate head: {note}; give more calibration images (--num-images, "
               "--data) for a closer fit.")
    # sums over the images (over every rank's, inside sharded): means, then the centred Gram matrices from them
    sx, sy, sxx, sxy = (sum_tensor(t) for t in (f_r.sum(0), f_d.sum(0), f_r.T @ f_r, f_r.T @ f_d))
    syy, sdiff = sum_floats(float(f_d.square().sum()), float((f_r - f_d).square().sum()))
    mx, my = sx / n, sy / n
    gram = sxx - n * torch.outer(mx, mx)
    lam = alpha * float(torch.trace(gram)) / d
    eye = torch.eye(d, dtype=torch.float64)
    m = torch.linalg.solve(gram + lam * eye, sxy - n * torch.outer(mx, my) + lam * eye)
    c = my - mx @ m
    scale = (syy / n - float(my.square().sum())) or 1.0  # mean ||f_d - mean f_d||²
    before = sdiff / n / scale
    after = sum_floats(float((f_r @ m + c - f_d).square().sum()))[0] / n / scale
    names = [name for name, p in model.named_parameters() if any(p is q for q in head.parameters())]
    record_dense(model, names)
    w = head.weight.double()
    b = head.bias.double()
    head.weight.copy_((w @ m.T).to(head.weight.dtype))
    head.bias.copy_((w @ c + b).to(head.bias.dtype))
    return CompensationResult("head", alpha, n, before, after, names, time.perf_counter() - start, note)


def compensate(model: nn.Module, images: Tensor, batch_size: int = 64) -> CompensationResult | None:
    """The compensation the model's plan asks for (``plan.compensate``), or None."""
    plan = model.prune_config
    if plan.compensate == "none":
        return None
    return compensate_head(model, images, plan.compensate_alpha, batch_size)
