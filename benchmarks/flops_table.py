"""Parameters and GFLOPs of the registered hierarchical models against the figures their official READMEs publish.

    python benchmarks/flops_table.py [--models vmamba_tiny,mambavision_t] [--json out.json]

Published figures (ImageNet-1k, 224x224): VMamba's README, classification table (MzeroMiko/VMamba: T[s1l8] 30M /
4.9G, S[s2l15] 50M / 8.7G, B[s2l15] 89M / 15.4G, counted by its ``flops()``: fvcore plus 9LDN + LD per scan);
MambaVision's README, "ImageNet-1K" table (NVlabs/MambaVision: T 31.8M / 4.4G, T2 35.1M / 5.1G, S 50.1M / 7.5G,
B 97.7M / 15.0G, L 227.9M / 34.9G, L2 241.5M / 37.5G). Random weights: counts do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

import ssmtrim
from ssmtrim.flops import count_flops

PUBLISHED = {
    "vmamba_tiny": (30, 4.9), "vmamba_small": (50, 8.7), "vmamba_base": (89, 15.4),
    "mambavision_t": (31.8, 4.4), "mambavision_t2": (35.1, 5.1), "mambavision_s": (50.1, 7.5),
    "mambavision_b": (97.7, 15.0), "mambavision_l": (227.9, 34.9), "mambavision_l2": (241.5, 37.5),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(PUBLISHED))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    print(f"{'model':16} {'params M':>9} {'published':>9} {'paper G':>8} {'full G':>8} {'published G':>11} "
          f"{'paper/pub':>9} {'full/pub':>8}")
    for name in args.models.split(","):
        model = ssmtrim.create_model(name).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        with torch.no_grad():
            paper = count_flops(model, convention="paper").total / 1e9
            full = count_flops(model, convention="full").total / 1e9
        pub_params, pub_g = PUBLISHED[name]
        rows.append({"model": name, "params_m": params, "published_params_m": pub_params, "paper_gflops": paper,
                     "full_gflops": full, "published_gflops": pub_g})
        print(f"{name:16} {params:9.2f} {pub_params:9.1f} {paper:8.3f} {full:8.3f} {pub_g:11.1f} "
              f"{paper / pub_g:9.3f} {full / pub_g:8.3f}")
        del model
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
