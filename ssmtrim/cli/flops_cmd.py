"""``ssmtrim flops MODEL``: FLOPs per image in the peers' published convention and an honest full count."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer
from rich.table import Table

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import ImgSizeOpt, JsonOpt, RevisionOpt, parse_img_size
from ssmtrim.cli._render import console, key_value_table, print_json


class Convention(str, Enum):
    both = "both"
    paper = "paper"
    full = "full"


_MEANING = {
    "paper": "peers' convention: convs, linears, one Vim scan direction",
    "full": "everything that runs: both Vim directions, norms, gating, residual adds",
}


def _runs(tokens: list[float]) -> str:
    """[197, 197, 157] -> '197 x2, 157 x1'."""
    runs: list[list] = []
    for t in tokens:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return ", ".join(f"{t:g} x{n}" for t, n in runs)


@handle_errors
def flops(
    model: Annotated[str, typer.Argument(help="Registered name, Hub id[:file], checkpoint file or ssmtrim folder.")],
    convention: Annotated[
        Convention, typer.Option("--convention", case_sensitive=False, help="Which count to report.")
    ] = Convention.both,
    by_module: Annotated[
        bool, typer.Option("--by-module", help="Also list the count of the stem, every block and the head.")
    ] = False,
    revision: RevisionOpt = None,
    img_size: ImgSizeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Count FLOPs (multiply-accumulates, as fvcore and the papers do) per image. Registered names are counted from
    the architecture alone (no download)."""
    from ssmtrim.flops import CONVENTIONS, count_flops_all

    names = CONVENTIONS if convention is Convention.both else (convention.value,)
    reports = count_flops_all(model, names, revision=revision, img_size=parse_img_size(img_size))
    if json_out:
        print_json({"model": model, "conventions": {name: r.to_dict() for name, r in reports.items()}})
        return
    first = next(iter(reports.values()))
    rows: list[tuple[str, object]] = [
        ("model", model),
        ("input size", "x".join(map(str, first.input_size))),
        ("tokens per layer", _runs(first.tokens_per_layer) if first.tokens_per_layer else "-"),
    ]
    rows += [(f"{name} GFLOPs", f"{r.gflops:.3f}  ({_MEANING[name]})") for name, r in reports.items()]
    if len(reports) == 2:
        rows.append(("full / paper", f"{reports['full'].total / reports['paper'].total:.3f}"))
    unsupported = {op: n for r in reports.values() for op, n in r.unsupported.items()}
    if unsupported:
        rows.append(("NOT counted (unsupported ops)", ", ".join(f"{op} x{n}" for op, n in unsupported.items())))
    console.print(key_value_table("ssmtrim flops", rows))
    if by_module:
        table = Table(title="MFLOPs per image by module", title_justify="left")
        table.add_column("module")
        for name in reports:
            table.add_column(name, justify="right")
        for module in first.by_module:
            table.add_row(module, *(f"{r.by_module.get(module, 0) / 1e6:,.2f}" for r in reports.values()))
        console.print(table)
