"""``torch.compile(fullgraph=True)`` of a reduced count-mode forward on CPU: one graph (the scan is the registered
``ssmtrim::selective_scan`` op, the backend chosen when the graph is made, no data-dependent shortcut while traced),
with the eager logits."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
from ssmtrim.pruning import PruneConfig, apply_pruning

from .conftest import randomize


@pytest.mark.parametrize("name", ["vim_test"])
def test_a_reduced_forward_compiles_as_one_graph(name):
    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model(name, depth=2))
    apply_pruning(model, PruneConfig.recommended(model, layers=(1,), keep=(0.6,), compensate="none"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)  # fullgraph: any graph break is an error
    assert float((compiled - eager).abs().max()) <= 1e-5 * float(eager.abs().max())
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


def test_quartermap_on_vmamba_compiles_as_one_graph():
    """A hierarchical family, its scans thinned by a stride (slices and nearest-neighbour spreading in the graph)."""
    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model("vmamba_test")).eval()
    apply_pruning(model, PruneConfig(layers=(2,), keep=(0.25,), arrangement="quartermap"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert float((compiled - eager).abs().max()) <= 1e-5 * float(eager.abs().max())
