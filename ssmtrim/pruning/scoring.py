"""Token scores and selection: pure functions on tensors, applied the same way to any stream.

Score (Zhan et al., NeurIPS 2024): the channel mean of the clipped gated SSM output,
S_t = mean_e max(0, y_{t,e}), with y in the ORIGINAL token order. Indices are computed once and applied to every
tensor that follows the tokens (hidden, residual, positions), in the manner of ToMe's ``bipartite_soft_matching``
returning a merge function.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_scores(y: Tensor, method: str, generator: torch.Generator | None = None) -> Tensor:
    """y (B L E) -> scores (B L), higher is more important."""
    if method == "clipped":
        return y.float().clamp_min(0).mean(-1)
    if method == "unclipped":
        return y.float().mean(-1)
    if method == "l1":
        return y.float().abs().mean(-1)
    if method == "l2":
        return y.float().norm(dim=-1)
    if method == "random":
        return torch.rand(y.shape[:2], generator=generator, device="cpu").to(y.device)
    raise ValueError(f"unknown score {method!r}")


def topk_sorted(scores: Tensor, k: int, protected: Tensor | None = None) -> Tensor:
    """Indices (B k) of the k highest scores per row, returned in increasing index order (original order).

    ``protected`` (B L bool) marks tokens that must not be chosen (they are kept separately, e.g. the class token).
    Ties break towards the lower index, so results do not depend on the batch.
    """
    if protected is not None:
        scores = scores.masked_fill(protected, float("-inf"))
    # a stable sort on -score breaks ties by position; topk's order among equal values is unspecified
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    return order.sort(dim=1).values


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B L ...) , index (B K) -> x[b, index[b]] (B K ...)."""
    shape = index.shape + x.shape[2:]
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, idx)


def gaps_from_positions(positions: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Number of pruned original positions just before each kept token, in each scan direction.

    positions (B K), increasing original positions of the kept tokens of a sequence of ``length`` tokens.
    Returns (forward (B K), backward (B K)): forward[k] = positions skipped between kept token k-1 and k (leading ones
    before the first kept token count for the first); backward[k] the same for the reversed scan, i.e. between k and
    k+1 (trailing ones count for the last), still indexed in original order.
    """
    pos = positions.long()
    prev = torch.cat([pos.new_full((pos.shape[0], 1), -1), pos[:, :-1]], dim=1)
    nxt = torch.cat([pos[:, 1:], pos.new_full((pos.shape[0], 1), length)], dim=1)
    return (pos - prev - 1).clamp_min(0), (nxt - pos - 1).clamp_min(0)
