"""``ssmtrim convert SOURCE -o OUT``: any supported checkpoint to an ssmtrim safetensors folder."""

from __future__ import annotations

from typing import Annotated

import typer

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import ArchOpt, ForceOpt, ImgSizeOpt, JsonOpt, RevisionOpt, parse_img_size
from ssmtrim.cli._render import console, print_json


@handle_errors
def convert(
    source: Annotated[str, typer.Argument(help="Registered name, Hub id[:file] or checkpoint file.")],
    output: Annotated[str, typer.Option("-o", "--output", metavar="DIR", help="Folder to write (config.json + "
                                        "model.safetensors).")],
    arch: ArchOpt = None,
    revision: RevisionOpt = None,
    img_size: ImgSizeOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert an official checkpoint into a folder that reloads on its own, with safetensors weights (optionally
    for another input size: --img-size)."""
    from ssmtrim.checkpoint import check_output, load_model, save_model

    size = parse_img_size(img_size)
    check_output(output, force, {"the source model": source})  # fail before the (possibly long) load
    model = load_model(source, arch=arch, revision=revision, img_size=size)
    out = save_model(model, output, force=force)
    if json_out:
        print_json({"output": str(out), "family": model.config.family, "arch": model.config.to_dict()})
    else:
        console.print(f"wrote {out} ({model.config.family}, {sum(p.numel() for p in model.parameters()):,} parameters)")
