"""``--score cls-attention``: the scans' implicit attention to the class token (arXiv 2403.01590) equals what each
token's input contributes to the class token's gated output, found by removing the input, through the real scan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.models.vim import implicit_attention
from ssmtrim.ops.selective_scan import selective_scan
from ssmtrim.pruning import PruneConfig, apply_pruning
from ssmtrim.pruning.engine import reduced_forward

from ..conftest import randomize


@pytest.mark.parametrize("with_gaps", [False, True])
def test_the_attention_is_each_token_s_part_of_the_target_s_output(with_gaps):
    gen = torch.Generator().manual_seed(0)
    bsz, e, length, n = 2, 3, 7, 4
    u, dt, z = (torch.randn(bsz, e, length, generator=gen) for _ in range(3))
    a = -torch.rand(e, n, generator=gen) - 0.1
    b, c = torch.randn(bsz, length, n, generator=gen), torch.randn(bsz, length, n, generator=gen)
    targets = torch.tensor([[3, 6], [5, 0]])  # two protected tokens each (registers), in scan order
    delta = F.softplus(dt)
    counts = torch.randint(0, 3, (bsz, length), generator=gen).float() if with_gaps else None
    scale = torch.rand(bsz, e, generator=gen) if with_gaps else None
    steps = delta + counts[:, None, :] * scale[:, :, None] if with_gaps else delta
    got = implicit_attention(u, delta, steps, a, b, c, z, targets)

    def scan(inputs):
        return selective_scan(inputs, dt, a, b.transpose(1, 2), c.transpose(1, 2), torch.zeros(e), z=z,
                              delta_softplus=True, gap=counts, gap_scale=scale)

    full = scan(u)
    for i in range(bsz):
        for j in range(length):
            without = u.clone()
            without[i, :, j] = 0  # the scan is linear in u for given Δ, B, C: the difference is token j's part
            rest = scan(without)
            want = sum((full[i, :, t] - rest[i, :, t]).abs().mean() for t in targets[i].tolist())
            torch.testing.assert_close(got[i, j], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["vim_test", "mambar_test"])
def test_the_score_reduces_a_vim_and_a_mamba_r(name):
    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model(name))
    size = model.config.img_size
    size = size if isinstance(size, tuple) else (size, size)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    plan = PruneConfig.recommended(model, keep=(0.5,), score="cls-attention", compensate="none")
    with torch.no_grad():
        out = reduced_forward(model, x, plan)
    assert out.stats.kept_fraction[0] < 1.0 and torch.isfinite(out.logits).all()


def test_a_family_without_the_attention_refuses_it():
    with pytest.raises(ConfigError, match="implicit attention to a class token"):
        apply_pruning(ssmtrim.create_model("vmamba_test"),
                      PruneConfig(layers=(2,), keep=(0.5,), arrangement="merge", score="cls-attention"))
