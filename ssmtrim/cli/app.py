"""Assembles the ``ssmtrim`` Typer application from one module per command."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from ssmtrim import __version__
from ssmtrim.cli._errors import Terminated, stop_on_sigterm
from ssmtrim.cli.convert_cmd import convert
from ssmtrim.cli.eval_cmd import eval_
from ssmtrim.cli.export_cmd import export
from ssmtrim.cli.finetune_cmd import finetune
from ssmtrim.cli.flops_cmd import flops
from ssmtrim.cli.info_cmd import info
from ssmtrim.cli.models_cmd import models
from ssmtrim.cli.options_cmd import options
from ssmtrim.cli.prune_cmd import prune
from ssmtrim.cli.report_cmd import report
from ssmtrim.cli.train_cmd import train


def _flags_show_no_type() -> None:
    """``--help`` lists a flag (``--json``, ``--quiet``) without a value type: typer 0.29 shows ``<bool>`` after it, as
    if it took a value. Where typer's option class has no such hook, its help is left as it is."""
    option = getattr(getattr(typer, "core", None), "TyperOption", None)
    original = getattr(option, "display_type_rich", None)
    if original is None or getattr(original, "_ssmtrim", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_bool_flag", False) else original(self, ctx)

    display_type_rich._ssmtrim = True
    option.display_type_rich = display_type_rich


_flags_show_no_type()

app = typer.Typer(
    name="ssmtrim",
    help="Post-training token pruning for vision state-space models (Vim, PlainMamba, MambaVision, VMamba).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("models")(models)
app.command("info")(info)
app.command("flops")(flops)
app.command("eval")(eval_)
app.command("prune")(prune)
app.command("options")(options)
app.command("report")(report)
app.command("finetune")(finetune)
app.command("convert")(convert)
app.command("export")(export)
app.command("train")(train)


def _version(value: bool) -> None:
    if value:
        print(f"ssmtrim {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what ssmtrim chooses (backend...).")] = False,
) -> None:
    level = logging.INFO if verbose or os.environ.get("SSMTRIM_DEBUG") else logging.WARNING
    logging.basicConfig(level=level, format="ssmtrim: %(message)s")


def main() -> None:
    """The ``ssmtrim`` entry point: a usage error (unknown option, a value of the wrong type, a missing argument) is
    one line on stderr and exit code 2, like every other error; ``ssmtrim`` alone shows the help."""
    stop_on_sigterm()
    # torch makes its compiler cache folder (TMPDIR/torchinductor_<user>) as soon as torch._dynamo is imported, which
    # tracing does; a command should leave nothing in TMPDIR, so that folder goes in ssmtrim's cache unless set
    from ssmtrim.ops._cpu_kernel import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir().parent / "torchinductor"))
    try:
        code = app(standalone_mode=False)
    except _USAGE_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
        else:
            print(f"ssmtrim: {usage_error_line(exc)}", file=sys.stderr)
        code = exc.exit_code
    except typer.Abort:
        print("ssmtrim: interrupted.", file=sys.stderr)
        code = 130
    except Terminated:  # outside a command (while the options are parsed)
        print("ssmtrim: stopped by SIGTERM.", file=sys.stderr)
        code = 143
    sys.exit(code if isinstance(code, int) else 0)


# click's UsageError (typer vendors click in some versions, so it is found from typer's own BadParameter)
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def usage_error_line(exc: Exception) -> str:
    """One sentence for a usage error, with the command's help to consult."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    command = exc.ctx.command_path if exc.ctx is not None else "ssmtrim"
    return f"{message}; see '{command} --help'."
