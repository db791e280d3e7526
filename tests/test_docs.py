"""The per-kind plugin pages in docs/plugins/ are generated from the docstrings and kept current."""

from pathlib import Path

import pytest

from vaekit.cli.plugins import render_markdown
from vaekit.manager import PluginManager

ROOT = Path(__file__).resolve().parent.parent
PM = PluginManager(autoload=False)


@pytest.mark.parametrize("kind", list(PM.registries))
def test_plugin_pages_are_up_to_date(kind):
    page = ROOT / "docs" / "plugins" / f"{kind}s.md"
    expected = render_markdown(kind, PM.registries[kind])
    assert page.read_text() == expected, (
        f"{page} is stale: run VAEKIT_DISABLE_PLUGIN_AUTOLOAD=1 vaekit plugins --docs docs/plugins")


@pytest.mark.parametrize("kind,name", [(k, i.name) for k, r in PM.registries.items() for i in r])
def test_every_builtin_has_a_heading_options_and_a_source(kind, name):
    page = (ROOT / "docs" / "plugins" / f"{kind}s.md").read_text()
    assert f"\n## {name}\n" in page
    info = PM.registries[kind].get(name)
    for option in info.options:
        assert f"| `{option}` |" in page
        assert info.options[option].help, f"{kind} {name!r}: option {option!r} has no :param: help"
