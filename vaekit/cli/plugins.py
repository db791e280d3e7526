"""``vaekit plugins``: every registered plugin by kind, with its source and options."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("plugins")(list_plugins)


def list_plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """List encoders, decoders, priors, likelihoods, regularizers and datasets, and where each came from."""
    from ..manager import get_plugin_manager

    pm = get_plugin_manager()
    listing = {
        kind: [
            {
                "name": info.name,
                "source": info.source,
                "summary": info.summary,
                "options": {o.name: {"type": o.type_name, "default": list(o.default) if isinstance(o.default, tuple) else o.default, "help": o.help}
                            for o in info.options.values()},
            }
            for info in registry
        ]
        for kind, registry in pm.registries.items()
    }
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for kind, plugins in listing.items():
        table = Table(title=f"{kind}s", title_justify="left", expand=False)
        table.add_column("name", style="bold")
        table.add_column("source")
        table.add_column("options")
        table.add_column("summary")
        for p in plugins:
            opts = ", ".join(f"{k}={_fmt(v['default'])}" for k, v in p["options"].items())
            table.add_row(escape(p["name"]), escape(p["source"]), escape(opts) or "—", escape(p["summary"].replace("``", "")))
        if not plugins:
            table.add_row("—", "", "", "(none registered)")
        console.print(table)


def _fmt(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)
