"""A batch of no images: every family, dense and reduced (each strategy it takes), with and without gradients, and as a
backbone, gives an empty result of the shape a batch of one would have, as PyTorch's own layers do, instead of failing
on a reshape that cannot infer a size from zero elements."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
from ssmtrim.pruning import PruneConfig, apply_pruning, feature_maps
from tests.models.test_vim import randomise

CASES = [("vim_test", "merge"), ("vim_test", "align"), ("vim_test", "keep-order"), ("vim_test", "tome"),
         ("plainmamba_cifar", "merge"), ("mambar_test", "merge"), ("vmamba_test", "unmerge"),
         ("vmamba_test", "merge"), ("vmamba_test", "quartermap"), ("mambavision_test", "unmerge"),
         ("mambavision_test", "merge")]


def _model(name: str):
    torch.manual_seed(0)
    model = ssmtrim.create_model(name).eval()
    randomise(model, 2)
    return model


@pytest.mark.parametrize("name, arrangement", CASES)
def test_a_batch_of_no_images_gives_an_empty_result(name, arrangement):
    model = _model(name)
    size = model.config.img_size
    h, w = (size, size) if isinstance(size, int) else size
    one, none = torch.randn(1, 3, h, w), torch.randn(0, 3, h, w)
    plan = PruneConfig.recommended(model, arrangement=arrangement, keep=(0.5,),
                                   layers=PruneConfig.recommended(model).layers[:2])
    with torch.no_grad():
        want = model(one).shape[1:]
        maps_want = [m.shape[1:] for m in feature_maps(model, one)]
        assert model(none).shape == (0, *want)
        reduced = apply_pruning(model, plan)
        assert reduced(none).shape == (0, *want)
        assert [m.shape for m in feature_maps(reduced, none)] == [(0, *s) for s in maps_want]
    out = reduced(none)  # with gradients on: the training path (no C merge kernels)
    assert out.shape == (0, *want)
