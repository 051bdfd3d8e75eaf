"""``ssmtrim export MODEL -o FILE.onnx``: a dense or reduced model as an ONNX file, checked in onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import ArchOpt, ImgSizeOpt, JsonOpt, QuietOpt, RevisionOpt, parse_img_size
from ssmtrim.cli._render import ProgressRenderer, console, key_value_table, print_json


@handle_errors
def export(
    model: Annotated[str, typer.Argument(help="Model: registered name, Hub id[:file], file, or ssmtrim folder "
                                         "(a reduced one exports reduced; its plan must be in count mode).")],
    output: Annotated[str, typer.Option("--output", "-o", help="The ONNX file to write (name ending in .onnx).")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per call: fixed in the file, as every "
                                            "token count is (unless --dynamic-batch).")] = 1,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Any number of images per call (a symbolic "
                                                "batch dimension); the check runs one image and batches of "
                                                "eight.")] = False,
    check_data: Annotated[Path | None, typer.Option("--check-data", help="Images to check onnxruntime against "
                                                    "PyTorch on (default: the bundled held-out CIFAR-10 "
                                                    "images).")] = None,
    check_images: Annotated[int, typer.Option("--check-images", help="How many of them (a seeded subset; 0: no "
                                              "check).")] = 200,
    optimize: Annotated[bool, typer.Option("--optimize", help="Run the exporter's graph optimiser: a smaller file, "
                                           "minutes more on a deep model (onnxruntime optimises when it loads "
                                           "the file either way).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the output file if it exists and ssmtrim wrote "
                                        "it.")] = False,
    arch: ArchOpt = None,
    revision: RevisionOpt = None,
    img_size: ImgSizeOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export to ONNX in standard operators (the scan in its parallel form), run the file in onnxruntime beside
    PyTorch on real images, and write it only if the logits agree (1e-4 of the largest; an image near a tie in a
    token choice excepted) with the same top-1. Needs onnx, onnxscript and onnxruntime (the export extra of the
    package)."""
    from ssmtrim.api import export_model
    from ssmtrim.export import NEAR_TIE_NOISE, RTOL

    with ProgressRenderer(quiet or json_out) as progress:
        summary = export_model(model, output, batch_size=batch_size, dynamic_batch=dynamic_batch,
                               check_data=check_data,
                               check_images=check_images, force=force, optimize=optimize, arch=arch,
                               revision=revision, img_size=parse_img_size(img_size), progress=progress)
    if json_out:
        print_json(summary)
        return
    check = summary["check"]
    rows = [("model", model), ("written", summary["path"]), ("size", f"{summary['bytes'] / 2**20:.1f} MiB"),
            ("batch size", str(summary["batch_size"])), ("opset", str(summary["opset"])),
            ("export time", f"{summary['export_seconds']:.1f} s")]
    if check is None:
        rows.append(("check", "skipped (--check-images 0)"))
    else:
        rows += [("check images", str(check["images"])),
                 ("largest logit difference", f"{check['max_rel_error_rest']:.1e} of the largest logit (limit "
                  f"{RTOL:g})")]
        if check["near_ties"]:
            rows.append(("near a tie in a token choice", f"{check['near_ties']} images, up to "
                         f"{check['max_rel_error']:.1e} (PyTorch's own logits move past the limit under input "
                         f"noise of {NEAR_TIE_NOISE:g}; not held to it)"))
        if check["runtime_varied"]:
            rows.append(("right in a fresh session", f"{check['runtime_varied']} images over the limit in one "
                         "onnxruntime session and within it in another (onnxruntime varies between sessions; not "
                         "held to it)"))
        rows.append(("same top-1", f"{check['top1_same']} of {check['images']}"))
    console.print(key_value_table("ssmtrim export", rows))
