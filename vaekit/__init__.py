"""vaekit: plugin-based autoencoders and variational autoencoders on PyTorch."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("vaekit")
"""The marker for hook implementations: ``@vaekit.hookimpl``."""

from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    DataError,
    TrainingError,
    UnknownPluginError,
    VaekitError,
)
from .interfaces import Decoder, Encoder, Likelihood, Objective, Plugin, Prior, Regularizer, StepOutput  # noqa: E402
from .manager import PluginManager, get_plugin_manager  # noqa: E402
from .registry import PluginSpec, Registry  # noqa: E402


def __getattr__(name: str):
    # Heavier entry points load lazily so `import vaekit` stays cheap for plugin modules.
    if name in ("train", "RunConfig"):
        from . import config, training

        return {"train": training.train, "RunConfig": config.RunConfig}[name]
    if name in ("export_torchscript", "load_exported"):
        from . import export

        return getattr(export, name)
    if name in ("load_run", "VAEModel"):
        from . import checkpoint, model

        return {"load_run": checkpoint.load_run, "VAEModel": model.VAEModel}[name]
    if name in ("evaluate", "load_data", "resume"):
        from . import evaluation, training

        return {"evaluate": evaluation.evaluate_run, "load_data": training.load_data, "resume": training.resume}[name]
    if name in ("embed", "reconstruct", "score"):
        from . import apply

        return getattr(apply, name)
    raise AttributeError(f"module 'vaekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazily loaded ones included (so tab completion finds them)."""
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Decoder",
    "Encoder",
    "Likelihood",
    "Objective",
    "Plugin",
    "PluginManager",
    "PluginSpec",
    "Prior",
    "Regularizer",
    "Registry",
    "RunConfig",
    "StepOutput",
    "TrainingError",
    "UnknownPluginError",
    "VAEModel",
    "VaekitError",
    "__version__",
    "get_plugin_manager",
    "hookimpl",
    "embed",
    "evaluate",
    "export_torchscript",
    "load_data",
    "load_exported",
    "load_run",
    "reconstruct",
    "resume",
    "score",
    "train",
]
