"""Comparing a pruned model with its dense source: top-1/top-5 against labels, agreement and KL against dense."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Comparison:
    num_images: int
    agreement: float  # fraction of images where pruned top-1 == dense top-1
    kl: float  # mean KL(dense || pruned) of the softmax outputs, nats
    top1: float | None = None  # against labels, when given
    top5: float | None = None
    dense_top1: float | None = None
    dense_top5: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return float((logits.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean())


def compare_logits(dense: Tensor, pruned: Tensor, labels: Tensor | None = None) -> Comparison:
    """Logits (N classes) of both models on the same images."""
    dense, pruned = dense.float(), pruned.float()
    kl = F.kl_div(F.log_softmax(pruned, 1), F.log_softmax(dense, 1), log_target=True, reduction="batchmean")
    result = Comparison(dense.shape[0], float((dense.argmax(1) == pruned.argmax(1)).float().mean()), float(kl))
    if labels is not None and bool((labels >= 0).all()):
        result.top1, result.top5 = topk_accuracy(pruned, labels, 1), topk_accuracy(pruned, labels, 5)
        result.dense_top1, result.dense_top5 = topk_accuracy(dense, labels, 1), topk_accuracy(dense, labels, 5)
    return result


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 32, progress=None, stage: str = "evaluating") -> Tensor:
    """Logits of ``model`` on in-memory images (N 3 H W), in batches."""
    model.eval()
    outs = []
    for lo in range(0, images.shape[0], batch_size):
        outs.append(model(images[lo : lo + batch_size]).float())
        if progress:
            progress(stage, min(lo + batch_size, images.shape[0]), images.shape[0])
    return torch.cat(outs)
