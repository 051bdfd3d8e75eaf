"""Every bundled model, dense and reduced, exported to ONNX and checked in onnxruntime on all 1,000 bundled held-out
images; batch-1 latency and batched throughput in onnxruntime, dense against reduced, side by side.

    OMP_NUM_THREADS=1 python benchmarks/export_bundled.py [--models vim_cifar,...] [--check-images 1000]
        [--check-batch 50] [--flops 0.7] [--json out.json]

The reduced model is the family's recommended plan (``ssmtrim prune``'s default: merge or unmerge, head compensation
fitted on the 250 bundled calibration images) at keep 0.7 after its recommended blocks, count mode; with ``--flops
F``, the plan ``ssmtrim prune --flops F --flops-convention paper`` makes instead (the schedule search's layers and
keep ratio, on the same calibration images). Each model is
exported twice: for batches of ``--check-batch``, checked on ``--check-images`` held-out images (all 1,000 by
default), and for one image, checked on 10 and timed. A file is written only if onnxruntime's logits agree with
PyTorch's to 1e-4 of the largest logit and every top-1 is the same (:func:`ssmtrim.export.export_onnx`; an image
near a tie in a token choice excepted); the table prints the largest difference (and that of the images near a tie)
and the top-1 agreement on the checked images, the batch-1 file's export time, and
onnxruntime's batch-1 latency and the batched files' throughput (median of repeats, wall clock, one intra-op thread;
dense and reduced timed in turns), with the FLOPs ratio (full convention) and the realised share (speed-up / FLOPs
ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ssmtrim
from ssmtrim.bundled import calibration_images, validation_images
from ssmtrim.data import scan_folder
from ssmtrim.evaluate import predict
from ssmtrim.export import OnnxModel, export_onnx
from ssmtrim.flops import count_flops_all
from ssmtrim.models.loading import data_config_of
from ssmtrim.pruning import PruneConfig
from ssmtrim.pruning.calibrate import load_images
from ssmtrim.pruning.schedule import reachable_plan, search_schedule

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = "vim_cifar,vim_cifar256,plainmamba_cifar,vmamba_cifar,vmamba_cifar64,mambavision_cifar"


def latencies_ms(runners: dict[str, OnnxModel], x, repeats: int = 5, iters: int = 10) -> dict[str, float]:
    """Latency of one call of each runner on its file's batch (the first images of ``x``), the runners timed in turns
    (median of repeats, wall clock)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    arrs = {k: x[: r.batch_size].numpy() for k, r in runners.items()}
    for k, r in runners.items():
        r.run(arrs[k])
    for _ in range(repeats):
        for k, r in runners.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                r.run(arrs[k])
            times[k].append(1e3 * (time.perf_counter() - t0) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=BUNDLED)
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--flops", type=float, help="reduce to this share of the dense FLOPs (paper convention) as prune "
                    "--flops does, instead of --keep after the recommended blocks")
    ap.add_argument("--check-images", type=int, default=1000, help="held-out images the batched file is checked on")
    ap.add_argument("--check-batch", type=int, default=50, help="the batched file's batch size")
    ap.add_argument("--json", help="written after each model, so a long run keeps what it measured")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            dense = ssmtrim.load_model(ROOT / "examples" / name)
            x = load_images(scan_folder(validation_images()), data_config_of(dense))[0][: args.check_images]
            xc = load_images(scan_folder(calibration_images()), data_config_of(dense))[0]
            plan = PruneConfig.recommended(dense, keep=(args.keep,))
            if args.flops is not None:  # what prune --flops F --flops-convention paper does
                plan = reachable_plan(dense, plan, args.flops, "paper")
                plan = search_schedule(dense, plan, args.flops, xc, predict(dense, xc, 50), "paper", 50).plan(plan)
            reduced = ssmtrim.prune(ssmtrim.load_model(ROOT / "examples" / name), plan, xc).model
            flops = [count_flops_all(m)["full"].total for m in (dense, reduced)]
            row = {"model": name, "plan": reduced.prune_config.to_dict(), "flops_ratio": flops[0] / flops[1]}
            runners, batched = {}, {}
            for kind, model in (("dense", dense), ("reduced", reduced)):
                # a batched file checked on all the images, then the batch-1 file (checked on 10) that is timed
                summary = export_onnx(model, Path(tmp) / f"{name}_{kind}_{args.check_batch}.onnx",
                                      batch_size=args.check_batch, check_images=x)
                one = export_onnx(model, Path(tmp) / f"{name}_{kind}_1.onnx", batch_size=1, check_images=x[:10])
                runners[kind] = OnnxModel(one["path"], threads=1)
                batched[kind] = OnnxModel(summary["path"], threads=1)
                row[kind] = {"check": summary["check"], "check_batch_1": one["check"],
                             "export_seconds": one["export_seconds"], "mb": one["bytes"] / 2**20}
                c = summary["check"]
                ties = (f" ({c['near_ties']} near a tie: up to {c['max_rel_error']:.1e})" if c["near_ties"] else "")
                if c["runtime_varied"]:
                    ties += f" ({c['runtime_varied']} right in a fresh onnxruntime session)"
                print(f"{name:18s} {kind:8s} max diff {c['max_rel_error_rest']:.1e}{ties}  same top-1 "
                      f"{c['top1_same']}/{c['images']}  export {summary['export_seconds']:.0f} s", flush=True)
            for kind, ms in latencies_ms(runners, x).items():
                row[kind]["latency_ms"] = ms
            row["latency_speedup"] = row["dense"]["latency_ms"] / row["reduced"]["latency_ms"]
            row["realised"] = row["latency_speedup"] / row["flops_ratio"]
            for kind, ms in latencies_ms(batched, x, iters=1).items():
                row[kind]["images_per_s"] = 1e3 * args.check_batch / ms
            row["throughput_speedup"] = row["reduced"]["images_per_s"] / row["dense"]["images_per_s"]
            row["throughput_realised"] = row["throughput_speedup"] / row["flops_ratio"]
            print(f"{name:18s} onnxruntime batch 1 (timed in turns): dense {row['dense']['latency_ms']:.1f} ms, "
                  f"reduced {row['reduced']['latency_ms']:.1f} ms, speed-up {row['latency_speedup']:.2f}x for "
                  f"{row['flops_ratio']:.2f}x fewer FLOPs (full convention): realised {row['realised']:.2f}",
                  flush=True)
            print(f"{name:18s} onnxruntime batch {args.check_batch} (timed in turns): dense "
                  f"{row['dense']['images_per_s']:.1f} images/s, reduced {row['reduced']['images_per_s']:.1f} "
                  f"images/s, "
                  f"speed-up {row['throughput_speedup']:.2f}x: realised {row['throughput_realised']:.2f}", flush=True)
            rows.append(row)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
