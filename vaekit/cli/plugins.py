"""``vaekit plugins``: every registered plugin by kind, with its source and options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("plugins")(list_plugins)


def list_plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    docs: Annotated[Optional[Path], typer.Option(help="Write one Markdown page per plugin kind into this folder.")] = None,
) -> None:
    """List encoders, decoders, priors, likelihoods, regularizers, objectives and datasets, and where each came from."""
    from ..manager import get_plugin_manager

    pm = get_plugin_manager()
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for kind, registry in pm.registries.items():
            (docs / f"{kind}s.md").write_text(render_markdown(kind, registry))
        typer.echo(f"wrote {len(pm.registries)} pages to {docs}")
        return
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


_INTROS = {
    "encoder": "Encoders map data `x [B, *S]` to features `h [B, F]`; the prior's posterior head turns `h` into "
               "the posterior's parameters. Choose with `--encoder NAME:key=value,...`.",
    "decoder": "Decoders map codes `z [B, d]` to the likelihood's parameters. `--decoder` defaults to the "
               "encoder's name.",
    "prior": "A prior fixes p(z) and the posterior family q(z|x). Choose with `--prior`.",
    "likelihood": "A likelihood turns the decoder's output into log p(x|z) per sample (nats, summed over data "
                  "dimensions). Choose with `--likelihood`.",
    "regularizer": "Regularizers add named, weighted penalties (and may corrupt inputs, transform codes or own an "
                   "optimizer). Combine several with repeated `--regularizer`.",
    "objective": "An objective is the loss a run minimises; evaluation (test ELBO, NLL) does not depend on it. "
                 "Choose with `--objective NAME:key=value,...` (default `elbo`).",
    "dataset": "Datasets are held in memory; nothing is downloaded. Choose with `--data NAME:key=value` or `--data PATH`.",
}


def render_markdown(kind: str, registry) -> str:
    """One Markdown page for a plugin kind, from each plugin's docstring and options."""
    import inspect

    lines = [f"# {kind.capitalize()}s", "",
             _INTROS.get(kind, ""), "",
             "Generated from the plugins' docstrings by `vaekit plugins --docs docs/plugins`; edit the docstrings, "
             "not this page.", ""]
    for info in registry:
        doc = inspect.getdoc(info.factory) or info.summary
        body = "\n".join(line for line in doc.splitlines() if not line.strip().startswith(":param ")).rstrip().splitlines()
        lines += [f"## {info.name}", "", *[line.replace("``", "`") for line in body], ""]
        if info.options:
            lines += ["| option | type | default | meaning |", "|---|---|---|---|"]
            for o in info.options.values():
                default = _fmt(list(o.default) if isinstance(o.default, tuple) else o.default)
                meaning = o.help.replace("``", "`").replace("|", "\\|")
                type_name = o.type_name.replace("|", "\\|")
                lines.append(f"| `{o.name}` | `{type_name}` | `{default}` | {meaning} |")
            lines.append("")
        else:
            lines += ["No options.", ""]
        flag = "--data" if kind == "dataset" else f"--{kind}"
        lines += [f"Usage: `{flag} {info.name}`", ""]
    return "\n".join(lines).rstrip() + "\n"
