"""``ssmtrim info MODEL``: architecture, parameters, tokens, preprocessing, scan backend."""

from __future__ import annotations

from typing import Annotated

import typer

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import (
    BackendOpt,
    DeviceOpt,
    ImgSizeOpt,
    JsonOpt,
    RevisionOpt,
    backend_scope,
    parse_img_size,
)
from ssmtrim.cli._render import console, key_value_table, print_json


@handle_errors
def info(
    model: Annotated[str, typer.Argument(help="Registered name, Hub id[:file], checkpoint file or ssmtrim folder.")],
    revision: RevisionOpt = None,
    img_size: ImgSizeOpt = None,
    backend: BackendOpt = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Describe a model. Registered names are described from the architecture alone (no download)."""
    from ssmtrim.devices import check_device
    from ssmtrim.info import describe_model

    check_device(device)
    size = parse_img_size(img_size)
    with backend_scope(backend):
        if revision is not None:  # a revision only means something for a Hub download
            from ssmtrim.checkpoint import load_model

            result = describe_model(load_model(model, revision=revision, device=device, img_size=size))
        else:
            result = describe_model(model, device=device, img_size=size)
    if json_out:
        print_json(result.to_dict())
        return
    arch = result.arch
    rows = [
        ("model", result.name),
        ("family", result.family),
        ("architecture", ", ".join(f"{k}={v}" for k, v in arch.items() if k != "family")),
        ("parameters", f"{result.parameters:,}"),
        ("tokens", result.tokens),
        ("input size", "x".join(map(str, result.input_size))),
        ("preprocessing", ", ".join(f"{k}={v}" for k, v in result.preprocessing.items())),
        ("weights", result.weights),
        *[(f"GFLOPs ({c})", f"{v:.3f}") for c, v in result.gflops.items()],
        *([("pruning", ", ".join(f"{k}={v}" for k, v in result.pruning.items()))] if result.pruning else []),
        ("scan backend", result.backend),
    ]
    rows += [(f"  {k}", v) for k, v in result.backends.items()]
    rows += [("official file", f"{p['hub_id']}:{p['filename']} (top-1 {p['top1']})") for p in result.pretrained]
    console.print(key_value_table("ssmtrim info", rows))
