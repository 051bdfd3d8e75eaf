"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Hub branch, tag or commit of the model repository.")
]
ArchOpt = Annotated[
    str | None, typer.Option("--arch", help="Force the architecture (a name from `ssmtrim models`); default: inferred.")
]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", help="Selective-scan backend: auto, ref, cpu or cuda (default: $SSMTRIM_SCAN_BACKEND "
                 "or auto)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="Torch device to run on, e.g. cpu or cuda.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ImgSizeOpt = Annotated[
    int | None,
    typer.Option("--img-size", help="Load the model for this input size (pixels, square): the position embedding is "
                 "interpolated to the new token grid. Default: the model's own size."),
]
