"""Δ importance (MTR, arXiv 2507.14042): S_t = mean_e softplus(Δ)_{t,e}, the step size the block's scan gives token
t, the two Vim directions averaged in original order (PlainMamba's Δ is shared by its four directions). A large step
lets the token write more into the state and forget more of what came before."""

from ssmtrim.errors import ConfigError
from ssmtrim.pruning.scores.base import Score, register_score


class Delta(Score):
    name = "delta"

    def needs(self, plan):
        return frozenset({"delta"})

    def __call__(self, output, generator=None):
        if output.delta is None:
            raise ConfigError("--score delta needs softplus(Δ) from the model's blocks, and this family does not give "
                              "it; choose --score clipped.")
        return output.delta.float().mean(-1)


register_score(Delta())
