"""The error types vaekit raises for bad input.

Every error a user can cause (a bad flag, bad data, a broken checkpoint) is a
:class:`VaekitError`; the CLI turns it into one readable line and exit code 1.
"""

from __future__ import annotations


class VaekitError(Exception):
    """Base class of errors caused by user input; the message is one readable line."""


class ConfigError(VaekitError, ValueError):
    """An invalid configuration: unknown option, wrong option type, incompatible choices."""


class UnknownPluginError(ConfigError, KeyError):
    """A plugin name that no registry knows.

    The message lists the known names of that kind and the closest match; :attr:`kind` and
    :attr:`name` say which plugin was asked for.
    """

    def __init__(self, message: str, kind: str = "", name: str = "") -> None:
        super().__init__(message)
        self.kind, self.name = kind, name

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class DataError(VaekitError, ValueError):
    """Missing, unreadable, wrongly shaped or non-finite data."""


class CheckpointError(VaekitError):
    """A missing, corrupt or mismatched checkpoint or run directory."""


class OutputError(VaekitError, OSError):
    """An output file that cannot be written (a folder in its place, a missing or read-only folder, a full disk)."""


class TrainingError(VaekitError):
    """Training could not go on (e.g. the loss became NaN or inf)."""


def first_line(e: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """The first line of ``str(e)``, at most ``limit`` characters, for one-line error messages;
    ``empty`` (default: the exception's type name) when the message is empty."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else (type(e).__name__ if empty is None else empty))[:limit]


def is_out_of_memory(e: BaseException) -> bool:
    """True for a failed allocation: MemoryError, torch's CUDA ``OutOfMemoryError``, or the CPU
    allocator's ``RuntimeError`` ("can't allocate memory")."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))
