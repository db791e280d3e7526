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


def test_the_notebook_example_runs(tmp_path, monkeypatch):
    """docs/plugins.md's notebook snippet, with its my_plugin.py, runs as written (on less data)."""
    import re

    doc = (ROOT / "docs" / "plugins.md").read_text()
    plugin = re.search(r"```python\n# my_plugin.py\n(.*?)```", doc, re.DOTALL).group(1)
    snippet = re.search(r"```python\nimport vaekit\nimport my_plugin.*?\n(.*?)```", doc, re.DOTALL).group(0)
    (tmp_path / "my_plugin.py").write_text(plugin)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code = snippet.strip("`").removeprefix("python\n")
    code = code.replace('epochs=5', 'epochs=1, data="mnist:train_per_class=5,test_per_class=2"')
    code = code.replace('"mnist:train_per_class=100"', '"mnist:train_per_class=5,test_per_class=2"')
    code = code.replace("print(vaekit.evaluate(model, split=\"test\", pm=pm))",
                        "result = vaekit.evaluate(model, split=\"test\", pm=pm, nll_samples=5)")
    namespace: dict = {}
    exec(compile(code, "docs/plugins.md", "exec"), namespace)
    assert "elbo" in namespace["result"] and namespace["data"].train_x.shape[0] == 50
