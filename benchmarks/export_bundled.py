"""Every bundled model, dense and reduced, exported to ONNX and checked in onnxruntime on all 1,000 bundled held-out
images; batch-1 latency in onnxruntime, dense against reduced, side by side.

    OMP_NUM_THREADS=1 python benchmarks/export_bundled.py [--models vim_cifar,...] [--json out.json]

The reduced model is the family's recommended plan (``ssmtrim prune``'s default: merge or unmerge, head compensation
fitted on the 250 bundled calibration images) at keep 0.7 after its recommended blocks, count mode. Each model is
exported twice: for batches of 50, checked on all 1,000 images, and for one image, checked on 10 and timed. A file is
written only if onnxruntime's logits agree with PyTorch's to 1e-4 of the largest logit and every top-1 is the same
(:func:`ssmtrim.export.export_onnx`); the table prints the largest difference and the top-1 agreement on the 1,000,
the batch-1 file's export time, and onnxruntime's batch-1 latency (median of repeats, wall clock, one intra-op
thread).
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
from ssmtrim.export import OnnxModel, export_onnx
from ssmtrim.models.loading import data_config_of
from ssmtrim.pruning import PruneConfig
from ssmtrim.pruning.calibrate import load_images

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = "vim_cifar,vim_cifar256,plainmamba_cifar,vmamba_cifar,vmamba_cifar64,mambavision_cifar"


def latency_ms(runner: OnnxModel, x, repeats: int = 5, iters: int = 10) -> float:
    arr = x[:1].numpy()
    runner.run(arr)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            runner.run(arr)
        times.append(1e3 * (time.perf_counter() - t0) / iters)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=BUNDLED)
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            dense = ssmtrim.load_model(ROOT / "examples" / name)
            x = load_images(scan_folder(validation_images()), data_config_of(dense))[0]
            xc = load_images(scan_folder(calibration_images()), data_config_of(dense))[0]
            reduced = ssmtrim.prune(ssmtrim.load_model(ROOT / "examples" / name),
                                    PruneConfig.recommended(dense, keep=(args.keep,)), xc).model
            row = {"model": name, "plan": reduced.prune_config.to_dict()}
            for kind, model in (("dense", dense), ("reduced", reduced)):
                # a file for 50 images checked on all of them, then the batch-1 file (checked on 10) that is timed
                summary = export_onnx(model, Path(tmp) / f"{name}_{kind}_50.onnx", batch_size=50, check_images=x)
                one = export_onnx(model, Path(tmp) / f"{name}_{kind}_1.onnx", batch_size=1, check_images=x[:10])
                runner = OnnxModel(one["path"], threads=1)
                row[kind] = {"check": summary["check"], "check_batch_1": one["check"],
                             "export_seconds": one["export_seconds"], "mb": one["bytes"] / 2**20,
                             "latency_ms": latency_ms(runner, x)}
                c = summary["check"]
                print(f"{name:18s} {kind:8s} max diff {c['max_rel_error']:.1e}  same top-1 {c['top1_same']}/"
                      f"{c['images']}  export {summary['export_seconds']:.0f} s  onnxruntime batch 1 "
                      f"{row[kind]['latency_ms']:.1f} ms", flush=True)
            row["latency_speedup"] = row["dense"]["latency_ms"] / row["reduced"]["latency_ms"]
            print(f"{name:18s} reduced / dense latency speed-up in onnxruntime: {row['latency_speedup']:.2f}x",
                  flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
