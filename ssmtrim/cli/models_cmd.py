"""``ssmtrim models``: the registered architectures and their official weights."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import JsonOpt
from ssmtrim.cli._render import console, print_json
from ssmtrim.models.registry import list_models


@handle_errors
def models(
    json_out: JsonOpt = False,
    all_models: Annotated[bool, typer.Option("--all", help="Also list the tiny test models.")] = False,
) -> None:
    """List the models ssmtrim knows, with their official Hub files."""
    specs = list_models(include_test=all_models)
    if json_out:
        print_json([{"name": s.name, "family": s.family, "arch": s.arch.to_dict(), "aliases": list(s.aliases),
                     "pretrained": [vars(p) for p in s.pretrained], "description": s.description} for s in specs])
        return
    table = Table(title="Models", title_justify="left")
    for col in ("name", "family", "dim", "depth", "official weights (hub id:file, top-1)"):
        table.add_column(col)
    for s in specs:
        weights = "\n".join(f"{p.hub_id}:{p.filename} ({p.top1})" for p in s.pretrained) or "-"
        table.add_row(s.name, s.family, str(s.arch.embed_dim), str(s.arch.depth), weights)
    console.print(table)
