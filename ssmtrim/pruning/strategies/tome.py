"""``tome``: order-preserving bipartite soft matching (ToMe, Bolya et al., ICLR 2023, as R-MeeTo applies it to Vim),
the peers' merging baseline. The unprotected tokens, in their current order, alternate between set A (even ranks)
and set B (odd ranks); each A token finds its most similar B token (cosine of ``metric``); the A tokens with the
highest such similarity are merged into their match, size-weighted, until k unprotected tokens remain. Scores play
no part. Survivors keep their original positions (as ``align``), the class token stays where it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmtrim.errors import ConfigError
from ssmtrim.models.tokens import gather_tokens
from ssmtrim.ops.tokens import merge_kernels
from ssmtrim.pruning.state import ReductionStep
from ssmtrim.pruning.strategies.base import GAP, Strategy, register_strategy
from ssmtrim.pruning.strategies.merge import METRIC, merge_and_keep, needs_of_metric, similarity_features, sizes_of


class ToMe(Strategy):
    name = "tome"
    keeps_positions = True
    options = (METRIC, GAP)
    description = "bipartite soft matching (ToMe / R-MeeTo), order-preserving, size-weighted"

    def needs(self, plan) -> frozenset[str]:
        return super().needs(plan) | needs_of_metric(plan.option("metric"))

    def check_plan(self, plan) -> None:
        super().check_plan(plan)
        low = [k for k in plan.keep_by_layer().values() if k < 0.5]
        if low:
            raise ConfigError(f"--arrangement tome merges at most half the tokens of a step (each token of one half "
                              f"into one of the other), so it cannot keep {min(low):g} of them; use keep >= 0.5 with "
                              "more reduction points (--layers), or --arrangement merge.")

    def reduce(self, step: ReductionStep):
        src, dst, index = choose_bipartite(step)
        return merge_and_keep(step.state, step.streams, sizes_of(step.state), src, dst, src, index)


def choose_bipartite(step: ReductionStep) -> tuple[Tensor, Tensor, Tensor | None]:
    """ToMe's choice: (src (B R) the A tokens merged away, dst (B R) the B token each goes to, and the staying tokens'
    indices in increasing order where the merge kernels chose, else None), R = the tokens this step removes (at most
    half of the unprotected ones)."""
    state = step.state
    protected = state.protected()
    bsz, length = protected.shape
    candidates = int(length) - state.num_protected  # int(): shapes are tensors under tracing
    removed = candidates - step.k
    raw = similarity_features(step.output, step.plan.option("metric"))
    kernels = merge_kernels(raw)
    if kernels is not None and kernels.bipartite is not None and candidates >= 2:  # one C call (ssmtrim.ops.tokens)
        return kernels.bipartite(raw, protected, min(removed, (candidates + 1) // 2))
    order = torch.sort(protected.long(), dim=1, stable=True).indices[:, :candidates]  # unprotected, in order
    a_idx, b_idx = order[:, 0::2], order[:, 1::2]
    removed = min(removed, a_idx.shape[1])
    features = F.normalize(raw.float(), dim=-1)
    sim = gather_tokens(features, a_idx) @ gather_tokens(features, b_idx).transpose(1, 2)  # B |A| |B|
    best, match = sim.max(-1)
    chosen = torch.sort(-best, dim=1, stable=True).indices[:, :removed]
    return a_idx.gather(1, chosen), b_idx.gather(1, match.gather(1, chosen)), None


register_strategy(ToMe())
