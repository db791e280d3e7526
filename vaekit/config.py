"""Run configuration: one dataclass, read from TOML and command-line flags, written to config.json."""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from .errors import ConfigError
from .registry import PluginSpec, coerce

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Binarize = Literal["auto", "dynamic", "static", "none"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]
Condition = Literal["none", "label"]
Compile = Literal["off", "default", "reduce-overhead", "max-autotune"]

MAX_LATENT_DIM = 1_000_000
"""The largest latent dimension d a config accepts (far beyond any model that fits in memory at d = 10⁶)."""
MAX_EPOCHS = 1_000_000
"""The most epochs a config accepts: a larger number is a typo (``epochs = 1e20``), not a run."""
MAX_BATCH_SIZE = 2**31 - 1
"""The largest mini-batch a config accepts (torch indexes batches with 32-bit sizes in places)."""
MAX_STEPS = 2**62
"""The most optimizer steps ``max_steps`` accepts (a larger number is a typo, not a run)."""
MAX_WORKERS = 256
"""The most data-loading worker processes ``workers`` accepts."""
MAX_SEED = 2**63 - 1
"""The largest seed: torch's generators take a 64-bit seed (a seed of 1e23 overflows)."""

_SPEC_FIELDS = ("data", "encoder", "decoder", "prior", "likelihood", "objective", "pretrain")


@dataclass
class RunConfig:
    """Everything that defines a training run.

    Plugin fields are :class:`~vaekit.registry.PluginSpec` (``"conv:channels=32,64"``);
    ``decoder=None`` means "the mirror of the encoder" (:func:`vaekit.model.decoder_spec`).  ``binarize``
    ``auto`` picks the likelihood's default (dynamic for Bernoulli, none
    otherwise).  ``out=None`` means ``runs/<timestamp>-<encoder>-<prior>``.  ``precision``
    ``bf16``/``fp16`` trains under ``torch.autocast`` (fp16 with a gradient scaler); evaluation
    stays in float32.  ``init`` names a run directory whose weights start this run
    (:func:`vaekit.checkpoint.load_matching_weights`); ``pretrain`` a pretraining method run before
    training (:mod:`vaekit.pretrain`, ``"layerwise:epochs=5"``).  Both set the starting weights, so
    at most one of them may be given.  ``condition`` ``label`` trains a conditional VAE
    (Sohn et al. 2015) on the dataset's labels (:mod:`vaekit.conditioning`).  ``objective`` is the training objective
    (:class:`~vaekit.interfaces.Objective`, ``"elbo"``, ``"iwae:k=5"``); its β is ``beta`` unless it
    sets its own.  A ``config.json`` written before objectives existed loads with ``elbo``.
    ``checkpoint_every`` N > 0 also checkpoints every N optimizer steps mid-epoch (0: at the end of
    each epoch only); a resumed run continues at the exact batch (docs/runs.md).  ``max_steps`` N > 0
    ends training after N optimizer steps in all (counted over the whole run, resumes included),
    with a checkpoint, mid-epoch if it falls there; 0: no limit (``epochs`` still ends the run).
    ``workers`` N > 0 reads the training batches in N :class:`torch.utils.data.DataLoader` worker
    processes (for data read from disk, docs/data.md); results do not depend on it.  ``compile``
    (``off``, ``default``, ``reduce-overhead``, ``max-autotune``) runs the training step's forward pass and
    loss through :func:`torch.compile` in that mode (:mod:`vaekit.compiling`); results change by float
    rounding only, and a resumed run may change it.

    Raises ConfigError (one line) for a value of the wrong type, ``latent_dim``/``epochs``/``batch_size``
    below 1 or above :data:`MAX_LATENT_DIM`/:data:`MAX_EPOCHS`/:data:`MAX_BATCH_SIZE`, a ``max_steps``
    outside [0, :data:`MAX_STEPS`], ``workers`` outside [0, :data:`MAX_WORKERS`], a ``seed``
    outside [0, :data:`MAX_SEED`], a non-finite or non-positive ``lr``, a non-finite or negative
    ``beta``, an ``out``/``init`` that is not a path string, and incompatible choices.
    """

    data: PluginSpec = field(default_factory=lambda: PluginSpec("mnist"))
    encoder: PluginSpec = field(default_factory=lambda: PluginSpec("conv"))
    decoder: PluginSpec | None = None
    prior: PluginSpec = field(default_factory=lambda: PluginSpec("gaussian"))
    likelihood: PluginSpec = field(default_factory=lambda: PluginSpec("bernoulli"))
    regularizers: list[PluginSpec] = field(default_factory=list)
    objective: PluginSpec = field(default_factory=lambda: PluginSpec("elbo"))
    latent_dim: int = 16
    beta: float = 1.0
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: Device = "auto"
    binarize: Binarize = "auto"
    precision: Precision = "fp32"
    condition: Condition = "none"
    out: str | None = None
    checkpoint_every: int = 0
    max_steps: int = 0
    workers: int = 0
    compile: Compile = "off"
    init: str | None = None
    pretrain: PluginSpec | None = None

    def __post_init__(self) -> None:
        for name in _SPEC_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _parse_spec(value, name))
        if isinstance(self.regularizers, (str, Mapping, PluginSpec)):
            self.regularizers = [self.regularizers]
        self.regularizers = [_parse_spec(r, "regularizer") for r in self.regularizers]
        hints = {"latent_dim": int, "beta": float, "epochs": int, "batch_size": int, "lr": float, "seed": int,
                 "checkpoint_every": int, "max_steps": int, "workers": int, "device": Device, "binarize": Binarize, "precision": Precision,
                 "condition": Condition, "compile": Compile}
        for name, typ in hints.items():
            setattr(self, name, coerce(getattr(self, name), typ, name.replace("_", "-")))
        if self.latent_dim < 1:
            raise ConfigError(f"latent-dim must be at least 1, got {self.latent_dim}")
        for name, top in (("latent_dim", MAX_LATENT_DIM), ("epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH_SIZE)):
            if getattr(self, name) > top:
                raise ConfigError(f"{name.replace('_', '-')} must be at most {top:,}, got {getattr(self, name):.3g}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size must be at least 1, got {self.batch_size}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint-every must be >= 0 (0: at the end of each epoch only), got {self.checkpoint_every}")
        if not 0 <= self.max_steps <= MAX_STEPS:
            raise ConfigError(f"max-steps must be a number of optimizer steps in [0, {MAX_STEPS:.3g}] "
                              f"(0: no limit), got {self.max_steps:.3g}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be in [0, {MAX_WORKERS}] (0: read batches in the training process), "
                              f"got {self.workers:.3g}")
        check_seed(self.seed, "seed")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite positive number, got {self.lr}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"beta must be a finite number >= 0, got {self.beta}")
        if self.out is not None and not isinstance(self.out, (str, Path)):
            raise ConfigError(f"out must be a folder path (a string), got {self.out!r}")
        if self.out is not None:
            self.out = str(self.out)
            if not self.out:
                raise ConfigError("out must name a run directory, got ''")
        if self.init is not None:
            if not isinstance(self.init, (str, Path)):
                raise ConfigError(f"init must be a run directory path (a string), got {self.init!r}")
            self.init = coerce(self.init, str, "init")
            if not self.init:
                raise ConfigError("init must name a run directory, got ''")
        if self.pretrain is not None:
            from .pretrain import build_pretraining

            build_pretraining(self.pretrain)  # an unknown method or a bad option fails here, before any work
            if self.init is not None:
                raise ConfigError("--init and --pretrain both set the starting weights; give one of them")
            if self.condition != "none":
                raise ConfigError("--pretrain does not support --condition label (its stages train the unconditional layers); drop one of them")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build from a mapping (TOML table or config.json); unknown keys raise ConfigError."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a run config must be a table of settings, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        values = {k.replace("-", "_"): v for k, v in values.items()}
        if "regularizer" in values and "regularizers" not in values:
            values["regularizers"] = values.pop("regularizer")
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        """Read a TOML file whose top-level keys are the fields (plugins as strings or tables)."""
        p = Path(path)
        try:
            with p.open("rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(p)!r} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {str(p)!r} is a folder; give a TOML file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {str(p)!r}: {e}") from None
        table = values.get("run", values)
        if not isinstance(table, Mapping):
            raise ConfigError(f"config file {str(p)!r}: 'run' must be a table of settings ([run]), got {table!r}")
        return cls.from_dict(table)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with the non-None ``changes`` applied (command-line flags over a config file)."""
        changes = {k: v for k, v in changes.items() if v is not None and v != []}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, PluginSpec):
                v = v.to_json()
            elif f.name == "regularizers":
                v = [r.to_json() for r in v]
            out[f.name] = v
        return out


def check_seed(seed: int, what: str = "--seed") -> int:
    """``seed`` if it is in [0, :data:`MAX_SEED`]; ConfigError naming ``what`` otherwise."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{what} must be an integer in [0, 2**63 - 1], got {seed:.3g}")
    return seed


def _parse_spec(value: Any, what: str) -> PluginSpec:
    try:
        return PluginSpec.parse(value)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
