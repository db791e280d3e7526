"""Registries: plugins of one kind keyed by name, with typed options.

A plugin is a *factory* (usually a class) registered under a name.  Its
**options** are the factory's keyword-only parameters, with type annotations
and defaults; its other parameters are the *context* the pipeline supplies
(e.g. ``input_shape`` for an encoder).  Users pick a plugin and set options
with a spec string, ``"conv:channels=32,64,kernel_size=3"``, or a TOML table.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from .errors import ConfigError, UnknownPluginError

KINDS = ("encoder", "decoder", "prior", "likelihood", "regularizer", "objective", "dataset")
# tables of named methods with typed options that the trainer keeps itself, not filled by plugin hooks
TRAINER_KINDS = ("pretraining method",)


@dataclass(frozen=True)
class Option:
    """One option of a plugin: its name, annotated type, default and help text."""

    name: str
    type: Any
    default: Any
    help: str = ""

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


@dataclass(frozen=True)
class PluginInfo:
    """A registered plugin: what it is, where it came from and what options it takes."""

    kind: str
    name: str
    factory: Callable[..., Any]
    source: str
    summary: str
    options: Mapping[str, Option]

    def describe_options(self) -> str:
        """``"channels: tuple[int, ...] = (32, 64), kernel_size: int = 4"``"""
        return ", ".join(f"{o.name}: {o.type_name} = {o.default!r}" for o in self.options.values())


@dataclass(frozen=True)
class PluginSpec:
    """A chosen plugin and the options the user set (values may still be strings)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: "str | Mapping[str, Any] | PluginSpec") -> "PluginSpec":
        """Parse ``"name"``, ``"name:key=value,key2=v1,v2"`` or ``{"name": ..., key: value}``.

        In the string form a comma-separated item without ``=`` continues the
        previous option's value, so ``conv:channels=32,64,kernel_size=3`` sets
        ``channels="32,64"`` and ``kernel_size="3"``.

        Raises ConfigError if the string has no name or an option has no ``=``, or if a table's
        ``options`` entry is not a table.
        """
        if isinstance(value, PluginSpec):
            return value
        if isinstance(value, Mapping):
            opts = dict(value)
            name = opts.pop("name", None)
            if not isinstance(name, str) or not name:
                raise ConfigError(f"a plugin table needs a 'name' entry, got {dict(value)!r}")
            nested = opts.pop("options", None)
            if isinstance(nested, Mapping):
                opts.update(nested)
            elif nested is not None:
                raise ConfigError(f"plugin {name!r}: 'options' must be a table of option = value "
                                  f"([<field>.options] or options = {{ key = value }}), got {nested!r}")
            return cls(name, opts)
        if not isinstance(value, str):
            raise ConfigError(f"a plugin must be given as 'name:key=value,...', got {value!r}")
        name, _, rest = value.strip().partition(":")
        name = name.strip()
        if not name:
            raise ConfigError(f"missing plugin name in {value!r}")
        options: dict[str, str] = {}
        last: str | None = None
        for item in (rest.split(",") if rest.strip() else []):
            if "=" in item:
                key, _, val = item.partition("=")
                last = key.strip()
                if not last:
                    raise ConfigError(f"empty option name in {value!r}")
                options[last] = val.strip()
            elif last is None:
                raise ConfigError(f"option {item.strip()!r} in {value!r} has no '=value'")
            else:
                options[last] += "," + item.strip()
        return cls(name, options)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in self.options.items())

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "options": {k: _jsonable(v) for k, v in self.options.items()}}


class Registry:
    """Plugins of one kind, keyed by name.

    Registering a name twice raises ``ValueError`` naming both owners; looking
    up an unknown name raises :class:`UnknownPluginError` listing the known
    names and the closest match.
    """

    def __init__(self, kind: str) -> None:
        if kind not in KINDS + TRAINER_KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS + TRAINER_KINDS)}")
        self.kind = kind
        self._plugins: dict[str, PluginInfo] = {}
        self.owner = "unknown"  # set by the manager while a plugin's hook runs

    def register(self, name: str, factory: Callable[..., Any] | None = None, *, summary: str | None = None):
        """Register ``factory`` under ``name``; usable as ``registry.register("x", Cls)`` or as a decorator.

        Raises ValueError if ``name`` is already registered (naming both owners)
        or if an option has no default.
        """
        if factory is None:
            return lambda f: self.register(name, f, summary=summary)
        if not isinstance(name, str) or not name or ":" in name or "," in name:
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if name in self._plugins:
            other = self._plugins[name]
            raise ValueError(
                f"{self.kind} {name!r} is registered twice: by {other.source!r} and by {self.owner!r}"
            )
        doc = inspect.getdoc(factory) or ""
        self._plugins[name] = PluginInfo(
            kind=self.kind,
            name=name,
            factory=factory,
            source=self.owner,
            summary=summary or (doc.splitlines()[0] if doc else ""),
            options=_options_of(factory, f"{self.kind} {name!r}"),
        )
        return factory

    def get(self, name: str) -> PluginInfo:
        try:
            return self._plugins[name]
        except KeyError:
            known = sorted(self._plugins)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownPluginError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(known) or '(none)'}{hint}",
                self.kind, name,
            ) from None

    def resolve_options(self, spec: PluginSpec) -> dict[str, Any]:
        """All options of ``spec``'s plugin, defaults filled in and values converted to their types.

        Raises UnknownPluginError for an unknown name, ConfigError for an
        unknown option or a value that does not convert.
        """
        info = self.get(spec.name)
        unknown = set(spec.options) - set(info.options)
        if unknown:
            known = ", ".join(info.options) or "(none)"
            bad = sorted(unknown)[0]
            close = difflib.get_close_matches(bad, list(info.options), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{self.kind} {spec.name!r} has no option {bad!r}; its options: {known}{hint}"
            )
        resolved = {}
        for opt in info.options.values():
            if opt.name in spec.options:
                resolved[opt.name] = coerce(spec.options[opt.name], opt.type, f"{self.kind} {spec.name!r} option {opt.name!r}")
            else:
                resolved[opt.name] = opt.default
        return resolved

    def build(self, spec: PluginSpec, **context: Any) -> Any:
        """Call the plugin's factory with the pipeline ``context`` and the resolved options."""
        info = self.get(spec.name)
        return info.factory(**context, **self.resolve_options(spec))

    def names(self) -> list[str]:
        return sorted(self._plugins)

    def __iter__(self) -> Iterator[PluginInfo]:
        return iter(self._plugins[n] for n in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._plugins

    def __len__(self) -> int:
        return len(self._plugins)


def _options_of(factory: Callable[..., Any], what: str) -> dict[str, Option]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: fall back to the raw ones
        hints = {}
    helps = _param_help(inspect.getdoc(factory) or "")
    options = {}
    for p in sig.parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.default is inspect.Parameter.empty:
            raise ValueError(f"{what}: option {p.name!r} needs a default")
        typ = hints.get(p.name, p.annotation)
        if typ is inspect.Parameter.empty:
            typ = type(p.default) if p.default is not None else str
        options[p.name] = Option(p.name, typ, p.default, helps.get(p.name, ""))
    return options


def _param_help(doc: str) -> dict[str, str]:
    """``:param name: text`` lines of a docstring."""
    out = {}
    for line in doc.splitlines():
        line = line.strip()
        if line.startswith(":param "):
            head, _, text = line[len(":param "):].partition(":")
            out[head.strip().split()[-1]] = text.strip()
    return out


def _type_name(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(typ))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(typ))
    if origin is tuple:
        args = typing.get_args(typ)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
    if typ is type(None):
        return "None"
    return getattr(typ, "__name__", str(typ))


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce(value: Any, typ: Any, what: str = "value") -> Any:
    """Convert ``value`` (a string from the command line, or a TOML value) to ``typ``.

    Supports ``int``, ``float``, ``bool``, ``str``, ``tuple[T, ...]``,
    ``Literal[...]`` and ``T | None``.  Raises ConfigError naming ``what``.
    """
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    try:
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
                if type(None) in args:
                    return None
            errors = []
            for a in args:
                if a is type(None):
                    continue
                try:
                    return coerce(value, a, what)
                except ConfigError as e:
                    errors.append(e)
            raise errors[0]
        if origin is typing.Literal:
            for a in args:
                if value == a or (isinstance(value, str) and str(a) == value):
                    return a
            raise ValueError(f"must be one of {', '.join(map(str, args))}")
        if origin is tuple:
            inner = args[0] if args else str
            if isinstance(value, str):
                items = [v for v in value.replace(" ", "").split(",") if v != ""]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                items = [value]
            try:
                return tuple(coerce(v, inner, what) for v in items)
            except ConfigError:
                raise ValueError(f"must be a comma-separated list of {_type_name(inner)}") from None
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError("must be true or false")
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("must be an integer")
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError("must be a number")
            return float(value)
        if typ is str:
            return str(value)
        if typ is Any:
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        msg = str(e) if "must" in str(e) else f"must be {_type_name(typ)}"
        raise ConfigError(f"{what}: {value!r} {msg}") from None
    return value


def _format_value(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v))
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    return v
