"""Run directories: ``config.json`` + ``model.safetensors`` (+ ``trainer_state.safetensors`` to resume).

No pickles: tensors go through safetensors, everything else through JSON.
Every file is written to a temporary name and renamed into place, so a kill
never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
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
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {str(path)!r}: {e.strerror or first_line(e)}") from None
        raise


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
    """Save ``tensors`` (detached, contiguous, on the CPU) to a safetensors file atomically."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
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

def save_model(run_dir: Path, model: torch.nn.Module, epoch: int) -> None:
    save_tensors(Path(run_dir) / MODEL, model.state_dict(), {"format": "vaekit", "epoch": str(epoch)})


def load_model_weights(run_dir: Path, model: torch.nn.Module) -> int:
    """Load ``model.safetensors`` into ``model``; return the epoch it was saved at.

    Raises CheckpointError if the file is missing, corrupt, or does not match
    the model built from ``config.json`` (missing, unexpected or mis-shaped tensors).
    """
    path = Path(run_dir) / MODEL
    tensors, meta = load_tensors(path, "checkpoint")
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    for k in sorted(set(own) & set(tensors)):
        if own[k].shape != tensors[k].shape:
            problems.append(f"{k} has shape {list(tensors[k].shape)} in the checkpoint but {list(own[k].shape)} in the model")
            break
    if problems:
        raise CheckpointError(f"{MODEL} in {str(run_dir)!r} does not match its {CONFIG}: " + "; ".join(problems))
    model.load_state_dict(tensors)
    try:
        return int(meta.get("epoch", "0"))
    except ValueError:
        return 0


def load_matching_weights(run_dir: Path, model: torch.nn.Module, exclude: set[str] = frozenset()) -> tuple[int, int]:
    """Initialize ``model`` from another run's ``model.safetensors``, tensor by tensor, matched by name.

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
    tensors, _ = load_tensors(run_dir / MODEL, "checkpoint")
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
    # JSON turns tuples (Adam's betas) into lists; give them back their type
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in info["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


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


def save_trainer_state(run_dir: Path, epoch: int, step: int, optimizers: dict[str, torch.optim.Optimizer],
                       generator: torch.Generator, amp=None, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write optimizers, every RNG stream (:func:`rng_states`), the gradient scaler of ``amp``
    (:class:`~vaekit.precision.MixedPrecision`), the epoch/step reached and ``extra`` tensors (the
    regularizers' :meth:`~vaekit.interfaces.Regularizer.training_state`, by name), atomically."""
    tensors: dict[str, torch.Tensor] = rng_states(generator)
    for name, t in (extra or {}).items():
        tensors[f"{EXTRA}{name}"] = t.detach().cpu().contiguous()
    meta: dict[str, str] = {"epoch": str(epoch), "step": str(step)}
    if amp is not None:
        meta["scaler"] = json.dumps(amp.state_dict())
    for name, opt in optimizers.items():
        flatten_optimizer(f"optim.{name}", opt, tensors, meta)
    save_tensors(Path(run_dir) / STATE, tensors, meta)


def load_trainer_state(run_dir: Path, optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator,
                       amp=None, extra: dict[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """Restore optimizers, RNG states and the gradient scaler; return ``(epoch, step)`` reached.
    ``extra``: a dict filled with the ``extra`` tensors :func:`save_trainer_state` wrote, by name."""
    tensors, meta = load_tensors(Path(run_dir) / STATE, "trainer state")
    if extra is not None:
        extra.update({k[len(EXTRA):]: v for k, v in tensors.items() if k.startswith(EXTRA)})
    try:
        for name, opt in optimizers.items():
            unflatten_optimizer(f"optim.{name}", opt, tensors, meta)
        set_rng_states(tensors, generator)
        if amp is not None:
            amp.load_state_dict(json.loads(meta.get("scaler", "{}")))
        return int(meta["epoch"]), int(meta["step"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"trainer state in {str(run_dir)!r} does not match this run ({_short(e)})") from None


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
    load_model_weights(Path(run_dir), model)
    bad = next((k for k, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise CheckpointError(f"{MODEL} in {str(run_dir)!r} holds NaN/inf weights ({bad}), so everything computed "
                              "from it would be NaN: retrain the run (e.g. with a lower --lr)")
    model.config = config
    model.run_info = info
    model.run_dir = Path(run_dir)
    return model.to(device).eval()


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
