"""Meta-tests: every hook is documented in docs/plugins.md, and the core calls every hook."""

import functools
import inspect
import re
from pathlib import Path

import plugin_for_tests
import pytest

import vaekit
from vaekit import hookspecs
from vaekit.cli import build_app
from vaekit.manager import PluginManager

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name, f in vars(hookspecs).items() if name.startswith("vaekit_") and callable(f))


def test_all_hooks_follow_the_naming_rule():
    assert HOOKS, "no hooks found"
    assert all(re.fullmatch(r"vaekit_[a-z_]+", h) for h in HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docs_heading(hook):
    doc = (ROOT / "docs" / "plugins.md").read_text()
    assert re.search(rf"^#+ `?{hook}`?", doc, re.MULTILINE), f"docs/plugins.md has no heading for {hook}"


def _recording(impl, hook, invoked):
    """``impl`` with the same signature and ``@vaekit.hookimpl`` marker, noting ``hook`` in ``invoked`` when called."""

    @functools.wraps(impl)  # copies the marker attribute; pluggy reads the argument names through __wrapped__
    def wrapper(*args, **kwargs):
        invoked.add(hook)
        return impl(*args, **kwargs)

    return wrapper


@pytest.fixture(scope="module")
def invoked_hooks(tmp_path_factory):
    """Names of the hooks whose ``plugin_for_tests`` implementation the core called on its ordinary paths.

    The paths: building a PluginManager (the registration hooks), ``build_app(pm)`` (commands) and a
    one-epoch ``vaekit.train(..., pm=pm)`` (the fit lifecycle).  Each implementation is wrapped
    before the manager registers the module, so a call is seen whichever way the core makes it
    (pluggy's ``add_hookcall_monitoring`` would miss the registration hooks: the manager calls each
    implementation directly, to know which plugin owns which name).
    """
    invoked: set[str] = set()
    with pytest.MonkeyPatch.context() as mp:
        for hook in HOOKS:
            if hasattr(plugin_for_tests, hook):
                mp.setattr(plugin_for_tests, hook, _recording(getattr(plugin_for_tests, hook), hook, invoked))
        pm = PluginManager(extra_plugins=[plugin_for_tests], autoload=False)
        build_app(pm)
        vaekit.train(data="tiny", encoder="identity", decoder="affine", latent_dim=2, epochs=1,
                     out=str(tmp_path_factory.mktemp("hooks") / "run"), pm=pm, quiet=True, figures=False)
    return invoked


@pytest.mark.parametrize("hook", HOOKS)
def test_the_core_calls_the_hook(hook, invoked_hooks):
    impl = getattr(plugin_for_tests, hook, None)
    assert impl is not None and hasattr(impl, "vaekit_impl"), f"plugin_for_tests has no @vaekit.hookimpl {hook}"
    assert hook in invoked_hooks, f"the core never called {hook} (manager, CLI app and a training run)"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_docstring_documents_every_parameter(hook):
    f = getattr(hookspecs, hook)
    doc = inspect.getdoc(f) or ""
    for param in inspect.signature(f).parameters:
        assert f":param {param}:" in doc, f"{hook} does not document {param}"
    assert ":returns:" in doc
