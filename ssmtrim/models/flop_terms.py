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

    def terms(self, length: int) -> dict[str, int]:
        """The paper convention's terms for one image whose mixer sees ``length`` tokens."""
        t, d, e, n, r = length, self.dim, self.d_inner, self.d_state, self.dt_rank
        return {
            "in_proj": t * d * 2 * e,
            "conv": (t + self.conv_extra) * e * self.conv_taps,
            "x_proj": t * e * (r + 2 * n),
            "dt_proj": t * r * e,
            "scan": self.scans * (9 * t * e * n + t * e + self.gated_scan * t * e),
            "out_proj": t * e * d,
        }
