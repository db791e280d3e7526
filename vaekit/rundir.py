"""Who may write a run directory, and what in it is vaekit's.

* **One writer.**  Training (a new run, ``--resume``, ``--overwrite``) holds an OS lock on the run
  directory's ``.lock`` file from before it writes anything there until it has finished (figures
  included): :func:`lock_run_dir`.  The kernel releases the lock when the process ends, however it
  ends (``kill -9`` too), so a dead run never leaves its directory locked.  A second writer gets
  :class:`RunDirLocked` naming the holder's PID.  POSIX: ``fcntl.flock``; Windows: ``msvcrt.locking``
  on one byte (untested); a platform with neither trains unlocked.
* **Other people's files.**  ``--out`` refuses an existing non-empty folder that is not a vaekit run
  (:func:`check_out_folder`); ``--overwrite`` deletes only vaekit's own run files
  (:func:`remove_run_files`); ``vaekit export --out`` refuses to write over them
  (:func:`check_not_run_file`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import checkpoint
from .errors import CheckpointError, ConfigError, OutputError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

LOCK = ".lock"


class RunDirLocked(CheckpointError):
    """Another process is writing this run directory (its lock is held)."""


def run_files() -> list[str]:
    """The names vaekit writes in a run directory: ``config.json``, the checkpoint, ``metrics.jsonl``,
    ``.lock`` and every figure of :data:`vaekit.viz.FIGURES` (``<name>.png``).  Temporaries of an
    interrupted write (``.<name>.*.tmp``, :func:`~vaekit.checkpoint.atomic_write`) are vaekit's too."""
    from .viz import FIGURES

    return [*checkpoint.RUN_FILES, LOCK] + [f"{n}.png" for n in FIGURES]


def _is_run_file(name: str) -> bool:
    own = run_files()
    return name in own or checkpoint.temporary_target(name) in own


def is_run_dir(path: Path) -> bool:
    """True if ``path`` holds a ``config.json`` written by vaekit (a JSON object with ``config`` and ``data``)."""
    try:
        with open(Path(path) / checkpoint.CONFIG, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "config" in info and "data" in info


def holds_weights(run_dir: Path) -> bool:
    """True if ``run_dir`` holds a checkpoint (:func:`~vaekit.checkpoint.has_checkpoint`) or trained weights."""
    run_dir = Path(run_dir)
    return checkpoint.has_checkpoint(run_dir) or (run_dir / checkpoint.MODEL).exists()


def check_out_folder(run_dir: Path) -> None:
    """Raise ConfigError (one line) if ``run_dir`` exists and is not a folder, or is a non-empty folder
    that is not a vaekit run (:func:`is_run_dir`); a missing or empty folder (or one holding only
    ``.lock`` and temporaries of vaekit's interrupted writes) passes.  Called before anything is written there."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"--out {str(run_dir)!r} is a file, not a folder; choose a new or empty folder")
    if is_run_dir(run_dir):
        return
    others = sorted(p.name for p in run_dir.iterdir() if not (p.name.startswith(".") and _is_run_file(p.name)))
    if others:
        shown = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
        raise ConfigError(f"--out {str(run_dir)!r} is a folder with other files in it ({shown}) and no vaekit "
                          "config.json; choose a new or empty folder")


def remove_run_files(run_dir: Path) -> list[str]:
    """Delete vaekit's own files in ``run_dir`` (:func:`run_files`, their temporaries; ``.lock`` stays):
    what ``--overwrite`` and a restart of a run that never checkpointed delete.  Every other file and
    every subfolder is left alone.  Returns the names deleted."""
    removed = []
    for p in sorted(Path(run_dir).iterdir()):
        if p.name != LOCK and _is_run_file(p.name) and (p.is_file() or p.is_symlink()):
            p.unlink()
            removed.append(p.name)
    return removed


def check_not_run_file(path: Path, what: str = "--out") -> None:
    """Raise ConfigError if ``path`` is one of a run directory's own files (:func:`run_files`: config,
    weights, trainer state, metrics, figures), so writing there would destroy part of a run.  A new
    name inside a run directory (``RUN/model.pt``) passes."""
    path = Path(path).expanduser().resolve()
    if _is_run_file(path.name) and is_run_dir(path.parent):
        raise ConfigError(f"{what} {str(path)!r} is one of the run {str(path.parent)!r}'s own files; "
                          "give another name (e.g. model.pt)")


class RunDirLock:
    """An exclusive, non-blocking OS lock on ``<run_dir>/.lock`` (see the module docstring).

    :meth:`acquire` raises :class:`RunDirLocked` ("… is being written by process 12345; wait for it or
    stop it") when another process holds it, and writes this process's PID into the file; :meth:`release`
    (or the process ending) frees it.  Usable as a context manager."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._file = None

    def acquire(self) -> "RunDirLock":
        """Take the lock; RunDirLocked if another process holds it, OutputError if ``.lock`` cannot be written."""
        try:
            f = open(self.path, "a+")
        except OSError as e:
            raise OutputError(f"cannot write in {str(self.run_dir)!r}: {e.strerror or e}") from None
        try:
            _lock(f)
        except OSError:
            f.seek(0)
            pid = f.read().strip()
            f.close()
            who = f"process {pid}" if pid.isdigit() else "another process"
            raise RunDirLocked(f"{str(self.run_dir)!r} is being written by {who}; wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.truncate(0)  # no stale PID for the next reader
            _unlock(f)
        finally:
            f.close()

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_WINDOWS_BYTE = 1 << 20  # msvcrt locks are mandatory: lock a byte past the PID so it stays readable


def _lock(f) -> None:
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif msvcrt is not None:
        f.seek(_WINDOWS_BYTE)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)


def _unlock(f) -> None:
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    elif msvcrt is not None:
        f.seek(_WINDOWS_BYTE)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


def lock_run_dir(run_dir: Path) -> RunDirLock:
    """Take the lock of ``run_dir`` (which must exist) and return it; RunDirLocked if another process holds it."""
    return RunDirLock(run_dir).acquire()


__all__ = ["LOCK", "RunDirLock", "RunDirLocked", "check_not_run_file", "check_out_folder", "holds_weights",
           "is_run_dir", "lock_run_dir", "remove_run_files", "run_files"]
