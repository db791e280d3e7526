"""Run directories: ``config.json``, the checkpoint ``trainer_state.safetensors`` and the files derived
from it, ``model.safetensors`` and ``metrics.jsonl`` (docs/runs.md).

No pickles: tensors go through safetensors, everything else through JSON.
Every file is written to a temporary name, fsynced and renamed into place, so a kill
never leaves a half-written file; a checkpoint is one file, so it is committed by one rename.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, ConfigError, OutputError, first_line

RUN_FORMAT = "vaekit-run/2"
"""The format ``config.json`` records.  2: a ``sparsity:target=code`` run's decoder reads sigmoid codes
(in 1 it read the raw code, so those weights are refused: :func:`check_run_format`)."""
CONFIG = "config.json"
MODEL = "model.safetensors"
STATE = "trainer_state.safetensors"
METRICS = "metrics.jsonl"


# --- atomic writes ------------------------------------------------------------------------------

def check_output(path: Path, what: str = "output") -> Path:
    """Raise OutputError unless ``path`` can be a file: its folder exists and ``path`` is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a folder; give a file name")
    if not path.parent.is_dir():
        state = "is not a folder" if path.parent.exists() else "does not exist"
        raise OutputError(f"output folder {str(path.parent)!r} {state}")
    return path


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (same folder).

    A kill never leaves a half-written ``path``.  Raises OutputError (one line, nothing left
    behind) when the file cannot be written: a folder in its place, a missing or read-only
    folder, a full disk.
    """
    path = Path(path)
    check_output(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        _fsync(tmp)
        kill_point(f"writing:{path.name}", tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself survives a crash of the machine
        kill_point(f"wrote:{path.name}")
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {str(path)!r}: {e.strerror or first_line(e)}") from None
        raise


def _fsync(path) -> None:
    """Flush a file's (or a folder's: its entries') data to the disk.  A file whose flush fails (EIO, a full
    disk reported late) raises the OSError, so it is never renamed into place as committed; for a folder,
    where some systems refuse an fsync (EINVAL, EBADF, or no O_RDONLY open), only a lost write (EIO, a full
    disk) raises."""
    folder = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not folder or e.errno in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, payload: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` (detached, contiguous, on the CPU) to a safetensors file atomically.

    A CPU tensor that owns its memory is written as it is (safetensors reads it in place); a copy is made
    only of tensors that share memory with another one in ``tensors`` (tied weights, views), which
    safetensors refuses: a checkpoint of the conv VAE and its Adam state no longer doubles those ~20 MB
    while it is written."""
    flat, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        storage = v.untyped_storage()
        if v.numel() and (storage.data_ptr() in seen or storage.nbytes() != v.numel() * v.element_size()):
            v = v.clone()
        if v.numel():
            seen.add(v.untyped_storage().data_ptr())
        flat[k] = v
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file and its metadata; CheckpointError if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} is missing")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{what} {str(path)!r} is corrupt or truncated ({_short(e)})") from None
    return tensors, metadata


def read_json(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} is missing")
    try:
        with path.open() as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON ({_short(e)})") from None
    except RecursionError:
        raise CheckpointError(f"{what} {str(path)!r} is not a vaekit file (JSON nested too deeply to read)") from None


# --- model --------------------------------------------------------------------------------------

def load_model_weights(run_dir: Path, model: torch.nn.Module) -> int:
    """Load a run's weights into ``model``; return the epoch they were saved at.

    The weights are ``model.safetensors``'s, or the committed checkpoint's when that file is stale
    or missing after a kill between the checkpoint's commit and its rewrite (:func:`committed_weights`).
    Raises CheckpointError if the file is missing, corrupt, or does not match
    the model built from ``config.json`` (missing, unexpected or mis-shaped tensors).
    """
    committed = committed_weights(run_dir)
    tensors, meta = committed if committed is not None else load_tensors(Path(run_dir) / MODEL, "checkpoint")
    check_weights(tensors, model, f"{MODEL} in {str(run_dir)!r}")
    model.load_state_dict(tensors)
    try:
        return int(meta.get("epoch", "0"))
    except ValueError:
        return 0


def load_matching_weights(run_dir: Path, model: torch.nn.Module, exclude: set[str] = frozenset()) -> tuple[int, int]:
    """Initialize ``model`` from another run's ``model.safetensors`` (or its committed checkpoint's
    weights when that file is behind it: :func:`committed_weights`), tensor by tensor, matched by name.

    Every tensor of ``model.state_dict()`` (parameters and persistent buffers) whose name is in the
    source file and not in ``exclude`` takes the source's value; tensors only in ``model`` keep their
    initialization (a new regularizer's parameters), tensors only in the source are ignored.  The
    basis of ``--init RUN``: fine-tuning, stacking, clustering on a pretrained encoder.  Returns
    ``(initialized, total)``, the counts of tensors set and of tensors in ``model``.

    Raises CheckpointError if ``run_dir`` or its weights are missing or corrupt, or its ``config.json``
    (when it has one) is refused by :func:`read_run_config`, ConfigError if a
    matched tensor's shape differs (naming it and both shapes) or if no tensor matches at all.
    """
    run_dir = _run_dir(run_dir)
    if (run_dir / CONFIG).is_file():  # a bare weights file has no format to check
        read_run_config(run_dir)
    committed = committed_weights(run_dir)  # model.safetensors behind its checkpoint after a kill
    tensors, _ = committed if committed is not None else load_tensors(run_dir / MODEL, "checkpoint")
    own = model.state_dict()
    matched = [k for k in own if k in tensors and k not in exclude]
    for k in matched:
        if own[k].shape != tensors[k].shape:
            raise ConfigError(f"cannot initialize from {str(run_dir)!r}: {k} has shape {list(tensors[k].shape)} there "
                              f"but {list(own[k].shape)} in this model")
    if not matched:
        theirs = next(iter(tensors), "(none)")
        raise ConfigError(f"cannot initialize from {str(run_dir)!r}: none of its tensors (e.g. {theirs}) has a name "
                          f"in this model (e.g. {next(iter(own), '(none)')})")
    model.load_state_dict({k: tensors[k] for k in matched}, strict=False)
    return len(matched), len(own)


def _run_dir(run_dir) -> Path:
    """``run_dir`` as a Path; CheckpointError if it is missing or not a folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        state = "is a file, not a run directory" if run_dir.exists() else "does not exist"
        raise CheckpointError(f"run directory {str(run_dir)!r} {state}")
    return run_dir


# --- trainer state (to resume) ------------------------------------------------------------------

IMPLEMENTATION_SETTINGS = ("fused", "foreach", "capturable", "differentiable")
"""Optimizer settings that choose how the update is computed, not what it is: a checkpoint's values are
neither checked nor restored (a run saved with the per-tensor Adam resumes with the fused one)."""


def flatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Put an optimizer's state into ``tensors`` (per-parameter tensors) and ``meta`` (JSON)."""
    sd = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    meta[prefix] = json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def unflatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Load the state :func:`flatten_optimizer` wrote under ``prefix`` into ``optimizer``.  Per-parameter
    state tensors (Adam's moments, saved contiguous) get their parameter's strides back: the fused Adam
    walks a parameter and its moments as raw memory, so a channels-last kernel with contiguous moments
    would be updated with another element's moments, silently."""
    info = json.loads(meta[prefix])
    state: dict[int, dict[str, Any]] = {}
    start = prefix + ".state."
    for name, value in tensors.items():
        if name.startswith(start):
            pid, key = name[len(start):].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for name, value in info["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    # JSON turns tuples (Adam's betas) into lists; give them back their type.  How the update is computed
    # (fused, foreach...) is this run's choice, not the checkpoint's: the same update, another kernel
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              | {k: own[k] for k in IMPLEMENTATION_SETTINGS if k in own}
              for g, own in zip(info["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for group in optimizer.param_groups:  # the moments in their parameter's memory layout (see below)
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def rng_states(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random stream a run draws from: the CPU's (``rng.torch``), each initialised CUDA
    device's (``rng.cuda.<i>``: the noise ε and prior draws of a CUDA run) and the run's own
    shuffling/binarization ``generator`` (``rng.generator``)."""
    states = {"rng.torch": torch.get_rng_state(), "rng.generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng.cuda.{i}"] = state
    return states


def set_rng_states(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Restore what :func:`rng_states` saved (CUDA devices that exist here; KeyError if the CPU's is missing)."""
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    for name, state in tensors.items():
        if name.startswith("rng.cuda."):
            index = int(name.rsplit(".", 1)[1])
            if torch.cuda.is_available() and index < torch.cuda.device_count():
                torch.cuda.set_rng_state(state, index)


EXTRA = "extra."  # prefix of the regularizers' training state in trainer_state.safetensors
MODEL_PREFIX = "model."  # prefix of the model's weights in trainer_state.safetensors
CHECKPOINT_FORMAT = "vaekit-checkpoint/1"
"""The ``format`` in ``trainer_state.safetensors``'s metadata: the file is the whole checkpoint (model,
optimizers, RNG streams, position, metrics).  A trainer state without it is from an older vaekit,
whose model and trainer state were two separate files; such a run loads but does not resume."""


@dataclass
class Checkpoint:
    """A committed checkpoint, less the tensors :func:`load_checkpoint` loads in place (model,
    optimizers, RNG streams, gradient scaler).

    :param epoch: epochs completed (0: none, or the pretrained weights).
    :param step: optimizer steps taken in all.
    :param position: batches of epoch ``epoch + 1`` already trained (0: at an epoch's end).
    :param metrics: every ``metrics.jsonl`` record committed so far (pretraining stages and epochs).
    :param sums: running sums of epoch ``epoch + 1``'s train terms (each term times the batch size)
        and ``count`` the samples they cover, so the epoch's train means come out as uninterrupted.
    :param seconds: training time of epoch ``epoch + 1`` so far (for ``samples_per_s``).
    :param epoch_generator: the run generator's state at the start of epoch ``epoch + 1`` (when
        ``position > 0``): the epoch's shuffle and binarization are drawn again from it.
    :param extra: the regularizers' :meth:`~vaekit.interfaces.Regularizer.training_state`, by name.
    """

    epoch: int
    step: int
    position: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    seconds: float = 0.0
    epoch_generator: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the model's, as loaded

    @property
    def history(self) -> list[dict[str, Any]]:
        """The training epochs' records (pretraining stage lines left out)."""
        return [m for m in self.metrics if "stage" not in m]


def has_checkpoint(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a committed checkpoint (``trainer_state.safetensors``, which is only
    ever renamed into place whole); whether it is valid is checked by :func:`load_checkpoint`."""
    return (Path(run_dir) / STATE).is_file()


def save_checkpoint(run_dir: Path, ckpt: Checkpoint, model: torch.nn.Module,
                    optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator, amp=None) -> None:
    """Commit one checkpoint, then bring the files derived from it up to date.

    The commit is one atomic rename of ``trainer_state.safetensors`` (written and fsynced under a
    temporary name) holding the model's weights (``model.*``), optimizers (``optim.*``), every RNG
    stream (:func:`rng_states`), the gradient scaler of ``amp``, the regularizers' ``extra`` state and,
    in its JSON metadata, ``ckpt``'s epoch, step, position, running sums and metrics records.  A kill
    before the rename leaves the previous checkpoint, after it the new one.  Then ``model.safetensors``
    (the weights, metadata ``epoch``/``step``/``position``) and ``metrics.jsonl`` (``ckpt.metrics``) are
    rewritten from it (:func:`sync_run_files`); a kill between leaves them stale, and they are
    rewritten from the checkpoint on resume (:func:`load_run` reads the checkpoint's weights meanwhile).
    Raises OutputError if a file cannot be written (the last committed checkpoint stays).
    """
    tensors: dict[str, torch.Tensor] = rng_states(generator)
    for name, t in model.state_dict().items():
        tensors[MODEL_PREFIX + name] = t
    for name, t in ckpt.extra.items():
        tensors[f"{EXTRA}{name}"] = t.detach().cpu().contiguous()
    if ckpt.position:
        tensors["rng.epoch_generator"] = ckpt.epoch_generator
    meta: dict[str, str] = {"format": CHECKPOINT_FORMAT, "epoch": str(ckpt.epoch), "step": str(ckpt.step),
                            "position": str(ckpt.position), "metrics": json.dumps(ckpt.metrics),
                            "sums": json.dumps({"sums": ckpt.sums, "count": ckpt.count, "seconds": ckpt.seconds})}
    data_shape = getattr(model, "data_shape", None)  # a VAEModel's S, checked by load_run
    if data_shape is not None:
        meta["data_shape"] = json.dumps(list(data_shape))
    if amp is not None:
        meta["scaler"] = json.dumps(amp.state_dict())
    for name, opt in optimizers.items():
        flatten_optimizer(f"optim.{name}", opt, tensors, meta)
    save_tensors(Path(run_dir) / STATE, tensors, meta)
    sync_run_files(run_dir, ckpt, model.state_dict(), metrics=not ckpt.position, data_shape=data_shape)


def sync_run_files(run_dir: Path, ckpt: Checkpoint, weights: dict[str, torch.Tensor], metrics: bool = True,
                   data_shape=None) -> None:
    """Rewrite ``model.safetensors`` from ``weights`` (the checkpoint's, ``[*]`` each) unless it already
    holds the checkpoint's epoch/step/position, and (``metrics``) ``metrics.jsonl`` from ``ckpt.metrics``,
    each atomically.  ``data_shape`` (the model's ``S``) is recorded in the weights' metadata, where
    :func:`load_run` checks ``config.json``'s shape against it.  Raises OutputError if a file cannot be written."""
    run_dir = Path(run_dir)
    if _model_stamp(run_dir) != _stamp(ckpt):
        meta = {"format": "vaekit", **_stamp(ckpt)}
        if data_shape is not None:
            meta["data_shape"] = json.dumps(list(data_shape))
        save_tensors(run_dir / MODEL, weights, meta)
    if metrics:
        write_metrics(run_dir, ckpt.metrics)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (``[]`` without one), up to a line cut by a kill (everything after
    such a line is unreliable)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Write ``metrics.jsonl`` (one JSON record a line) atomically."""
    text = "".join(json.dumps(m) + "\n" for m in records)
    atomic_write(Path(run_dir) / METRICS, lambda tmp: Path(tmp).write_text(text))


def _stamp(ckpt: Checkpoint) -> dict[str, str]:
    return {"epoch": str(ckpt.epoch), "step": str(ckpt.step), "position": str(ckpt.position)}


def _model_stamp(run_dir: Path) -> dict[str, str] | None:
    """The epoch/step/position in ``model.safetensors``'s metadata; None if it is missing or unreadable."""
    try:
        with safe_open(Path(run_dir) / MODEL, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    return {k: meta.get(k) for k in ("epoch", "step", "position")}


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                    generator: torch.Generator, amp=None) -> Checkpoint:
    """Load the committed checkpoint of ``run_dir`` into ``model``, ``optimizers``, the RNG streams,
    ``generator`` and ``amp``'s scaler, check it, and return the rest (:class:`Checkpoint`).

    Raises CheckpointError (one line) if it is missing, corrupt, from an older vaekit (separate model
    and trainer-state files: not resumable), or does not fit this run: a negative or non-integer
    epoch/step/position, metrics whose epochs are not ``1..epoch``, weights or optimizer state whose
    names or shapes differ from the model's parameters, optimizer settings (``lr``, ``betas``…) of
    another type than this run's.  Nothing is modified when it raises before the model is loaded.
    """
    run_dir = Path(run_dir)
    tensors, meta = load_tensors(run_dir / STATE, "trainer state")
    where = f"trainer state {str(run_dir / STATE)!r}"
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where} was written by an older vaekit (model and trainer state in separate files) "
                              "and cannot be resumed; its weights still load for eval, sample and export, or start "
                              "a new run")
    try:
        ckpt = _read_meta(meta, tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{where} is damaged: {_short(e)}") from None
    weights = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    check_weights(weights, model, where)
    try:
        for name, opt in optimizers.items():
            check_optimizer(f"optim.{name}", opt, tensors, meta)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{where} does not match this run: {_short(e)}") from None
    model.load_state_dict(weights)
    try:
        for name, opt in optimizers.items():
            unflatten_optimizer(f"optim.{name}", opt, tensors, meta)
        set_rng_states(tensors, generator)
        if amp is not None:
            amp.load_state_dict(json.loads(meta.get("scaler", "{}")))
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{where} does not match this run ({_short(e)})") from None
    ckpt.extra = {k[len(EXTRA):]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    ckpt.weights = weights
    return ckpt


def _read_meta(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Checkpoint:
    """The :class:`Checkpoint` fields in a checkpoint's metadata, checked (ValueError naming the first bad one)."""
    numbers = {}
    for key in ("epoch", "step", "position"):
        value = json.loads(meta[key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} is {meta[key]}, not a whole number >= 0")
        numbers[key] = value
    metrics = json.loads(meta["metrics"])
    if not isinstance(metrics, list) or not all(isinstance(m, dict) for m in metrics):
        raise ValueError("its metrics are not a list of records")
    epochs = [m.get("epoch") for m in metrics if "stage" not in m]
    if epochs != list(range(1, numbers["epoch"] + 1)):
        raise ValueError(f"it is at epoch {numbers['epoch']} but its metrics hold epochs {epochs[:5]}"
                         f"{'…' if len(epochs) > 5 else ''}")
    running = json.loads(meta["sums"])
    sums, count, seconds = running["sums"], running["count"], running["seconds"]
    if (not isinstance(sums, dict) or not all(isinstance(v, (int, float)) for v in sums.values())
            or isinstance(count, bool) or not isinstance(count, int) or count < 0
            or not isinstance(seconds, (int, float))):
        raise ValueError("its running sums of the epoch are not numbers")
    epoch_generator = tensors.get("rng.epoch_generator")
    if numbers["position"] and epoch_generator is None:
        raise ValueError(f"it is {numbers['position']} batches into an epoch but lacks the epoch's generator state")
    return Checkpoint(**numbers, metrics=metrics, sums=sums, count=count, seconds=float(seconds),
                      epoch_generator=epoch_generator)


def check_weights(weights: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
    """CheckpointError unless ``weights`` has exactly the names and shapes of ``model.state_dict()``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    for k in sorted(set(own) & set(weights)):
        if own[k].shape != weights[k].shape:
            problems.append(f"{k} has shape {list(weights[k].shape)} in the checkpoint but {list(own[k].shape)} in the model")
            break
    if problems:
        raise CheckpointError(f"{where} does not match its {CONFIG}: " + "; ".join(problems))


def check_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """ValueError/TypeError unless the optimizer state :func:`flatten_optimizer` wrote under ``prefix``
    fits ``optimizer``: the same groups of the same sizes, settings of the same types (``lr`` a
    finite number, ``betas`` two numbers, ``amsgrad`` a bool…), and every per-parameter state tensor
    of more than 0 dimensions (Adam's moments) shaped like its parameter."""
    info = json.loads(meta[prefix])
    groups = info["param_groups"]
    own = optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(own):
        raise ValueError(f"{prefix} has {len(groups) if isinstance(groups, list) else 'no'} parameter groups, "
                         f"this run {len(own)}")
    params = {}
    for saved, group in zip(groups, own):
        if not isinstance(saved, dict) or len(saved.get("params", ())) != len(group["params"]):
            raise ValueError(f"{prefix}: a parameter group of another size than this run's")
        for key, value in group.items():
            if key != "params" and key not in IMPLEMENTATION_SETTINGS and key in saved and not _same_kind(saved[key], value):
                raise TypeError(f"{prefix} setting {key} is {saved[key]!r}, not a {type(value).__name__} like "
                                f"this run's {value!r}")
        params.update(zip(saved["params"], group["params"]))
    start = prefix + ".state."
    for name, value in tensors.items():
        if name.startswith(start):
            pid, key = name[len(start):].split(".", 1)
            p = params.get(int(pid))
            if p is None:
                raise ValueError(f"{name} belongs to no parameter of this run")
            if value.dim() > 0 and value.shape != p.shape:
                raise ValueError(f"{name} has shape {list(value.shape)} but its parameter {list(p.shape)}")


def _same_kind(saved: Any, current: Any) -> bool:
    """Whether an optimizer setting read from JSON has the type of this run's value."""
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if current is None:
        return saved is None or isinstance(saved, bool)
    if isinstance(current, (tuple, list)):
        return isinstance(saved, (tuple, list)) and len(saved) == len(current) and \
            all(_same_kind(a, b) for a, b in zip(saved, current))
    if isinstance(current, str):
        return isinstance(saved, str)
    return True


def committed_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The model weights of ``run_dir``'s committed checkpoint when ``model.safetensors`` is stale (a kill
    between the commit and its rewrite): ``(tensors, metadata)``, else None (no checkpoint, one from an
    older vaekit, or a model file that holds the checkpoint's epoch/step/position)."""
    path = Path(run_dir) / STATE
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                return None
            stamp = {k: meta.get(k) for k in ("epoch", "step", "position")}
            if _model_stamp(run_dir) in (stamp, None) and (Path(run_dir) / MODEL).is_file():
                return None  # up to date (or unreadable: reported as corrupt by load_tensors)
            tensors = {k[len(MODEL_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(MODEL_PREFIX)}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    return tensors, {"format": "vaekit", **stamp}


# --- run-dir housekeeping and the kill test hook ------------------------------------------------

RUN_FILES = (CONFIG, MODEL, STATE, METRICS)


def temporary_target(name: str) -> str | None:
    """The file name an :func:`atomic_write` temporary ``.<file>.<random>.tmp`` was written for; None if
    ``name`` is not such a temporary (the random part of :func:`tempfile.mkstemp` holds no dots)."""
    if name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3:
        return name[1:].rsplit(".", 2)[0]
    return None


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporaries a killed write left in ``run_dir`` (``.<file>.<random>.tmp`` of
    :func:`atomic_write`, for the run's files and figures); return them."""
    removed = []
    for path in Path(run_dir).glob(".*.tmp"):
        target = temporary_target(path.name) or ""
        if path.is_file() and (target in RUN_FILES or target.endswith(".png")):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


KILL_ENV = "VAEKIT_TEST_KILL_AT"
_kill_counts: dict[str, int] = {}


def kill_point(label: str, tmp: str | None = None) -> None:
    """Test hook: with ``VAEKIT_TEST_KILL_AT=<label>:<n>`` set, SIGKILL this process the ``n``-th time
    it reaches ``label`` (``step``; ``writing:<file>``, with ``tmp`` cut to half its size first, as a
    kill during the write leaves it; ``wrote:<file>``).  No-op without the variable."""
    spec = os.environ.get(KILL_ENV)
    if not spec or spec.rsplit(":", 1)[0] != label:
        return
    _kill_counts[label] = _kill_counts.get(label, 0) + 1
    if _kill_counts[label] == int(spec.rsplit(":", 1)[1]):
        if tmp is not None:
            os.truncate(tmp, os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)


# --- whole runs ---------------------------------------------------------------------------------

def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run's ``config.json``, checked: the one place every use of a run's weights reads it
    (:func:`load_run`, resuming, ``--init``).  Raises CheckpointError if it is missing, not a vaekit
    run config (not JSON, ``config`` or ``data`` not objects, ``data.shape`` not 1 to 3 positive
    integers), or from a format whose weights now mean something else (:func:`check_run_format`)."""
    run_dir = _run_dir(run_dir)
    info = read_json(run_dir / CONFIG, "run config")
    if not isinstance(info, dict) or "config" not in info or "data" not in info:
        raise CheckpointError(f"{CONFIG} in {str(run_dir)!r} is not a vaekit run config")
    where = f"{CONFIG} in {str(run_dir)!r}"
    for key in ("config", "data"):
        if not isinstance(info[key], dict):
            raise CheckpointError(f"{where}: '{key}' must be an object, got {json.dumps(info[key])[:80]}; "
                                  "restore the file the run wrote")
    shape = info["data"].get("shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 3
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise CheckpointError(f"{where}: data.shape must be a list of 1 to 3 positive integers ([D] or [C, H, W]), "
                              f"got {json.dumps(shape)[:80]}; restore the file the run wrote")
    check_run_format(run_dir, info)
    return info


def check_run_format(run_dir: Path, info: dict[str, Any]) -> None:
    """CheckpointError for a ``vaekit-run/1`` run with a ``sparsity`` regularizer on the code: its
    decoder was trained on raw codes, but the decoder now reads ``sigmoid(z)``, so its weights would
    load with different results; every other run loads as before."""
    if info.get("format") != "vaekit-run/1":
        return
    from .registry import PluginSpec

    config = info["config"] if isinstance(info["config"], dict) else {}
    for spec in config.get("regularizers") or []:
        try:
            spec = PluginSpec.parse(spec)
        except ConfigError:
            continue
        if spec.name == "sparsity" and str(spec.options.get("target", "code")) == "code":
            raise CheckpointError(f"{str(run_dir)!r} was trained when sparse codes were raw (format vaekit-run/1: its "
                                  "decoder read z, it now reads sigmoid(z)), so its weights no longer fit: retrain it")


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", pm=None):
    """Load a trained model from a run directory.

    Returns the :class:`~vaekit.model.VAEModel` in eval mode, with
    ``model.config`` (:class:`~vaekit.config.RunConfig`), ``model.run_info``
    (the whole ``config.json``) and ``model.run_dir`` (the directory it was loaded from).  Raises CheckpointError if the directory,
    config or weights are missing, corrupt or mismatched, or if a weight is NaN or inf.
    """
    from .config import RunConfig
    from .errors import ConfigError, UnknownPluginError
    from .manager import get_plugin_manager
    from .model import build_model

    pm = pm or get_plugin_manager()
    info = read_run_config(Path(run_dir))
    try:
        config = RunConfig.from_dict(info["config"])
        shape = tuple(info["data"]["shape"])
        model = build_model(config, shape, pm, num_classes=info["data"].get("num_classes"))
    except UnknownPluginError as e:
        raise CheckpointError(missing_plugin_message(run_dir, info, e)) from None
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{CONFIG} in {str(run_dir)!r} describes a model that cannot be built: {_short(e)}") from None
    recorded = recorded_data_shape(Path(run_dir))
    if recorded is not None and recorded != list(shape):
        raise CheckpointError(f"{CONFIG} in {str(run_dir)!r} says the data shape is {list(shape)}, but the weights were "
                              f"trained on data of shape {recorded}: restore data.shape in {CONFIG}")
    load_model_weights(Path(run_dir), model)
    bad = next((k for k, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise CheckpointError(f"{MODEL} in {str(run_dir)!r} holds NaN/inf weights ({bad}), so everything computed "
                              "from it would be NaN: retrain the run (e.g. with a lower --lr)")
    model.config = config
    model.run_info = info
    model.run_dir = Path(run_dir)
    return model.to(device).eval()


def recorded_data_shape(run_dir: Path) -> list | None:
    """The data shape ``S`` the weights were trained on, from the metadata of ``model.safetensors`` (else of the
    checkpoint); None for runs written before vaekit recorded it, or when neither file can be read."""
    for name in (MODEL, STATE):
        try:
            with safe_open(str(Path(run_dir) / name), framework="pt") as f:
                raw = (f.metadata() or {}).get("data_shape")
        except (OSError, SafetensorError):
            continue
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None
    return None


def missing_plugin_message(run_dir, info: dict[str, Any], error) -> str:
    """One line for a run whose plugin is not installed here, naming the distribution that
    ``config.json``'s ``plugin_sources`` recorded for it ("install vaekit-vamp==0.1.0")."""
    sources = info.get("plugin_sources", {})
    recorded = sources.get(error.kind)
    if error.kind == "regularizer":
        names = [r.get("name") if isinstance(r, dict) else r for r in info.get("config", {}).get("regularizers", [])]
        listed = sources.get("regularizers", [])
        recorded = next((s for n, s in zip(names, listed) if n == error.name), None)
    where = f"{str(run_dir)!r} was trained with the {error.kind} {error.name!r}"
    if isinstance(recorded, str) and recorded not in ("builtin", ""):
        return f"{where} from {recorded}, which is not installed here: pip install {recorded}"
    return f"{where}, which is not available here ({error})"


def _short(e: BaseException) -> str:
    return first_line(e, 300)
