"""Meta-tests: every hook is documented in docs/plugins.md and exercised by a test."""

import inspect
import re
from pathlib import Path

import pytest

from vaekit import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name, f in vars(hookspecs).items() if name.startswith("vaekit_") and callable(f))


def test_all_hooks_follow_the_naming_rule():
    assert HOOKS, "no hooks found"
    assert all(re.fullmatch(r"vaekit_[a-z_]+", h) for h in HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docs_heading(hook):
    doc = (ROOT / "docs" / "plugins.md").read_text()
    assert re.search(rf"^#+ `?{hook}`?", doc, re.MULTILINE), f"docs/plugins.md has no heading for {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    own = Path(__file__).name
    hits = [p.name for p in (ROOT / "tests").glob("*.py") if p.name != own and hook in p.read_text()]
    assert hits, f"no test mentions {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_docstring_documents_every_parameter(hook):
    f = getattr(hookspecs, hook)
    doc = inspect.getdoc(f) or ""
    for param in inspect.signature(f).parameters:
        assert f":param {param}:" in doc, f"{hook} does not document {param}"
    assert ":returns:" in doc
