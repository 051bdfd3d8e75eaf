"""Screen a plug-in option of the recommended plan on a seeded subset of the test images (e.g. one half, where
defaults are chosen), at FLOPs targets, each value against the others on the same images.

    python benchmarks/screen_option.py --model examples/vim_cifar256 --test cifar10/test --num-test 5000 \\
        --option redundancy=0,0.5,1 --targets 0.7,0.6

The plan is ``ssmtrim prune``'s default for the model (the family's recommended plan, its hand-set layers, the common
keep ratio that meets each target in the paper convention, head compensation fitted on the 250 bundled calibration
images) with the option set to each value in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from ssmtrim.pruning.config import declared_options
from ssmtrim.pruning.options import parse_option
from ssmtrim.pruning.schedule import FlopsModel, keep_for

ROOT = Path(__file__).resolve().parents[1]
PLAN_CHOICES = ("score", "arrangement")  # fields of the plan screened as an option is


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "examples" / "vim_cifar256"))
    ap.add_argument("--test", required=True)
    ap.add_argument("--num-test", type=int, help="a seeded subset of the test images (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--option", required=True, help="NAME=V1,V2,...: a declared plug-in option, or the plan's score "
                    "or arrangement, and its values")
    ap.add_argument("--layers", help="reduce after these blocks, 1-based (default: the family's recommended ones)")
    ap.add_argument("--targets", default="0.7")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=V",
                    help="fix another declared option in every plan (repeatable), e.g. --set protect_around=4 or --set "
                    "gap=zero")
    ap.add_argument("--json")
    args = ap.parse_args()
    name, _, values = args.option.partition("=")
    declared = declared_options()
    if name not in {*declared, *PLAN_CHOICES} or not values:
        raise SystemExit(f"--option takes NAME=V1,V2 with NAME one of {', '.join(sorted({*declared, *PLAN_CHOICES}))}.")
    # a plan choice (score, arrangement) is checked by the plan itself when it is made
    values = [declared[name].validate(v) if name in declared else v for v in values.split(",")]
    model = ssmtrim.load_model(args.model)
    data = data_config_of(model)
    xc = load_images(scan_folder(calibration_images()), data)[0]
    x, y, _ = load_images(scan_folder(args.test).subset(args.num_test, args.seed), data, args.batch_size)
    dense_logits = predict(model, x, args.batch_size)
    layers = tuple(int(v) for v in args.layers.split(",")) if args.layers else None
    base = PruneConfig.recommended(model, layers=layers)
    fixed = dict(parse_option(text, declared) for text in args.set)
    plan_fields = {f.name for f in dataclasses.fields(PruneConfig)}
    if fixed:  # an option kept as a field of the plan (gap, metric, ...) is set as one; the others in ``options``
        base = base.replace(options={**dict(base.options), **{k: v for k, v in fixed.items() if k not in plan_fields}},
                            **{k: v for k, v in fixed.items() if k in plan_fields})
    dense_estimate = FlopsModel(model, "paper")
    print(f"{args.model}: {x.shape[0]} test images, layers {base.layers}, {name} in {values}"
          + (f", with {fixed}" if fixed else ""), flush=True)
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        for value in values:
            start = time.perf_counter()
            # an option kept as a field of the plan (metric, gap, ...) is set as one; the others in ``options``
            setting = {name: value} if name in plan_fields else {"options": {**dict(base.options), name: value}}
            config = base.replace(**setting)
            keep = keep_for(dense_estimate.for_plan(config), base.layers, target)
            if keep is None:
                print(f"FLOPs x{target:g} {name}={value}: unreachable after blocks {base.layers}", flush=True)
                continue
            config = config.replace(keep=(keep,))
            reduce_on(model, config, xc, args.batch_size)
            r = evaluate_tensors(model, x, y, dense_logits, args.batch_size)
            remove_pruning(model)
            rows.append({"target": target, "keep": keep, name: value, "top1": r.top1, "agreement": r.agreement})
            print(f"FLOPs x{target:g} (keep {keep:.3f}) {name}={value}: top-1 {r.top1:.2f}, agreement "
                  f"{r.agreement:.2f} [{time.perf_counter() - start:.0f} s]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "num_test": x.shape[0], "seed": args.seed,
                                               "layers": base.layers, "option": name, "fixed": fixed,
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
