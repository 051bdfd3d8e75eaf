"""``ssmtrim eval MODEL --data DIR``: top-1/top-5 over an image folder, and agreement/KL with the dense model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import (
    ArchOpt,
    BackendOpt,
    DeviceOpt,
    ImgSizeOpt,
    JsonOpt,
    QuietOpt,
    RevisionOpt,
    SkipUnknownClassesOpt,
    backend_scope,
    parse_img_size,
)
from ssmtrim.cli._render import ProgressRenderer, console, key_value_table, print_json
from ssmtrim.errors import ConfigError


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}%"


@handle_errors
def eval_(
    model: Annotated[str, typer.Argument(help="Model: registered name, Hub id[:file], file or (pruned) folder.")],
    data: Annotated[Path, typer.Option("--data", help="Images: class sub-folders, ImageNet files named by WordNet "
                                       "id, or any folder with --labels.")],
    dense: Annotated[str | None, typer.Option("--dense", help="Dense model to compare with (default for a pruned "
                                              "model: its dense weights; for a fine-tuned one, the dense original "
                                              "it records).")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="File of 'name label' lines (integer labels).")]
    = None,
    num_images: Annotated[int | None, typer.Option("--num-images", help="Evaluate a seeded subset of this size.")]
    = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subset.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward.")] = 64,
    workers: Annotated[int | None, typer.Option("--workers", help="DataLoader workers (default: cores - 1, <= 4).")]
    = None,
    arch: ArchOpt = None,
    revision: RevisionOpt = None,
    img_size: ImgSizeOpt = None,
    device: DeviceOpt = "cpu",
    backend: BackendOpt = None,
    skip_unknown_classes: SkipUnknownClassesOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a model; a pruned model is compared with its dense weights (agreement of top-1, KL of logits)."""
    import ssmtrim
    from ssmtrim.devices import check_device
    from ssmtrim.distributed import sharded
    from ssmtrim.evaluate import dense_reference, evaluate

    check_device(device)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    if num_images is not None and num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}.")
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {workers}.")
    size = parse_img_size(img_size)
    # backend first: a bad --backend fails before a (possibly long) download. Under torchrun the ranks split the
    # images and rank 0 alone prints.
    with backend_scope(backend), sharded(device) as (rank, _):
        net = ssmtrim.load_model(model, arch=arch, revision=revision, img_size=size)
        # the comparison is named for what it is: a fine-tuned folder's own weights are not "dense"
        ref, reference = (ssmtrim.load_model(dense, img_size=size), "dense") if dense is not None \
            else dense_reference(net)
        with ProgressRenderer(quiet or json_out or rank != 0) as progress:
            result = evaluate(net, data, dense=ref, labels_file=labels, num_images=num_images, seed=seed,
                              batch_size=batch_size, workers=workers, progress=progress, device=device,
                              skip_unknown_classes=skip_unknown_classes)
    if rank != 0:
        return
    if json_out:
        print_json({"model": model, "data": str(data), "reference": reference, **result.to_dict()})
        return
    rows = [("model", model), ("images", f"{result.num_images} ({result.unreadable} unreadable, skipped)"),
            ("top-1", _pct(result.top1)), ("top-5", _pct(result.top5))]
    if result.agreement is not None:
        rows += [(f"{reference} top-1", _pct(result.dense_top1)),
                 (f"agreement with {reference} top-1", _pct(result.agreement)),
                 (f"KL({reference} || model)", f"{result.kl:.4f}")]
    rows.append(("time", f"{result.seconds:.1f} s"))
    console.print(key_value_table("ssmtrim eval", rows))
