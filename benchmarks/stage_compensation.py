"""A lever screened and dropped: a closed-form correction of the restored map at each downsample's input of a
hierarchical model. Stage by stage, a ridge map from the reduced model's channels to the dense model's (the head
compensation's fit, strength alpha * trace(G) / C, with an offset) is fitted on the calibration images over every
grid position and applied before the downsample; then the head compensation as usual. Printed: top-1 on a seeded
subset of the training images (data no figure is reported on) with no compensation, after each stage's map, and
with the head compensation after them.

    python benchmarks/stage_compensation.py --model vmamba_cifar64 --layers 1,3,4,6 --keep 0.441

Hierarchical families only (modules named ``*downsample`` that take the restored map first)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import ssmtrim
from ssmtrim.data import scan_folder
from ssmtrim.evaluate import label_images, topk_accuracy
from ssmtrim.models.loading import data_config_of
from ssmtrim.pruning import PruneConfig, apply_pruning, reduced_forward
from ssmtrim.pruning.calibrate import load_images
from ssmtrim.pruning.compensation import compensate_head

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vmamba_cifar64")
    ap.add_argument("--layers", default="1,3,4,6")
    ap.add_argument("--keep", type=float, default=0.441)
    ap.add_argument("--arrangement", help="default: the family's recommended strategy")
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "cifar10" / "train"),
                    help="labelled images to score on (default: the CIFAR-10 training images)")
    ap.add_argument("--num-images", type=int, default=2000)
    ap.add_argument("--calib", default=str(ROOT / "examples" / "cifar10" / "calib"))
    ap.add_argument("--alpha", type=float, default=0.1)
    args = ap.parse_args()

    model = ssmtrim.load_model(args.model).eval()
    cfg = data_config_of(model)
    x_calib = load_images(scan_folder(args.calib), cfg, 256)[0]
    scored = label_images(scan_folder(args.images).subset(args.num_images), model.config.num_classes)
    x_eval, y_eval, _ = load_images(scored, cfg, 256)
    downs = [m for n, m in model.named_modules() if n.endswith("downsample") and not isinstance(m, torch.nn.Identity)]
    if not downs:
        raise SystemExit(f"{args.model} has no downsample to correct before (a flat model).")
    corrections: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    switch = {"on": True, "grab": None, "rows": []}

    def before_downsample(module, inputs):
        x = inputs[0]
        if switch["grab"] is module:
            switch["rows"].append(x.detach().double())
        if switch["on"] and module in corrections:
            m, c = corrections[module]
            y = torch.einsum("bchw,cd->bdhw", x.double(), m) + c[None, :, None, None] if x.dim() == 4 else \
                x.double() @ m + c
            return (y.to(x.dtype), *inputs[1:])
        return None

    for d in downs:
        d.register_forward_pre_hook(before_downsample)
    fields = {"arrangement": args.arrangement} if args.arrangement else {}
    plan = PruneConfig.recommended(model, layers=tuple(int(v) for v in args.layers.split(",")), keep=(args.keep,),
                                   compensate="none", **fields)
    dense_plan = PruneConfig(layers=(1,), keep=(1.0,))
    apply_pruning(model, plan)

    def top1() -> float:
        with torch.no_grad():
            logits = torch.cat([reduced_forward(model, x_eval[i : i + 250]).logits for i in range(0, len(x_eval), 250)])
        return 100 * topk_accuracy(logits, y_eval, 1)

    def rows_at(module, config) -> torch.Tensor:  # the downsample's input on the calibration images, one row a position
        switch["grab"], switch["rows"] = module, []
        with torch.no_grad():
            for i in range(0, len(x_calib), 125):
                reduced_forward(model, x_calib[i : i + 125], config)
        switch["grab"] = None
        t = torch.cat(switch["rows"])
        return t.movedim(1, -1).reshape(-1, t.shape[1]) if t.dim() == 4 else t.reshape(-1, t.shape[-1])

    print(f"{args.model}, {plan.arrangement} after {plan.layers} at keep {args.keep}, {len(y_eval)} images: "
          f"no compensation top-1 {top1():.2f}", flush=True)
    for i, d in enumerate(downs):
        switch["on"] = False
        dense = rows_at(d, dense_plan)
        switch["on"] = True
        reduced = rows_at(d, plan)
        dim = reduced.shape[1]
        mx, my = reduced.mean(0), dense.mean(0)
        x, y = reduced - mx, dense - my
        gram = x.T @ x
        eye = torch.eye(dim, dtype=gram.dtype)
        lam = args.alpha * float(torch.trace(gram)) / dim
        m = torch.linalg.solve(gram + lam * eye, x.T @ y + lam * eye)
        c = my - mx @ m
        before, after = float((reduced - dense).square().mean()), float((reduced @ m + c - dense).square().mean())
        corrections[d] = (m, c)
        print(f"downsample {i} ({dim} channels): map error {before:.4f} -> {after:.4f}; top-1 {top1():.2f}", flush=True)
    compensate_head(model, x_calib)
    print(f"with the head compensation after them: top-1 {top1():.2f}", flush=True)


if __name__ == "__main__":
    main()
