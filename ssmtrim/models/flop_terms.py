"""The paper convention's FLOP terms of one Mamba mixer (the peers' counting: multiply-accumulates of the linear maps
and convs, 9·L·E·N + L·E for a scan, per direction counted). A family adapter's ``mixer_dims`` returns one of these
for its mixer modules; :mod:`ssmtrim.flops` sums them over the tokens each mixer saw."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MixerDims:
    dim: int  # D
    d_inner: int  # E
    d_state: int  # N
    dt_rank: int  # r
    conv_taps: int  # k (1-D) or k*k (2-D)
    conv_extra: int  # k - 1 extra outputs of a causally padded 1-D conv; 0 for a 'same' 2-D conv
    scans: int  # scans counted (Vim: 1 direction; PlainMamba: 4)
    gated_scan: bool  # z enters the scan -> + L·E
    gate: bool = True  # in_proj also makes the gate z (D -> 2E); False: D -> E (VMamba's released models)
    projections_per_scan: bool = False  # each scan has its own x_proj and dt_proj (VMamba's four routes)
    out_proj_inputs: int = 1  # out_proj reads E channels per factor (MambaVision's cat([y, z]): 2)

    def terms(self, length: int, scanned: int | None = None) -> dict[str, int]:
        """The paper convention's terms for one image whose mixer sees ``length`` tokens and scans ``scanned`` of
        them (default: all; fewer when the scan reads a strided part of the grid, as QuarterMap's)."""
        t, d, e, n, r = length, self.dim, self.d_inner, self.d_state, self.dt_rank
        s = t if scanned is None else scanned
        per = self.scans if self.projections_per_scan else 1
        return {
            "in_proj": t * d * (2 if self.gate else 1) * e,
            "conv": (t + self.conv_extra) * e * self.conv_taps,
            "x_proj": per * s * e * (r + 2 * n),
            "dt_proj": per * s * r * e,
            "scan": self.scans * (9 * s * e * n + s * e + self.gated_scan * s * e),
            "out_proj": t * self.out_proj_inputs * e * d,
        }
