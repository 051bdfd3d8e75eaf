"""The method's score (Zhan et al., NeurIPS 2024): S_t = mean_e max(0, y_{t,e}), y the gated SSM output in the
original token order."""

from ssmtrim.pruning.scores.base import Score, register_score


class Clipped(Score):
    name = "clipped"

    def __call__(self, output, generator=None):
        return output.y.float().clamp_min(0).mean(-1)


register_score(Clipped())
