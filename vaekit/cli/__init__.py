"""The ``vaekit`` command line: thin Typer commands over the Python API.

Every :class:`~vaekit.errors.VaekitError` (and any other failure) becomes one
line on stderr and exit code 1; ``--debug`` (or ``VAEKIT_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated

import typer
from typer.core import TyperGroup

from ..errors import VaekitError, first_line


def _debug_requested(ctx: typer.Context | None) -> bool:
    if os.environ.get("VAEKIT_DEBUG", "") not in ("", "0"):
        return True
    return bool(ctx is not None and ctx.params.get("debug"))


def report_error(e: BaseException) -> None:
    """Print one readable line for ``e`` on stderr.  Under torchrun an error every rank knows of (an error shared
    through the process group; before it is up, a configuration error) is printed by rank 0 alone
    (:func:`vaekit.distributed.reported_by_main`); a rank's own error is prefixed ``rank N:``."""
    from ..distributed import PEER_GRACE, env_rank, launched, reported_by_main

    if reported_by_main(e):
        time.sleep(PEER_GRACE)  # torchrun stops the other ranks when this one exits: let rank 0 print first
        return
    rank = env_rank() if launched() else 0
    if isinstance(e, VaekitError):
        msg = str(e) if not rank else f"rank {rank}: {e}"
    else:
        first = first_line(e, limit=10_000, empty="")
        msg = f"unexpected {type(e).__name__}: {first} (run with --debug for the traceback)"
        if rank:
            msg = f"rank {rank}: {msg}"
    typer.echo(f"error: {msg}", err=True)


class VaekitGroup(TyperGroup):
    """Root command group that turns errors from any command (plugins' too) into one line and exit 1."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # usage errors and exits: Typer's own handling
            raise
        except KeyboardInterrupt:
            from ..distributed import env_rank, launched

            if not launched() or env_rank() == 0:  # torchrun passes Ctrl-C to every rank: rank 0 says it
                typer.echo("error: interrupted", err=True)
            raise typer.Exit(130)
        except Exception as e:  # noqa: BLE001 - the CLI's one place that reports every failure
            if _debug_requested(ctx):
                raise
            report_error(e)
            raise typer.Exit(1)


def build_app(pm=None) -> typer.Typer:
    """The root Typer app with the core commands and those plugins add through ``vaekit_register_commands``."""
    from ..manager import get_plugin_manager
    from . import apply, evaluate, export, plot, plugins, run, sample

    app = typer.Typer(
        cls=VaekitGroup,
        name="vaekit",
        help="Autoencoders and variational autoencoders from plugins.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode=None,
    )

    @app.callback()
    def _root(
        debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    ) -> None:
        """vaekit: train, evaluate, sample, apply and inspect autoencoders built from plugins."""

    for module in (run, evaluate, sample, apply, plot, export, plugins):
        module.register(app)
    (pm or get_plugin_manager()).hook.vaekit_register_commands(app=app)
    return app


def main() -> None:
    """Console-script entry point."""
    try:
        app = build_app()
    except Exception as e:  # plugin loading failed (e.g. two plugins claim one name)
        if os.environ.get("VAEKIT_DEBUG", "") not in ("", "0") or "--debug" in sys.argv:
            raise
        report_error(e)
        sys.exit(1)
    app()
