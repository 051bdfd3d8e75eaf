"""Ablation of the clipped score: S_t = mean_e |y_{t,e}|."""

from ssmtrim.pruning.scores.base import Score, register_score


class L1(Score):
    name = "l1"

    def __call__(self, output, generator=None):
        return output.y.float().abs().mean(-1)


register_score(L1())
