"""``quartermap``: QuarterMap (arXiv 2507.09514), a peer for grid families with a 2-D cross-scan (VMamba). After the
reduction point the sequence is left whole (every token goes through in_proj, the conv, out_proj and the MLP, and
the residual stream keeps every position); what is thinned is the scan: in each later block of the stage the routes
read every other row and column of the conv's output (keep 0.25, a quarter of the map; keep 0.5 reads every other
row), and each position takes the scan output of the read position at or before it (nearest-neighbour upsampling).
The stride is the method's rule, not chosen by scores; the next stage's grid is scanned whole again.
"""

from __future__ import annotations

from ssmtrim.errors import ConfigError
from ssmtrim.pruning.state import ReductionStep
from ssmtrim.pruning.strategies.base import Strategy, register_strategy

# keep ratio -> (row stride, column stride) of the scanned part of the grid
STRIDES = {0.25: (2, 2), 0.5: (2, 1)}


class QuarterMap(Strategy):
    name = "quartermap"
    keeps_positions = True
    description = "QuarterMap: the later blocks of the stage scan every other row and column, upsampled back"
    keeps_what = "of each later scan's grid (every token stays)"

    def needs(self, plan) -> frozenset[str]:
        return frozenset({"subsampled_scan"})

    def check_plan(self, plan) -> None:
        super().check_plan(plan)
        if plan.mode != "count":
            raise ConfigError("--arrangement quartermap thins the scan by a fixed stride, not by scores; use "
                              "--mode count (the default).")
        bad = sorted({k for k in plan.keep_by_layer().values() if k not in STRIDES})
        if bad:
            raise ConfigError(f"--arrangement quartermap scans a quarter of the grid (keep 0.25) or every other row "
                              f"(keep 0.5), not keep {bad[0]:g}; set --keep 0.25 or 0.5 (a FLOPs target picks other "
                              "ratios, so give --keep instead of --flops).")

    def reduce(self, step: ReductionStep):
        keep = step.plan.keep_by_layer()[step.block]
        if keep not in STRIDES:  # a plan run without apply_pruning's checks
            self.check_plan(step.plan)
        return step.streams, step.state.replace(scan_stride=STRIDES[keep])


register_strategy(QuarterMap())
