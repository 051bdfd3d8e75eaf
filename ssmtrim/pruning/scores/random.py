"""Baseline: uniform random scores, drawn on the CPU from a generator seeded per plan and block (reproducible)."""

import torch

from ssmtrim.pruning.scores.base import Score, register_score


class Random(Score):
    name = "random"
    needs_generator = True

    def __call__(self, output, generator=None):
        y = output.y
        return torch.rand(y.shape[:2], generator=generator, device="cpu").to(y.device)


register_score(Random())
