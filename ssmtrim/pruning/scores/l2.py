"""Ablation of the clipped score: S_t = ||y_t||_2."""

from ssmtrim.pruning.scores.base import Score, register_score


class L2(Score):
    name = "l2"

    def __call__(self, output, generator=None):
        return output.y.float().norm(dim=-1)


register_score(L2())
