"""Importance from the SSM's implicit attention ("The Hidden Attention of Mamba Models", arXiv 2403.01590): how much
each token writes into the protected tokens' outputs (the class token; Mamba®'s registers) through the block's scans,
S_j = sum over the protected tokens t and both Vim directions of mean_e |sum_n C_t[n] exp(A[e, n] (S_t - S_j)) B_j[n]
Δ_j[e] u_j[e] SiLU(z_t[e])|, the decay S_t - S_j running over the steps (and skipped positions) between j and t. A
token the class token reads little from scores low, as a ViT token the class token attends to little does (EViT).
The family computes it from its scan's inputs (the capability ``cls_attention``)."""

from ssmtrim.errors import ConfigError
from ssmtrim.pruning.scores.base import Score, register_score


class ClsAttention(Score):
    name = "cls-attention"

    def needs(self, plan):
        return frozenset({"cls_attention"})

    def __call__(self, output, generator=None):
        if output.cls_attention is None:
            raise ConfigError("--score cls-attention needs the scans' attention to a class token from the model's "
                              "blocks, and this family does not give it; choose --score clipped.")
        return output.cls_attention.float()


register_score(ClsAttention())
