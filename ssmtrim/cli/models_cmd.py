"""``ssmtrim models``: the registered architectures and their official weights."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ssmtrim.bundled import bundled_folder
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
    # the family is the name's prefix (and in --json); the weights column folds rather than cut a Hub id
    for col in ("name", "width", "depth"):
        table.add_column(col, no_wrap=True)
    table.add_column("official weights (Hub id, file, top-1)", overflow="fold")
    for s in specs:
        weights = "\n".join(f"{p.hub_id}\n  {p.filename} ({p.top1})" for p in s.pretrained)
        if not weights:
            release = s.description.split("weights: ")[1] if "weights: " in s.description else None
            weights = f"GitHub release\n  {release.rsplit('/', 1)[-1]}" if release else \
                "bundled" if bundled_folder(s.name) else "-"
        table.add_row(s.name, s.arch.width_text(), str(s.arch.depth), weights)
    console.print(table)
