"""``--score neighbour-similarity`` (the STM-style peer row's ranking): a token that repeats a sequence neighbour
scores lowest, each token is compared with the tokens just before and after it only, and a plan with it runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ssmtrim
from ssmtrim.models.tokens import BlockOutput
from ssmtrim.pruning import PruneConfig, apply_pruning
from ssmtrim.pruning.scores import get_score


def test_a_token_that_repeats_a_neighbour_scores_lowest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 16, generator=g)
    x[0, 4] = 3 * x[0, 5]  # a scaled copy of the next token: cosine 1
    x[1, 8] = x[1, 7]  # the last token repeats the one before it
    scores = get_score("neighbour-similarity")(BlockOutput((), x, mixer_input=x))
    assert scores.shape == (2, 9)
    assert int(scores[0].argmin()) in (4, 5) and int(scores[1].argmin()) in (7, 8)
    unit = F.normalize(x, dim=-1)
    cos = (unit[:, 1:] * unit[:, :-1]).sum(-1)
    # the middle token's score is minus its best cosine with the tokens beside it, and the ends have one neighbour
    torch.testing.assert_close(scores[:, 3], -torch.maximum(cos[:, 2], cos[:, 3]))
    torch.testing.assert_close(scores[:, 0], -cos[:, 0])
    torch.testing.assert_close(scores[:, 8], -cos[:, 7])


def test_the_score_needs_the_mixer_input_and_a_plan_with_it_runs():
    assert get_score("neighbour-similarity").needs(None) == frozenset({"mixer_input"})
    model = ssmtrim.create_model("vim_test").eval()
    reduced = apply_pruning(model, PruneConfig(layers=(1, 2), keep=(0.6, 0.7), arrangement="merge",
                                               score="neighbour-similarity", gap="zero",
                                               options={"merge_into": "adjacent", "protect_around": 2}))
    with torch.no_grad():
        out = reduced(torch.randn(2, 3, 32, 32))
    assert out.shape[0] == 2 and torch.isfinite(out).all()
