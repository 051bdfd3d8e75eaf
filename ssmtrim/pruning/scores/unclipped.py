"""Ablation of the clipped score: S_t = mean_e y_{t,e}."""

from ssmtrim.pruning.scores.base import Score, register_score


class Unclipped(Score):
    name = "unclipped"

    def __call__(self, output, generator=None):
        return output.y.float().mean(-1)


register_score(Unclipped())
