"""Which strategy a family's dense outputs default to (``prune --task dense``), chosen on training images only: the
segmentation proxy of ``seg_proxy.py`` (2x2 mosaics, a linear head over one stage's restored map, fitted on the dense
model's maps of the same training mosaics seg_proxy.py fits it on), scored on mosaics of 2,000 other training images
(none of them in the head's), for each strategy at each FLOPs target (paper convention, keep from the model at its own
size, no compensation: it changes the classifier only): mIoU, and the agreement with dense (the share of pixels the
head classes as it does from the dense model's maps).

    python benchmarks/seg_select.py --model mambavision_cifar --train ../shared/data/cifar10/train --stage 1 \\
        --layers 2,3,6
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from seg_proxy import fit_head, maps_of, miou, mosaics, segment, spelled_plan  # a sibling script

import ssmtrim
from ssmtrim.data import ImageSet, scan_folder
from ssmtrim.evaluate import label_images
from ssmtrim.models.loading import data_config_of
from ssmtrim.pruning import apply_pruning, remove_pruning
from ssmtrim.pruning.calibrate import load_images
from ssmtrim.pruning.schedule import FlopsModel, fitted_plan, keep_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vmamba_cifar64")
    ap.add_argument("--train", required=True, help="labelled training images")
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--layers", default="1,3,4,6")
    ap.add_argument("--targets", default="0.8,0.7")
    ap.add_argument("--strategies", default="merge,unmerge")
    ap.add_argument("--head-images", type=int, default=2000, help="training mosaics for the head (as seg_proxy.py)")
    ap.add_argument("--select-images", type=int, default=2000, help="other training images scored, in mosaics")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    model = ssmtrim.load_model(args.model).eval()
    classes = model.config.num_classes
    cfg = data_config_of(model)
    train = label_images(scan_folder(args.train), classes)
    head_set = train.subset(4 * args.head_images, 0)  # the images seg_proxy.py fits its head on
    used = set(head_set.paths)
    rest = [i for i, p in enumerate(train.paths) if p not in used]
    pick = sorted(random.Random(5).sample(rest, args.select_images))
    chosen = ImageSet(train.root, [train.paths[i] for i in pick], [train.labels[i] for i in pick], train.classes,
                      train.layout)
    xh, yh, _ = load_images(head_set, cfg, 256)
    xs, ys, _ = load_images(chosen, cfg, 256)
    head_x, head_y = mosaics(xh, yh)
    sel_x, sel_y = mosaics(xs, ys)
    side = tuple(sel_x.shape[-2:])
    backbone = ssmtrim.load_model(args.model, img_size=side).eval()
    head = fit_head(maps_of(backbone, head_x, args.stage), head_y, classes, 5)
    dense_pred = segment(head, maps_of(backbone, sel_x, args.stage), sel_y.shape[-1])
    dense = miou(dense_pred, sel_y, classes)
    print(f"{args.model} stage {args.stage}: dense mIoU {dense:.2f} on {len(sel_x)} training mosaics", flush=True)
    layers = tuple(int(v) for v in args.layers.split(","))
    dense_estimate = FlopsModel(model, "paper")
    result = {"model": args.model, "stage": args.stage, "layers": layers, "mosaics": len(sel_x), "dense_miou": dense,
              "rows": {}}
    for target in (float(v) for v in args.targets.split(",")):
        for strategy in args.strategies.split(","):
            # NAME or NAME:OPTION=VALUE[:OPTION=VALUE...] (e.g. unmerge:mixer=tokens:mlp_share=0.1): the family's
            # plan with that strategy (and options)
            config = spelled_plan(model, strategy, layers)
            keep = keep_for(dense_estimate.for_plan(config), layers, target)
            if keep is None:
                print(f"FLOPs x{target}: {strategy} unreachable after blocks {layers}", flush=True)
                continue
            # a share fitted to the target where the keep cannot fit it, as the schedule search does
            config = fitted_plan(dense_estimate, config, layers, keep, target)
            apply_pruning(backbone, config.replace(keep=(keep,)))
            pred = segment(head, maps_of(backbone, sel_x, args.stage), sel_y.shape[-1])
            value = miou(pred, sel_y, classes)
            # the share of pixels whose class the head reads as it reads them from the dense maps
            agreement = float((pred == dense_pred).float().mean()) * 100
            remove_pruning(backbone)
            result["rows"].setdefault(strategy, []).append({"target": target, "keep": keep, "miou": value,
                                                            "agreement": agreement,
                                                            "options": dict(config.options)})
            print(f"FLOPs x{target} (keep {keep:.3f}) {strategy:8s} mIoU {value:.2f} ({value - dense:+.2f}), "
                  f"agreement with dense {agreement:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
