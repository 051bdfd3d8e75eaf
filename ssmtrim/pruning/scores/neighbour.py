"""Redundancy with a sequence neighbour (after STM, arXiv 2509.22691, whose bidirectional nearest-neighbour merging
merges the tokens most like the token before or after them): S_t = -max(cos(x_t, x_{t-1}), cos(x_t, x_{t+1})) on the
block's normed mixer input x, in the current sequence order (the first and last tokens have one neighbour). A token
that nearly repeats a neighbour scores low and leaves first; with ``--option merge_into=adjacent`` it is averaged
into that neighbour (or the other, if it stays and is more alike)."""

import torch
import torch.nn.functional as F

from ssmtrim.errors import ConfigError
from ssmtrim.pruning.scores.base import Score, register_score


class NeighbourSimilarity(Score):
    name = "neighbour-similarity"

    def needs(self, plan):
        return frozenset({"mixer_input"})

    def __call__(self, output, generator=None):
        if output.mixer_input is None:
            raise ConfigError("--score neighbour-similarity needs the blocks' normed mixer input, and this family "
                              "does not give it; choose --score clipped.")
        unit = F.normalize(output.mixer_input.float(), dim=-1)  # B L D
        if unit.shape[1] < 2:
            return unit.new_zeros(unit.shape[:2])
        pair = (unit[:, 1:] * unit[:, :-1]).sum(-1)  # B L-1: cos(x_t, x_{t+1})
        low = pair.new_full((pair.shape[0], 1), -2.0)  # below any cosine: no neighbour on that side
        before, after = torch.cat([low, pair], dim=1), torch.cat([pair, low], dim=1)
        return -torch.maximum(before, after)


register_score(NeighbourSimilarity())
