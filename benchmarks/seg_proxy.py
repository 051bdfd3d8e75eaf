"""A dense-prediction proxy measured for real: segmentation of CIFAR-10 mosaics from a backbone's restored feature maps.

    python benchmarks/seg_proxy.py --model vmamba_cifar64 --train ../shared/data/cifar10/train \
        --test ../shared/data/cifar10/test [--stage 1] [--targets 0.8,0.7] [--json out.json]

Each mosaic is a 2x2 grid of CIFAR-10 images, each preprocessed as the model reads an image (64x64 for the 64x64
test beds: 128x128 in all; the hierarchical families take any input size), every pixel labelled with its quadrant's
class. The backbone is frozen; a light head, one linear layer over the channels of one stage's feature map (``--stage``;
each map position classified, the logits upsampled to the pixels by nearest neighbour), is fitted on mosaics of
training images against the DENSE model's maps (``--head-images`` mosaics; AdamW, ``--head-epochs``). It is then
applied, unchanged, to the maps of the dense model and of each reduced one (``ssmtrim.feature_maps``: reduced tokens
restored to the full grid) on mosaics of all the test images (each test image used once: 2,500 mosaics), at each FLOPs
target with the given strategies' rows (ours: the family's recommended plan with head compensation; ToMe; align), and
mIoU over the 10 classes is printed side by side. The reduction points are the ones of the README's method table
for the model (``--layers``); the keep ratio meets each target (paper convention).

What the proxy shows: whether a reduced backbone's restored maps still carry the per-position information a dense head
reads, on real images with real labels. What it does not: object boundaries, scale variation or a real segmentation
head and data set (ADE20K); quadrant boundaries fall on patch boundaries here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ssmtrim
from ssmtrim.data import scan_folder
from ssmtrim.errors import ConfigError
from ssmtrim.evaluate import label_images
from ssmtrim.models.loading import data_config_of
from ssmtrim.pruning import PruneConfig, apply_pruning, feature_maps, remove_pruning
from ssmtrim.pruning.calibrate import load_images
from ssmtrim.pruning.config import declared_options
from ssmtrim.pruning.options import parse_option
from ssmtrim.pruning.schedule import FlopsModel, fitted_plan, keep_for

ROOT = Path(__file__).resolve().parents[1]
# ours: the family's recommended plan (its head compensation changes the classifier only, not the maps); ours-dense:
# its plan for dense outputs (prune --task dense)
# QuarterMap keeps its own rule (a quarter of each later scan): the same plan at every target
ROWS = {"ours": {}, "ours-dense": {}, "merge": {"arrangement": "merge"},
        "unmerge-importance": {"arrangement": "unmerge", "options": {"match": "importance"}},
        "unmerge-tokens": {"arrangement": "unmerge", "options": {"mixer": "tokens"}},
        "unmerge-mlp": {"arrangement": "unmerge", "options": {"mixer": "positions"}},
        # the plan the schedule search picks at -30% on both test beds: the mixers merged gently, the MLPs on a tenth
        # of the tokens (the share raised to meet the target where a keep cannot: schedule.fitted_plan)
        "unmerge-share": {"arrangement": "unmerge", "options": {"mixer": "tokens", "mlp_share": 0.1}},
        "tome": {"arrangement": "tome"},
        "align": {"arrangement": "align"},
        "quartermap": {"arrangement": "quartermap", "keep": (0.25,)}}


def mosaics(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (4N 3 T T) and labels (4N) -> mosaics (N 3 2T 2T) and per-pixel labels (N 2T 2T), in order: image
    4i top-left, 4i+1 top-right, 4i+2 bottom-left, 4i+3 bottom-right."""
    n, t = images.shape[0] // 4, images.shape[-1]
    x = images[: 4 * n].reshape(n, 2, 2, 3, t, t).permute(0, 3, 1, 4, 2, 5).reshape(n, 3, 2 * t, 2 * t)
    y = labels[: 4 * n].reshape(n, 2, 2, 1, 1).expand(n, 2, 2, t, t).permute(0, 1, 3, 2, 4).reshape(n, 2 * t, 2 * t)
    return x, y


def miou(pred: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    """Mean over the classes present in ``target`` of |pred ∩ target| / |pred ∪ target| (per class), in %."""
    ious = []
    for c in range(classes):
        p, t = pred == c, target == c
        if t.any():
            ious.append((p & t).sum().item() / (p | t).sum().item())
    return 100.0 * sum(ious) / len(ious)


@torch.no_grad()
def maps_of(model, x: torch.Tensor, stage: int, batch: int = 100) -> torch.Tensor:
    return torch.cat([feature_maps(model, x[i : i + batch])[stage] for i in range(0, len(x), batch)])


def fit_head(maps: torch.Tensor, labels: torch.Tensor, classes: int, epochs: int, seed: int = 0) -> torch.nn.Linear:
    """One linear layer over the channels, each map position against the label of the pixel at its centre."""
    torch.manual_seed(seed)
    n, c, h, w = maps.shape
    side = labels.shape[-1]
    centre = labels[:, (torch.arange(h) * side + side // 2) // h][:, :, (torch.arange(w) * side + side // 2) // w]
    feats, targets = maps.permute(0, 2, 3, 1).reshape(-1, c), centre.reshape(-1)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    head = torch.nn.Linear(c, classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(targets)).split(4096):
            loss = F.cross_entropy(head((feats[idx] - mean) / std), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():  # fold the standardisation into the layer
        head.weight /= std
        head.bias -= head.weight @ mean
    return head


@torch.no_grad()
def segment(head: torch.nn.Linear, maps: torch.Tensor, side: int) -> torch.Tensor:
    """Maps (N C h w) -> per-pixel classes (N side side), logits upsampled by nearest neighbour."""
    logits = torch.einsum("nchw,kc->nkhw", maps, head.weight) + head.bias[None, :, None, None]
    return F.interpolate(logits, size=(side, side), mode="nearest").argmax(1)


def spelled_plan(model, row: str, layers: tuple[int, ...], task: str = "classify") -> PruneConfig:
    """The plan a row spelled NAME or NAME:OPTION=VALUE[:OPTION=VALUE...] names (e.g.
    unmerge:mixer=tokens:mlp_share=0.2): the family's plan for ``task`` with that strategy and those options laid
    over it, after ``layers``, keep 1 (to be solved for a target), no compensation (it changes the classifier only)."""
    name, *options = row.split(":")
    given = {"options": dict(parse_option(o, declared_options()) for o in options)} if options else {}
    return PruneConfig.recommended(model, task=task, layers=layers, keep=(1.0,), compensate="none", arrangement=name,
                                   **given)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vmamba_cifar64")
    ap.add_argument("--train", required=True, help="labelled training images (the head is fitted on their mosaics)")
    ap.add_argument("--test", required=True, help="labelled test images (every one used once, in mosaics)")
    ap.add_argument("--stage", type=int, default=1, help="which stage's map the head reads (0-based)")
    ap.add_argument("--layers", default="1,3,4,6")
    ap.add_argument("--targets", default="0.8,0.7")
    ap.add_argument("--rows", default="ours,tome,align",
                    help=f"rows, comma-separated: {', '.join(ROWS)}, or a plan spelled NAME:OPTION=VALUE[:...] (e.g. "
                         "unmerge:mixer=tokens:mlp_share=0.2: the family's plan with that strategy and options)")
    ap.add_argument("--head-images", type=int, default=4000, help="training mosaics for the head")
    ap.add_argument("--head-epochs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = ssmtrim.load_model(args.model).eval()
    classes = model.config.num_classes
    own = data_config_of(model)  # tiles as the model reads an image (its size and preprocessing): 2x2 of them
    tile_cfg = own
    train = label_images(scan_folder(args.train), classes).subset(4 * args.head_images, 0)
    test = label_images(scan_folder(args.test), classes)
    xt, yt, _ = load_images(train, tile_cfg, 256)
    xs, ys, _ = load_images(test, tile_cfg, 256)
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(len(ys), generator=g)  # test images in a seeded order: each used once
    train_x, train_y = mosaics(xt, yt)
    test_x, test_y = mosaics(xs[order], ys[order])
    print(f"{len(train_x)} training and {len(test_x)} test mosaics [{time.perf_counter() - t0:.0f} s]", flush=True)
    # the backbone at the mosaics' size (the reduction engine runs a model at the size it was loaded for); the keep
    # ratios come from the model at its own size, as in the method table
    side = tuple(test_x.shape[-2:])
    backbone = ssmtrim.load_model(args.model, img_size=side).eval() if side != tuple(own.input_size[1:]) else model
    head = fit_head(maps_of(backbone, train_x, args.stage), train_y, classes, args.head_epochs)
    dense_maps = maps_of(backbone, test_x, args.stage)
    dense = miou(segment(head, dense_maps, test_y.shape[-1]), test_y, classes)
    print(f"dense: mIoU {dense:.2f}  (stage {args.stage} map {tuple(dense_maps.shape[1:])}) "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    layers = tuple(int(v) for v in args.layers.split(","))
    dense_estimate = FlopsModel(model, "paper")

    def keep_of(config: PruneConfig, target: float) -> float | None:
        return keep_for(dense_estimate.for_plan(config), layers, target)

    result = {"model": args.model, "stage": args.stage, "layers": layers, "test_mosaics": len(test_x),
              "dense_miou": dense, "rows": {}}
    for target in (float(v) for v in args.targets.split(",")):
        for row in args.rows.split(","):
            if row.startswith("ours"):  # the family's plan for classification, or for dense outputs (--task dense)
                task = "dense" if row == "ours-dense" else "classify"
                config = PruneConfig.recommended(model, task=task, layers=layers, keep=(1.0,), compensate="none")
            elif row in ROWS:
                config = PruneConfig(layers=layers, **{"keep": (1.0,), **ROWS[row]})
            else:
                config = spelled_plan(model, row, layers)
            keep = config.keep[0] if "keep" in ROWS.get(row, {}) else keep_of(config, target)
            if keep is None:
                print(f"FLOPs x{target}: {row} unreachable after blocks {layers}", flush=True)
                continue
            # a share fitted to the target where the keep cannot fit it (the other rows' plans stay as they are)
            config = fitted_plan(dense_estimate, config, layers, keep, target).replace(keep=(keep,))
            try:
                pruned = apply_pruning(backbone, config)
            except ConfigError as exc:
                print(f"FLOPs x{target}: {row} not run ({exc})", flush=True)
                continue
            value = miou(segment(head, maps_of(pruned, test_x, args.stage), test_y.shape[-1]), test_y, classes)
            remove_pruning(backbone)
            result["rows"].setdefault(row, []).append({"target": target, "keep": config.keep[0], "miou": value})
            print(f"FLOPs x{target} (keep {config.keep[0]:.3f}) {row:6s} mIoU {value:.2f} ({value - dense:+.2f})",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
