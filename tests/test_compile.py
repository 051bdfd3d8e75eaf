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


def test_a_compiled_vim_runs_the_token_major_kernels_as_ops():
    """Under ``torch.compile`` Vim's mixer takes the cpu backend's token-major kernels as the registered op
    ``ssmtrim::tokens_mixer`` (not the general path's transposes and flips), and the merge
    step its one kernel (``ssmtrim::merge_step``); an ONNX export or a FLOP count (which
    trace for standard ops) still takes the general path (tests/test_export.py)."""
    from ssmtrim.ops._cpu_kernel import status

    if not status().available:
        pytest.skip("fast CPU kernel unavailable (no compiler)")
    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model("vim_test", depth=2))
    apply_pruning(model, PruneConfig.recommended(model, layers=(1,), keep=(0.6,), compensate="none"))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    eager, compiled, ran = _compiled_with_ops(model, x)
    assert {"ssmtrim::tokens_mixer", "ssmtrim::merge_step"} <= ran
    assert float((compiled - eager).abs().max()) <= 1e-5 * float(eager.abs().max())


def _compiled_with_ops(model, x):
    """(eager logits, compiled logits, the ops a second compiled call ran) of ``model`` on x."""
    with torch.no_grad():
        eager = model(x)
        compiled_model = torch.compile(model, fullgraph=True)
        compiled = compiled_model(x)
        with torch.profiler.profile() as prof:
            compiled_model(x)
    return eager, compiled, {event.key for event in prof.key_averages()}


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


def test_unmerge_with_regrouped_mlps_compiles_as_one_graph():
    """unmerge with the mixers whole and the MLPs regrouped around a share of the tokens: the group kernels and ToMe's
    choice (the step removes under half its tokens) run in the graph as the registered ops ``ssmtrim::group_mean``,
    ``ssmtrim::regroup`` and ``ssmtrim::merge_bipartite``, and SS2D's routes as ``ssmtrim::tokens_scan``, with the
    eager logits."""
    from ssmtrim.ops._cpu_kernel import status

    if not status().available:
        pytest.skip("fast CPU kernel unavailable (no compiler)")
    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model("vmamba_test")).eval()
    apply_pruning(model, PruneConfig.recommended(model, layers=(2,), keep=(0.9,), compensate="none",
                                                 options={"mixer": "positions", "mlp_share": 0.5}))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    eager, compiled, ran = _compiled_with_ops(model, x)
    assert {"ssmtrim::group_mean", "ssmtrim::regroup", "ssmtrim::merge_bipartite", "ssmtrim::tokens_scan"} <= ran
    assert float((compiled - eager).abs().max()) <= 1e-5 * float(eager.abs().max())


def test_a_reduced_vmamba_stage_runs_its_routes_as_ops():
    """merge on VMamba: the reduced stage's routes over its tokens (the reversed ones read from the end, the gaps in
    factored form) run in the graph as ``ssmtrim::tokens_scan`` and the merge step as ``ssmtrim::merge_step``, with the
    eager logits."""
    from ssmtrim.ops._cpu_kernel import status

    if not status().available:
        pytest.skip("fast CPU kernel unavailable (no compiler)")
    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model("vmamba_test")).eval()
    apply_pruning(model, PruneConfig(layers=(2,), keep=(0.6,), arrangement="merge"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    eager, compiled, ran = _compiled_with_ops(model, x)
    assert {"ssmtrim::tokens_scan", "ssmtrim::merge_step"} <= ran
    assert float((compiled - eager).abs().max()) <= 1e-5 * float(eager.abs().max())
