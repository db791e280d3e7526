"""The plugin manager: built-ins and third-party plugins through one mechanism.

Built-in plugins are the modules named in :data:`vaekit.plugins.DEFAULT_PLUGINS`;
third-party plugins are loaded from the entry-point group ``vaekit`` unless the
environment variable ``VAEKIT_DISABLE_PLUGIN_AUTOLOAD`` is set (to anything
but ``""`` or ``0``).
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .registry import KINDS, Registry

ENTRY_POINT_GROUP = "vaekit"
BUILTIN = "builtin"

_REGISTER_HOOKS = {
    "encoder": "vaekit_register_encoders",
    "decoder": "vaekit_register_decoders",
    "prior": "vaekit_register_priors",
    "likelihood": "vaekit_register_likelihoods",
    "regularizer": "vaekit_register_regularizers",
    "objective": "vaekit_register_objectives",
    "dataset": "vaekit_register_datasets",
}


class PluginManager:
    """A pluggy manager plus one :class:`Registry` per plugin kind.

    :param extra_plugins: further plugin objects (modules or instances with
        ``@vaekit.hookimpl`` methods) to register after the built-ins; tests
        and embedding programs use this.
    :param autoload: load the ``vaekit`` entry-point group; ``None`` means
        "unless ``VAEKIT_DISABLE_PLUGIN_AUTOLOAD`` is set".
    """

    def __init__(self, extra_plugins: Iterable[Any] = (), autoload: bool | None = None) -> None:
        from .plugins import DEFAULT_PLUGINS

        self.pm = pluggy.PluginManager("vaekit")
        self.pm.add_hookspecs(hookspecs)
        for modname in DEFAULT_PLUGINS:
            self.pm.register(importlib.import_module(modname), name=modname)
        if autoload is None:
            autoload = os.environ.get("VAEKIT_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
        if autoload:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for plugin in extra_plugins:
            self.pm.register(plugin)
        self.pm.check_pending()
        self.registries: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}
        for kind, hook in _REGISTER_HOOKS.items():
            self._collect(hook, self.registries[kind])

    @property
    def hook(self):
        return self.pm.hook

    def source_of(self, plugin: Any) -> str:
        """``"builtin"``, the distribution ``name==version`` of an entry-point plugin, or its registered name."""
        name = self.pm.get_name(plugin) or repr(plugin)
        if name.startswith("vaekit.plugins."):
            return BUILTIN
        for p, dist in self.pm.list_plugin_distinfo():
            if p is plugin:
                return f"{dist.metadata['name']}=={dist.version}"
        return name

    def _collect(self, hook_name: str, registry: Registry) -> None:
        # Each implementation is called on its own so the registry knows who owns each name.
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            registry.owner = self.source_of(impl.plugin)
            impl.function(**{arg: registry for arg in impl.argnames})
        registry.owner = "unknown"

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    def __getattr__(self, name: str) -> Registry:
        # pm.encoders, pm.decoders, ... for convenience
        kinds = {k + "s": k for k in KINDS}
        if name in kinds:
            return self.registries[kinds[name]]
        raise AttributeError(name)


@lru_cache(maxsize=1)
def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (built once, on first use)."""
    return PluginManager()
