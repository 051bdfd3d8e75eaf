"""``ssmtrim options``: the options the registered strategies and scores read, with their defaults."""

from __future__ import annotations

from rich.markup import escape
from rich.padding import Padding

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import JsonOpt
from ssmtrim.cli._render import console, print_json
from ssmtrim.pruning.config import describe_options


@handle_errors
def options(json_out: JsonOpt = False) -> None:
    """List the options the strategies and scores read (prune's --option NAME=VALUE, or their own flag), with their
    defaults, allowed values and what each does. A family's recommended plan may set some: `ssmtrim prune` prints
    the plan it ran."""
    rows = describe_options()
    if json_out:
        print_json(rows)
        return
    for row in rows:
        if row["choices"] is not None:
            values = "one of " + ", ".join(map(str, row["choices"]))
        elif row["low"] is not None or row["high"] is not None:
            low = "-inf" if row["low"] is None else f"{row['low']:g}"
            high = "inf" if row["high"] is None else f"{row['high']:g}"
            values = f"in [{low}, {high}]"
        else:
            values = "any value"
        readers = [*row["read_by"]["strategies"], *(f"score {n}" for n in row["read_by"]["scores"])]
        given = row["given_as"].replace("=VALUE", "=V") if row["given_as"].startswith("--option") else \
            row["given_as"] + " V"
        console.print(f"[bold]{escape(given)}[/bold]  default {escape(str(row['default']))}, {escape(values)}; "
                      f"read by {escape(', '.join(readers))}")
        console.print(Padding(escape(row["help"]), (0, 0, 1, 4)))
