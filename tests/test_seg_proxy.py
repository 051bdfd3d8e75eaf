"""benchmarks/seg_proxy.py's spelled rows (NAME:OPTION=VALUE...), which benchmarks/seg_select.py reads too: the
family's plan for the task with that strategy and those options laid over it."""

from __future__ import annotations

import pytest

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.pruning import PruneConfig

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def proxy():
    return load_benchmark("seg_proxy")


def test_a_spelled_row_is_the_family_plan_with_its_options(proxy):
    model = ssmtrim.create_model("mambavision_test")
    plan = proxy.spelled_plan(model, "unmerge:mixer=tokens:mlp_share=0.2", (2, 3))
    family = PruneConfig.recommended(model)
    assert plan.layers == (2, 3) and plan.keep == (1.0, 1.0) and plan.compensate == "none"
    assert dict(plan.options) == {**dict(family.options), "mixer": "tokens", "mlp_share": 0.2}
    # the task's plan underneath: MambaVision's plan for dense outputs carries its reach_share
    dense = proxy.spelled_plan(model, "unmerge", (2,), task="dense")
    assert dense.option("reach_share") == 0.2 and plan.option("reach_share") == 0.1
    assert proxy.spelled_plan(model, "merge", (2,)).arrangement == "merge"
    with pytest.raises(ConfigError):
        proxy.spelled_plan(model, "unmerge:mlp_share=2", (2,))
