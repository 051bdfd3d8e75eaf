"""Keep ratios per step by measured sensitivity, against one common ratio, at fixed FLOPs.

    python benchmarks/allocate_keeps.py --model examples/vim_cifar256 --test cifar10/test --num-test 5000 \\
        [--targets 0.8,0.7,0.6,0.5] [--json out.json]

The plan is the family's recommended one (``ssmtrim prune``'s default: merge or unmerge, head compensation) after its
recommended blocks (or ``--layers``). For each FLOPs target (paper convention) the common keep ratio (what ``prune
--flops`` uses with the hand-set layers) is compared with the per-step ratios
:func:`ssmtrim.pruning.schedule.allocate_keeps` picks by KL(dense || reduced) on the 250 bundled calibration images
(training images); the compensation is fitted on the same images, and both plans are evaluated on the test images
(``--num-test``: a seeded subset, e.g. one half for choosing, the whole folder for reporting).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ssmtrim
from ssmtrim.bundled import calibration_images
from ssmtrim.data import scan_folder
from ssmtrim.evaluate import evaluate_tensors, predict
from ssmtrim.models.loading import data_config_of
from ssmtrim.pruning import PruneConfig, reduce_on, remove_pruning
from ssmtrim.pruning.calibrate import load_images
from ssmtrim.pruning.schedule import FlopsModel, allocate_keeps, keep_for

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "examples" / "vim_cifar256"))
    ap.add_argument("--test", required=True)
    ap.add_argument("--num-test", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="0.8,0.7,0.6,0.5")
    ap.add_argument("--layers", help="reduce after these blocks (1-based; default: the family's recommended ones)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()
    dense = ssmtrim.load_model(args.model)
    data = data_config_of(dense)
    xc = load_images(scan_folder(calibration_images()), data)[0]
    test = scan_folder(args.test).subset(args.num_test, args.seed)
    x, y, _ = load_images(test, data, args.batch_size)
    dense_logits = predict(dense, x, args.batch_size)
    dense_calib = predict(dense, xc, args.batch_size)
    base = PruneConfig.recommended(dense)
    if args.layers:
        base = base.replace(layers=tuple(int(v) for v in args.layers.split(",")))
    flops = FlopsModel(dense, "paper", base)  # a plan that reduces the MLPs alone scales their FLOPs alone
    print(f"{args.model}: layers {base.layers}, {x.shape[0]} test images, dense top-1 "
          f"{evaluate_tensors(dense, x, y, dense_logits, args.batch_size).top1:.2f}", flush=True)
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        t0 = time.perf_counter()
        common = keep_for(flops, base.layers, target)
        allocated, tried = allocate_keeps(dense, base, target, xc, dense_calib, "paper", args.batch_size)
        row = {"target": target, "tried": tried}
        for name, keep in (("common", (common,) * len(base.layers)), ("allocated", allocated)):
            config = base.replace(keep=tuple(keep))
            reduce_on(dense, config, xc, args.batch_size)
            result = evaluate_tensors(dense, x, y, dense_logits, args.batch_size)
            remove_pruning(dense)
            row[name] = {"keep": list(keep), "estimated_ratio": flops.ratio(base.layers, tuple(keep)),
                         "top1": result.top1, "agreement": result.agreement}
        rows.append(row)
        c, a = row["common"], row["allocated"]
        print(f"FLOPs x{target}: common keep {c['keep'][0]:.3f} top-1 {c['top1']:.2f} | allocated "
              f"{', '.join(f'{k:.3f}' for k in a['keep'])} (est. x{a['estimated_ratio']:.3f}) top-1 {a['top1']:.2f} "
              f"| {a['top1'] - c['top1']:+.2f} [{time.perf_counter() - t0:.0f} s]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "num_test": x.shape[0], "seed": args.seed,
                                               "layers": list(base.layers), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
