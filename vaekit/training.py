"""The training pipeline: compose plugins, train with Adam, evaluate each epoch, checkpoint, plot."""

from __future__ import annotations

import errno
import math
import platform
import sys

import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import __version__, checkpoint, distributed, malloc, rundir
from .compiling import StepFunctions
from .config import RunConfig
from .data import DataBundle, binarize, binarize_samples, looks_like_path
from .errors import (CheckpointError, ConfigError, DataError, OutputError, TrainingError, UnknownPluginError,
                     first_line, is_out_of_memory)
from .evaluation import density_for, elbo_summary
from .interfaces import Objective
from .manager import PluginManager, get_plugin_manager
from .model import VAEModel, build_model, decoder_spec
from .ops.philox import bernoulli_philox, draw_seeds
from .precision import MixedPrecision
from .registry import PluginSpec
from .running import SYNC_EVERY, RunningTerms
from .samples import ArraySamples, Samples, load_batches, to_device

TEST_BINARIZE_SEED = 1234  # the test set is binarized once, identically for every run
_WRITE_ERRNOS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG")
                 if hasattr(errno, name)}  # a run directory that cannot be written: full, read-only


def eval_inputs(test_x: torch.Tensor | Samples, binarize_mode: str) -> torch.Tensor | Samples:
    """The test set a run is evaluated on: ``test_x``, binarized with the fixed
    :data:`TEST_BINARIZE_SEED` unless ``binarize_mode`` is ``none`` (training and ``vaekit eval`` alike).

    ``test_x``: float32 ``[N, *S]`` (binarized as float32 0/1) or :class:`~vaekit.samples.Samples`
    (binarized in chunks and held as packed bits, :func:`~vaekit.data.binarize_samples`: the same draws,
    so the same test set, without a float32 copy of it)."""
    if binarize_mode == "none":
        return test_x
    generator = torch.Generator().manual_seed(TEST_BINARIZE_SEED)
    if isinstance(test_x, Samples):
        return binarize_samples(test_x, generator)
    return binarize(test_x, generator)


def check_inputs(likelihood, x: torch.Tensor, binarize_mode: str, what: str) -> None:
    """Raise DataError/ConfigError (one line) unless ``x [N, *S]`` is in the likelihood's support
    (:meth:`~vaekit.interfaces.Likelihood.check_data`) and, when it is binarized (``binarize_mode``
    not ``none``), in [0, 1].  Used for training data and for any data a run is applied to."""
    likelihood.check_data(x, what)
    if binarize_mode != "none" and len(x) and (x.min() < 0 or x.max() > 1):
        raise ConfigError(f"binarization needs data in [0, 1], but {what} spans [{float(x.min()):.3g}, "
                          f"{float(x.max()):.3g}]; use --binarize none (for a run: train it with --binarize none)")


def resolve_data_spec(spec: PluginSpec, pm: PluginManager) -> PluginSpec:
    """``--data PATH`` is short for ``--data file:path=PATH``."""
    if spec.name not in pm.datasets and looks_like_path(spec.name):
        return PluginSpec("file", {"path": spec.name, **spec.options})
    return spec


def load_data(spec: PluginSpec | str, pm: PluginManager | None = None) -> DataBundle:
    """The :class:`~vaekit.data.DataBundle` a ``--data`` value names (``"mnist"``,
    ``"mnist:train_per_class=30"``, a path, a :class:`PluginSpec`), as ``vaekit run`` loads it.

    ``pm``: plugin manager (default: the process-wide one, entry points included).  Raises
    UnknownPluginError/ConfigError/DataError for unknown datasets, bad options or bad data.
    """
    pm = pm or get_plugin_manager()
    spec = resolve_data_spec(PluginSpec.parse(spec) if not isinstance(spec, PluginSpec) else spec, pm)
    bundle = pm.datasets.build(spec)
    if not isinstance(bundle, DataBundle):
        raise ConfigError(f"dataset {spec.name!r} returned a {type(bundle).__name__}, not a vaekit DataBundle")
    return bundle.validate()


def build_objective(config: RunConfig, model: VAEModel, pm: PluginManager) -> Objective:
    """The run's training objective (``config.objective``), built with the run's config and bound to
    ``model``.  Raises UnknownPluginError for an unknown name, ConfigError for bad options or an
    objective that cannot train this model (``iwae`` on prior ``none``)."""
    spec = config.objective
    objective = pm.objectives.build(spec, config=config)
    if not isinstance(objective, Objective):
        raise ConfigError(f"objective {spec.name!r} built a {type(objective).__name__}, not a vaekit Objective")
    objective.bind(model)
    return objective


def adam(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """The run's Adam (Kingma & Ba 2015) over ``params``: the fused kernel on the CPU and CUDA (one pass over
    all parameters a step, instead of one op per tensor and formula term; the same update up to float
    rounding), the default implementation elsewhere."""
    fused = device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float64) for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but this PyTorch build sees no CUDA device")
    return torch.device(name)


@dataclass
class TrainResult:
    """What :func:`train` returns: the run directory, the trained model and the per-epoch metrics."""

    run_dir: Path
    model: VAEModel
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


class Trainer:
    """Runs one training job described by a :class:`RunConfig`.

    :param config: the run's configuration.
    :param pm: plugin manager (default: the process-wide one).
    :param resume: continue the run in ``config.out`` from its last checkpoint.
    :param progress: show a rich progress bar.
    :param quiet: print nothing (implies no progress bar).
    :param figures: write the PNG figures at the end.
    :param overwrite: a new run may replace a run with a checkpoint in ``config.out``: vaekit's own run
        files there are deleted first (:func:`vaekit.rundir.remove_run_files`; other files stay).
    """

    def __init__(self, config: RunConfig, pm: PluginManager | None = None, *, resume: bool = False,
                 progress: bool = True, quiet: bool = False, figures: bool = True, overwrite: bool = False) -> None:
        from rich.console import Console

        self.config = config
        self.pm = pm or get_plugin_manager()
        self.resume = resume
        main_rank = distributed.env_rank() == 0  # under torchrun, rank 0 alone prints (vaekit.distributed)
        self.show_progress = progress and not quiet and main_rank
        self.quiet = quiet
        self.figures = figures
        self.console = Console(stderr=True, quiet=quiet or not main_rank)
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.checkpointed: int | None = None  # the epoch of the last checkpoint written or restored
        self.checkpointed_position = 0  # and the batches of the next epoch it had trained
        self.metrics_log: list[dict[str, Any]] = []  # metrics.jsonl's records: pretraining stages and epochs
        self._resume_at: checkpoint.Checkpoint | None = None  # a checkpoint taken mid-epoch, to continue from
        self.stop_reason: str | None = None  # set by request_stop: the run ends after the current step
        self.restart_note: str | None = None  # printed once the run directory is locked (resume of a run never checkpointed)
        self.overwrite = overwrite
        self.epochs_given = False  # resume(epochs=N): N is a new target, refused if below the epochs done
        self.max_steps_given = False  # resume(max_steps=N): likewise, against the steps done
        self.lock: rundir.RunDirLock | None = None  # held from _prepare_run_dir to the end of fit
        self.dist: distributed.Single | None = None  # the processes this run trains on (set up in setup)

    # --- set-up -------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        self.device = resolve_device(cfg.device)
        self.dist = distributed.connect(self.device)  # one process, or a rank under torchrun (vaekit.distributed)
        self.device = self.dist.device  # cuda:LOCAL_RANK under torchrun
        if self.device.type == "cpu":
            malloc.keep_freed_memory()  # each step's activations reuse the last step's pages (vaekit.malloc)
        self.dist.agree(self._build)  # every rank builds the same; an error on one stops all, rank 0 reports it
        self.dist.seed_streams(cfg.seed)  # each rank's own noise stream (rank 0's is the one-process one)
        self.run_dir = self.dist.on_main(self._open_run_dir)  # under torchrun rank 0 alone writes the run directory
        if not self.dist.is_main:
            self.config = self.config.replace(out=str(self.run_dir))  # the name rank 0 chose
        self.start_epoch = 1
        if self.resume:
            self.dist.agree(self._restore)  # every rank loads the checkpoint; a failure on one stops all
            self.dist.agree(self._record_epochs)
        own = {id(p) for name, opt in self.optimizers.items() if name != "model" for g in opt.param_groups for p in g["params"]}
        self.forward_step = self.dist.wrap_step(self.model, self._forward_step, own)  # DistributedDataParallel

    def _build(self) -> None:
        """Load the data, build the model, objective and optimizers (every rank alike, nothing written)."""
        cfg = self.config
        self.data = load_data(cfg.data, self.pm)
        self.dist.check_batches(len(self.data.train), cfg.batch_size)
        if cfg.pretrain is not None and self.dist.world_size > 1 and not self.resume:
            raise ConfigError("--pretrain runs in one process: pretrain with vaekit run --pretrain ..., then train under "
                              "torchrun with --init RUN")
        self.amp = MixedPrecision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.model = build_model(cfg, self.data.shape, self.pm, num_classes=self.data.num_classes).to(self.device)
        self.objective = build_objective(cfg, self.model, self.pm)
        self.steps = StepFunctions(self.objective, self.model, cfg.compile)  # --compile: the forward compiled
        self.dist.check_regularizers(self.model.regularizers)  # under torchrun: refuses supports_distributed False
        lik = self.model.likelihood
        self.binarize = lik.default_binarize if cfg.binarize == "auto" else cfg.binarize
        check_inputs(lik, self.data.train.extremes(), self.binarize, "the training data")  # per-pixel min and max
        check_inputs(lik, self.data.test.extremes(), self.binarize, "the test data")  # per-pixel min and max
        # the evaluation inputs, held in their source dtype (binarized: packed bits, 1 bit a value) and read as float32 a batch at a time
        self.test: Samples = eval_inputs(self.data.test, self.binarize)
        if isinstance(self.test, ArraySamples):
            self.test = self.test.to(self.device)
        self.test_normalized = density_for(lik, self.test)  # names the test metrics: once, on the whole split
        self.train: Samples = self.data.train  # read batch by batch (indexed_batches)
        if self.binarize == "static":
            if not self.train.in_memory:
                raise ConfigError(f"--binarize static draws the whole training set once, but {self.data.name} is "
                                  f"{self.train.describe()}; use --binarize dynamic, or load it with lazy=false")
            self.train = binarize_samples(self.train, torch.Generator().manual_seed(cfg.seed))  # 0/1, held as packed bits
        if isinstance(self.train, ArraySamples):
            self.train = self.train.to(self.device)
        self.train_y = None if self.data.train_y is None else self.data.train_y.to(self.device)
        self.test_y = None if self.data.test_y is None else self.data.test_y.to(self.device)
        self.pretraining = None
        if not self.resume:  # a resumed run's checkpoint holds its weights: no --init, no pretraining again
            self._starting_weights()
        self._warm_up()
        self.optimizers = self._make_optimizers()

    def _open_run_dir(self) -> Path:
        """Create and lock the run directory (:meth:`_prepare_run_dir`), delete a killed write's temporaries and,
        for a new run, write ``config.json``.  Under torchrun on rank 0 alone."""
        run_dir = self.run_dir = self._prepare_run_dir()
        if self.restart_note:
            self.console.print(self.restart_note)
        checkpoint.remove_temporaries(run_dir)  # left by a kill during a write
        if not self.resume:
            checkpoint.write_json(run_dir / checkpoint.CONFIG, {**self._run_info(), **self.dist.describe()})
        return run_dir

    def _starting_weights(self) -> None:
        """``--init RUN``: load RUN's weights matched by name (the likelihood's buffers, its fixed
        settings such as the Gaussian's σ, stay this run's own); ``--pretrain``: check the model can
        be pretrained and build the stages (they run in :meth:`fit`).  Both before the run directory
        is written, so a bad choice leaves nothing behind."""
        cfg = self.config
        if cfg.init is not None:
            own = {f"likelihood.{name}" for name, _ in self.model.likelihood.named_buffers()}
            n, total = checkpoint.load_matching_weights(Path(cfg.init), self.model, exclude=own)
            self.console.print(f"initialized {n} of {total} tensors from {cfg.init}")
        if cfg.pretrain is not None:
            from .pretrain import build_pretraining

            self.pretraining = build_pretraining(cfg.pretrain)
            self.pretraining.prepare(self.model, self.first_samples(8))

    @torch.no_grad()
    def _warm_up(self) -> None:
        """One forward pass on two samples before any timing: builds lazily compiled kernels (the fused
        op's C++ kernel on first use, Triton's on CUDA) without touching the RNG streams (CPU and
        the training device's) or normalisation statistics."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.amp.autocast():
            self.model.eval()
            self.model(self.first_samples(2), None if self.train_y is None else self.train_y[:2])
            self.model.train()

    @property
    def test_x(self) -> torch.Tensor:
        """The evaluation inputs (the test split, binarized with :data:`TEST_BINARIZE_SEED` if the run
        binarizes), float32 ``[N, *S]`` on the device, converted on each access; the run holds them as
        ``trainer.test`` (:class:`~vaekit.samples.Samples`, read by rows: ``trainer.test[i:j]``)."""
        return self.test.tensor().to(self.device)

    @property
    def train_x(self) -> torch.Tensor:
        """Every training sample as trained on (statically binarized if the run is), float32 ``[N, *S]``
        on the device, converted on each access.  Raises DataError for training data read from disk
        batch by batch: read it with ``trainer.train.batch(index)`` (:class:`~vaekit.samples.Samples`)."""
        if not self.train.in_memory:
            raise DataError(f"the training data of {self.data.name} is {self.train.describe()}, not held in memory; "
                            "read it by batches (trainer.train.batch(index)) or load it with lazy=false")
        return self.train.tensor().to(self.device)

    def first_samples(self, n: int) -> torch.Tensor:
        """The first ``n`` training samples (fewer if there are fewer), float32 ``[n, *S]`` on the device."""
        return self.train.batch(torch.arange(min(n, len(self.train)))).to(self.device)

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        own: dict[str, torch.optim.Optimizer] = {}
        own_params: set[int] = set()
        for i, reg in enumerate(self.model.regularizers):
            opt = reg.configure_optimizer()
            if opt is not None:
                own[f"regularizer{i}"] = opt
                own_params |= {id(p) for g in opt.param_groups for p in g["params"]}
        main = [p for p in self.model.parameters() if id(p) not in own_params and p.requires_grad]
        return {"model": adam(main, self.config.lr, self.device), **own}

    def _prepare_run_dir(self) -> Path:
        """Create the run directory and lock it (:mod:`vaekit.rundir`) before anything is written there.
        A new run refuses a non-empty folder that is not a vaekit run, and a run holding a checkpoint or
        weights unless ``overwrite``; it deletes vaekit's own files of a run that never checkpointed
        (or, with ``overwrite``, of any run).  Raises ConfigError, or RunDirLocked (another process
        is writing the directory)."""
        cfg = self.config
        if cfg.out is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            base = Path("runs") / f"{stamp}-{cfg.encoder.name}-{cfg.prior.name}"
            run_dir, n = base, 1
            while run_dir.exists():
                n += 1
                run_dir = base.with_name(f"{base.name}-{n}")
            self.config = cfg = cfg.replace(out=str(run_dir))
        run_dir = Path(cfg.out)
        if not self.resume:
            rundir.check_out_folder(run_dir)  # before anything is written: not someone else's folder
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create run directory {str(run_dir)!r}: {e.strerror}") from None
        self.lock = rundir.lock_run_dir(run_dir)
        if not self.resume:
            if rundir.holds_weights(run_dir) and not self.overwrite:
                self._unlock()
                raise ConfigError(f"{str(run_dir)!r} already holds a run; resume it with --resume {run_dir}, "
                                  "replace it with --overwrite, or choose another --out")
            rundir.remove_run_files(run_dir)  # a run that never checkpointed, or --overwrite: start afresh
        return run_dir

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _run_info(self) -> dict[str, Any]:
        cfg = self.config
        reg = self.pm.registries
        data_spec = resolve_data_spec(cfg.data, self.pm)
        dec = decoder_spec(cfg, self.pm)
        data_options = reg["dataset"].resolve_options(data_spec)
        if isinstance(data_options.get("path"), str) and data_options["path"]:
            data_options["path"] = str(Path(data_options["path"]).expanduser().resolve())  # usable from any cwd
        pretrain = None
        if cfg.pretrain is not None:
            from .pretrain import PRETRAINING

            pretrain = PluginSpec(cfg.pretrain.name, PRETRAINING.resolve_options(cfg.pretrain))
        resolved = cfg.replace(
            init=None if cfg.init is None else str(Path(cfg.init).expanduser().resolve()),  # usable from any cwd
            pretrain=pretrain,
            data=PluginSpec(data_spec.name, data_options),
            encoder=PluginSpec(cfg.encoder.name, reg["encoder"].resolve_options(cfg.encoder)),
            decoder=PluginSpec(dec.name, reg["decoder"].resolve_options(dec)),
            prior=PluginSpec(cfg.prior.name, reg["prior"].resolve_options(cfg.prior)),
            likelihood=PluginSpec(cfg.likelihood.name, reg["likelihood"].resolve_options(cfg.likelihood)),
            regularizers=[PluginSpec(r.name, reg["regularizer"].resolve_options(r)) for r in cfg.regularizers],
            objective=PluginSpec(cfg.objective.name,
                                 self.objective.recorded_options(reg["objective"].resolve_options(cfg.objective))),
            binarize=self.binarize,
        )
        sources = {kind: reg[kind].get(spec.name).source for kind, spec in
                   (("dataset", resolved.data), ("encoder", resolved.encoder), ("decoder", resolved.decoder),
                    ("prior", resolved.prior), ("likelihood", resolved.likelihood), ("objective", resolved.objective))}
        sources["regularizers"] = [reg["regularizer"].get(r.name).source for r in resolved.regularizers]
        return {
            "format": checkpoint.RUN_FORMAT,
            "created": datetime.now().isoformat(timespec="seconds"),
            "config": resolved.to_dict(),
            "data": {"name": self.data.name, "shape": list(self.data.shape), "n_train": len(self.data.train),
                     "n_test": len(self.data.test), "num_classes": self.data.num_classes,
                     "scaling": self.data.scaling},
            "plugin_sources": sources,
            "device": str(self.device),
            "versions": {"vaekit": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }

    def _restore(self) -> None:
        """Load the committed checkpoint (:func:`~vaekit.checkpoint.load_checkpoint`, which checks it), check
        its step against this run's steps per epoch, and rewrite ``model.safetensors`` and
        ``metrics.jsonl`` from it (a kill may have left them behind the commit).  A checkpoint taken
        mid-epoch (``--checkpoint-every``) continues at its batch (:meth:`_train_epoch`)."""
        ckpt = checkpoint.load_checkpoint(self.run_dir, self.model, self.optimizers, self.generator, self.amp)
        steps_per_epoch = math.ceil(len(self.train) / self.config.batch_size)
        history = ckpt.history
        stopped = history[-1].get("stopped") if history else None
        if ckpt.position >= steps_per_epoch or (not stopped and ckpt.step != ckpt.epoch * steps_per_epoch + ckpt.position):
            raise CheckpointError(f"trainer state in {str(self.run_dir)!r} is damaged or not of this run: step {ckpt.step} "
                                  f"does not follow from epoch {ckpt.epoch} and {ckpt.position} batches of the next at "
                                  f"{steps_per_epoch} steps an epoch")
        for i, reg in enumerate(self.model.regularizers):
            prefix = f"regularizer{i}."
            own = {k[len(prefix):]: v for k, v in ckpt.extra.items() if k.startswith(prefix)}
            if own:
                reg.load_training_state(own)
        self.step = ckpt.step
        self.start_epoch = ckpt.epoch + 1
        self.checkpointed, self.checkpointed_position = ckpt.epoch, ckpt.position
        self.metrics_log = ckpt.metrics
        self.history = history
        self._resume_at = ckpt if ckpt.position else None
        self.dist.restore_rng(ckpt.extra, self.config.seed, ckpt.step)  # each rank's own noise stream
        if self.dist.is_main:
            checkpoint.sync_run_files(self.run_dir, ckpt, ckpt.weights, data_shape=self.model.data_shape)
        if stopped:  # a run a plugin stopped early has converged: resuming it trains nothing
            self.stop_reason = stopped
            self.start_epoch = self.config.epochs + 1
            self.console.print(f"this run stopped early at epoch {ckpt.epoch} ({stopped}); nothing to resume")

    def _record_epochs(self) -> None:
        """On resume, after :meth:`_restore`: refuse a new ``--epochs`` below the epochs done, or a new
        ``--max-steps`` below the steps done (ConfigError), record the targets in ``config.json`` (a
        later plain ``--resume`` continues to them), and say so when there is nothing left to train."""
        done, epochs, max_steps = max(self.checkpointed or 0, 0), self.config.epochs, self.config.max_steps
        started = done + 1 if self.checkpointed_position else done  # a mid-epoch checkpoint is into epoch done + 1
        if self.epochs_given and epochs < started:
            part, least = (f" and part of epoch {started}", f">= {started}") if started > done else ("", f"> {done}")
            raise ConfigError(f"{str(self.run_dir)!r} has already trained {done} epochs{part}, so --epochs {epochs} would "
                              f"undo them; pass --epochs N with N {least} to continue it")
        if self.max_steps_given and max_steps and max_steps < self.step:
            raise ConfigError(f"{str(self.run_dir)!r} has already taken {self.step} optimizer steps, so --max-steps "
                              f"{max_steps} would undo them; pass --max-steps N with N > {self.step} (0: no limit)")
        if self.stop_reason is not None:
            return  # a run a plugin stopped early: nothing to record (_restore said so)
        info = checkpoint.read_run_config(self.run_dir)
        changed = info["config"].get("epochs") != epochs or info["config"].get("max_steps", 0) != max_steps
        if changed and self.dist.is_main:
            info["config"]["epochs"], info["config"]["max_steps"] = epochs, max_steps
            checkpoint.write_json(self.run_dir / checkpoint.CONFIG, info)
        if done >= epochs:
            self.console.print(f"{self.run_dir} has trained all its {epochs} epochs: nothing to train; "
                               f"pass --epochs N (> {done}) to continue")
        elif max_steps and self.step >= max_steps:
            self.console.print(f"{self.run_dir} has taken all its {max_steps} steps (--max-steps): nothing to train; "
                               f"pass --max-steps N (> {self.step}, or 0 for no limit) to continue")

    def request_stop(self, reason: str) -> None:
        """End the run early, cleanly: training stops after the current step, the epoch is evaluated,
        checkpointed and logged with ``"stopped": reason`` in its ``metrics.jsonl`` record, and
        ``reason`` is printed.  For a plugin's convergence test (DEC's tolerance on changed
        assignments), from :meth:`~vaekit.interfaces.Regularizer.on_step_end` or a hook.  Resuming a
        stopped run trains nothing (it says so).  The first reason given is kept."""
        if self.stop_reason is None:
            self.stop_reason = str(reason)

    # --- the loop -----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Set up, train and write the figures; the run directory stays locked throughout (:mod:`vaekit.rundir`)."""
        finished = False
        try:
            result = self._fit()
            finished = True
            return result
        finally:
            self._unlock()
            if self.dist is not None:
                self.dist.close(finished)  # under torchrun: leave the process group

    def _fit(self) -> TrainResult:
        self.setup()
        cfg = self.config
        n = len(self.train)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.console.print(
            f"[bold]vaekit[/] {cfg.encoder.name}/{cfg.prior.name}/{cfg.likelihood.name} on {self.data.name} "
            f"{list(self.data.shape)} ({n} train, {len(self.test)} test), latent {cfg.latent_dim}, "
            f"{self.device}, run dir {self.run_dir}, pixels {self.data.scaling}, training data {self.train.describe()}"
        )
        try:
            if self.pretraining is not None:  # before the fit-start hooks: they see the pretrained model
                self.pretraining.run(self)
                self._checkpoint(0)  # "epoch 0": a resumed run starts fine-tuning from the pretrained weights
            self.pm.hook.vaekit_fit_start(trainer=self)
            for reg in self.model.regularizers:
                reg.on_fit_start(self)
            self._epochs(n, steps_per_epoch)
        except KeyboardInterrupt:
            if self.dist.is_main:
                print(f"interrupted: {self._kept()}", file=sys.stderr, flush=True)  # also under -q
            raise
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError too
            if not is_out_of_memory(e):
                raise
            raise TrainingError(f"out of memory at step {self.step + 1} ({first_line(e, 120)}); {self._kept()}. "
                                "A resume needs the same memory: start it again smaller with vaekit run ... "
                                f"--out {self.run_dir} --overwrite and a lower --batch-size (or the samples k of "
                                "an objective such as iwae:k)") from None
        except OSError as e:  # a checkpoint or metrics line that cannot be written: a full disk, a read-only folder
            if not isinstance(e, OutputError) and e.errno not in _WRITE_ERRNOS:
                raise
            what = str(e) if isinstance(e, OutputError) else f"cannot write in {str(self.run_dir)!r}: {e.strerror}"
            raise OutputError(f"{what}; {self._kept()}") from None
        if self.figures and self.dist.is_main:
            from . import viz

            viz.write_run_figures(self.run_dir, self.model, self.data, self.test, self.history,
                                  warn=lambda message: print(message, file=sys.stderr, flush=True))  # also under -q
        last = self.history[-1] if self.history else {}
        self.pm.hook.vaekit_fit_end(trainer=self, metrics=last)
        return TrainResult(self.run_dir, self.model, self.history)

    def _epochs(self, n: int, steps_per_epoch: int) -> None:
        cfg = self.config
        with self.progress(steps_per_epoch, cfg.epochs, self.start_epoch) as bar:
            for epoch in range(self.start_epoch, cfg.epochs + 1):
                if self.stop_reason is not None:
                    break
                if cfg.max_steps and self.step >= cfg.max_steps:
                    break  # a resumed run already at its --max-steps (_record_epochs said so)
                schedule = self.objective.set_epoch(epoch)  # e.g. the β in effect: a function of the epoch alone
                compiled_before = self.steps.seconds
                trained = self._train_epoch(epoch, bar)
                if trained is None:  # --max-steps reached mid-epoch: checkpointed there
                    break
                train_means, seconds = trained
                record = {"epoch": epoch, "step": self.step, **schedule, **{f"train_{k}": v for k, v in train_means.items()}}
                record.update(self._test_metrics())
                record["samples_per_s"] = n / seconds if seconds > 0 else float("nan")
                record["epoch_seconds"] = seconds
                if self.steps.seconds > compiled_before:  # part of epoch_seconds: the first steps compiled
                    record["compile_seconds"] = self.steps.seconds - compiled_before
                self.pm.hook.vaekit_epoch_end(trainer=self, epoch=epoch, metrics=record)
                for reg in self.model.regularizers:
                    reg.on_epoch_end(self, epoch)
                self.stop_reason = self.dist.agree_stop(self.stop_reason)  # a hook's stop on one rank stops every rank
                if self.stop_reason is not None:  # after the hooks: a stop they request is committed too
                    record["stopped"] = self.stop_reason
                self._checkpoint(epoch, record)  # the record is committed with the epoch's checkpoint
                self.console.print(_epoch_line(record, cfg.epochs, schedule))
                if self.stop_reason is not None:
                    self.console.print(f"stopped early at epoch {epoch}/{cfg.epochs}: {self.stop_reason}")
                elif cfg.max_steps and self.step >= cfg.max_steps and epoch < cfg.epochs:
                    self.console.print(f"stopped at step {self.step} (--max-steps {cfg.max_steps}) after epoch {epoch}; "
                                       f"vaekit run --resume {self.run_dir} --max-steps N continues it")
                    break

    def log_stage(self, record: dict[str, Any], line: str) -> None:
        """Add ``record`` to ``metrics.jsonl`` (rewritten atomically) and print ``line``: a pretraining
        stage's epoch.  The record becomes part of the next checkpoint; a training epoch's record is
        committed with its checkpoint instead (:meth:`_checkpoint`)."""
        self.metrics_log.append(record)
        checkpoint.write_metrics(self.run_dir, self.metrics_log)
        self.console.print(line)

    def batches(self):
        """One epoch's mini-batches ``(x [B, *S], c [B] or None)`` on the device: a shuffle, then a fresh
        dynamic binarization (if the run uses one), both drawn from the run's seeded generator."""
        for _, x, c in self.indexed_batches():
            yield x, c

    def indexed_batches(self, start: int = 0):
        """:meth:`batches` with each batch's positions in the training set: ``(index [B] int64, x, c)``
        (``x = train_x[index]`` before any binarization); the training step puts ``index`` in its
        :class:`~vaekit.interfaces.StepOutput`.

        The epoch's permutation is drawn from the run's generator when this is called; the batches
        are read from the training :class:`~vaekit.samples.Samples` in its order
        (:func:`~vaekit.samples.load_batches`, ``config.workers`` processes).  A dynamic binarization
        draws one seed per batch of the epoch from the generator right after the permutation (one read
        of a host tensor) and binarizes each batch as it is taken with
        :func:`~vaekit.ops.philox.bernoulli_philox` (Philox4x32-10 keyed by its seed).  ``start``: begin
        at the epoch's batch ``start`` (a resumed epoch; the batches before it are neither read nor
        binarized, their seeds are drawn all the same)."""
        perm = torch.randperm(len(self.train), generator=self.generator)
        size = self.config.batch_size
        index_batches = [perm[b0:b0 + size] for b0 in range(start * size, len(perm), size)]
        seeds = None
        if self.binarize == "dynamic":  # every batch's seed, the resumed epoch's batches before `start` included
            seeds = draw_seeds(self.generator, math.ceil(len(perm) / size))[start:]
        return self._read_batches(index_batches, seeds)

    def _read_batches(self, index_batches: list[torch.Tensor], seeds: list[int] | None = None):
        """The batches of ``index_batches`` (global batches of positions), read and binarized with ``seeds``
        (one per batch; None: not binarized).  Under torchrun
        each rank reads only its contiguous share of every global batch (:meth:`Distributed.share
        <vaekit.distributed.Distributed.share>`) and binarizes it with the global batch's seed at its rows'
        offset in the batch (:func:`~vaekit.ops.philox.bernoulli_philox`: a draw depends on the seed and the
        element's index alone), so N processes see exactly the batches one process would."""
        shares = [self.dist.share(len(index)) for index in index_batches]  # RANK SLICE: (0, B) in one process
        local = [index[lo:hi] for index, (lo, hi) in zip(index_batches, shares)]
        loaded = load_batches(self.train, local, self.config.workers, pin_memory=self.device.type == "cuda")
        device = self.device  # to a GPU: pinned, non-blocking copies (samples.to_device)
        pixels = math.prod(self.train.shape)
        for b, (index, (lo, hi), x) in enumerate(zip(index_batches, shares, loaded)):
            self.dist.begin_batch(len(index), hi - lo)
            if seeds is not None:  # dynamic binarization: the global batch's seed at this rank's rows
                x = bernoulli_philox(x, seeds[b], lo * pixels)  # where x is
            x, index = to_device(x, device), to_device(index[lo:hi], device)
            yield index, x, None if self.train_y is None else self.train_y[index]

    def _train_epoch(self, epoch: int, bar) -> tuple[dict[str, float], float] | None:
        """Train one epoch; return its train means (each term averaged over the samples) and seconds.
        Every ``checkpoint_every`` steps (but the epoch's last) the run is checkpointed mid-epoch with the
        generator's state at the epoch's start, the batches done and the running sums; a run resumed
        from such a checkpoint draws the epoch's shuffle again and continues at the next batch.  When
        the run reaches ``max_steps`` before the epoch's last batch it is checkpointed there the same
        way and None is returned (the epoch is not over).  Under torchrun each rank trains on its share
        of every global batch (:meth:`_read_batches`).  Nothing is read back from the device between two
        reads of the running terms (:class:`~vaekit.running.RunningTerms`: every
        :data:`~vaekit.running.SYNC_EVERY` steps, before a checkpoint, at a stop and at the epoch's end),
        where the progress bar moves and a NaN/inf loss raises, naming its step."""
        model = self.model
        model.train()
        resume, self._resume_at = self._resume_at, None
        now = self.generator.get_state()
        if resume is not None:
            self.generator.set_state(resume.epoch_generator)
        epoch_generator = self.generator.get_state()
        batches = self.indexed_batches(start=0 if resume is None else resume.position)  # draws the epoch's shuffle
        running = RunningTerms(self.dist)
        position = 0
        before = 0.0
        if resume is not None:
            self.generator.set_state(now)
            running = RunningTerms(self.dist, resume.sums, resume.count)
            position, before = resume.position, resume.seconds
        steps_per_epoch = math.ceil(len(self.train) / self.config.batch_size)
        every, limit = self.config.checkpoint_every, self.config.max_steps
        main_opt = self.optimizers["model"]
        failed = partial(self._loss_failed, epoch)
        start = time.perf_counter()
        batches = iter(batches)
        while True:
            try:  # a rank's own read failure (a file it cannot decode) stops every rank before the step
                index, x, c = next(batches)
                failure = None
            except StopIteration:  # every rank has as many batches
                break
            except Exception as e:  # noqa: BLE001 - settled with the other ranks, then raised
                failure = e
            self.dist.settle(failure)  # under torchrun: PeerError "rank R of W failed: ..." on the others
            compiling = self.steps.timing(x)  # the first step on a new batch shape compiles (--compile)
            with self.steps.errors():  # --compile: a compiler failure is one line
                record, loss, terms, extra = self.forward_step(x, c, index)
                self.step += 1
                running.add(self.step, loss, terms, extra, x.shape[0])  # no host sync: read every SYNC_EVERY steps
                main_opt.zero_grad(set_to_none=True)
                scale = self.dist.loss_scale()  # DDP averages the ranks' gradients: this makes it the global batch's
                self.amp.step(loss if scale == 1 else loss * scale, main_opt)
            if compiling is not None:
                self.console.print(f"torch.compile ({self.config.compile}): the first step on batches of "
                                   f"{list(x.shape)} took {self.steps.compiled_in(compiling, self.device):.1f} s (compiling)")
            for reg in model.regularizers:
                reg.on_step_end(self, record)
            del record, loss, terms, extra, x, c, index  # freed before the next step's forward, not after it
            position += 1
            checkpoint.kill_point("step")
            at_limit = bool(limit) and self.step >= limit
            mid_checkpoint = (at_limit or (every and self.step % every == 0)) and position < steps_per_epoch
            self.stop_reason = self.dist.agree_stop(self.stop_reason)  # under torchrun: one small all-reduce
            if running.pending >= SYNC_EVERY or mid_checkpoint or self.stop_reason is not None:
                running.flush(failed)  # a NaN/inf loss of these steps raises here, before any checkpoint
                if bar is not None:
                    bar.update(epoch, running.count, time.perf_counter() - start, running.sums)
                if self.stop_reason is not None:
                    break
            if mid_checkpoint:
                self._checkpoint(epoch - 1, partial=dict(position=position, sums=dict(running.sums), count=running.count,
                                                         seconds=before + time.perf_counter() - start,
                                                         epoch_generator=epoch_generator))
            if at_limit and position < steps_per_epoch:
                self.console.print(f"stopped at step {self.step} (--max-steps {limit}), {position} of {steps_per_epoch} "
                                   f"batches into epoch {epoch}; vaekit run --resume {self.run_dir} --max-steps N "
                                   "continues it")
                return None
        running.flush(failed)
        seconds = before + time.perf_counter() - start
        if bar is not None:
            bar.update(epoch, running.count, seconds - before, running.sums)
        return {k: v / running.count for k, v in running.sums.items()}, seconds

    def _loss_failed(self, epoch: int, value: float, step: int) -> BaseException:
        return distributed.mark_shared(TrainingError(self._nan_message(value, epoch, step)))

    def _forward_step(self, x: torch.Tensor, c: torch.Tensor | None, index: torch.Tensor):
        """One step's forward on the batch ``x [B, *S]`` (labels ``c [B]``, positions ``index [B]``): the
        objective's forward, the regularizers' own updates (the AAE discriminator's step), the loss.
        Returns ``(record, loss, terms, extra)``; under torchrun it runs inside DistributedDataParallel."""
        model, steps = self.model, self.steps
        with self.amp.autocast():
            record = steps.forward(x, c)
        record.index = index
        extra: dict[str, Any] = {}  # a regularizer's own figures: floats or one-element tensors
        for i, reg in enumerate(model.regularizers):
            opt = self.optimizers.get(f"regularizer{i}")
            if opt is not None:
                extra.update(reg.update(record, self.dist.sync_optimizer(opt)))
        with self.amp.autocast():
            loss, terms = self.objective.loss(model, record)
        return record, loss, terms, extra

    def _test_metrics(self) -> dict[str, float]:
        """Test-set ELBO terms, nats: the seeded estimate (:data:`~vaekit.evaluation.EVAL_SEED`) that
        ``vaekit eval`` reports too, drawn without touching the training RNG streams, named as decided on
        the whole test set (``test_normalized``).  Under torchrun each rank evaluates its share of the
        evaluation batches, each batch seeded on its own, and the sums are reduced: the figures are the
        one-process ones for any number of ranks (:func:`~vaekit.evaluation.elbo_summary`)."""
        summary = elbo_summary(self.model, self.test, c=self.test_y, normalized=self.test_normalized, shard=self.dist)
        return {f"test_{k}": v for k, v in summary.items()}

    def _checkpoint(self, epoch: int, record: dict[str, Any] | None = None, partial: dict[str, Any] | None = None) -> None:
        """Commit a checkpoint (:func:`~vaekit.checkpoint.save_checkpoint`) after ``epoch`` completed epochs:
        with ``record``, that epoch's metrics record (added to the history once committed); with
        ``partial`` (``position``, ``sums``, ``count``, ``seconds``, ``epoch_generator``), mid-way
        through epoch ``epoch + 1``.  Raises TrainingError if a parameter is NaN/inf (nothing written)."""
        where = f"epoch {epoch}" if partial is None else f"epoch {epoch + 1}"
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                raise TrainingError(f"parameter {name} became NaN/inf in {where}; " + self._kept())
        self.dist.check_same(self.model, where)
        metrics = self.metrics_log + ([record] if record is not None else [])
        extra = {f"regularizer{i}.{k}": v for i, reg in enumerate(self.model.regularizers)
                 for k, v in reg.training_state().items()}
        extra.update(self.dist.rng_extra())  # under torchrun: every rank's noise stream
        ckpt = checkpoint.Checkpoint(epoch, self.step, metrics=metrics, extra=extra, **(partial or {}))
        self.dist.on_main(lambda: checkpoint.save_checkpoint(self.run_dir, ckpt, self.model, self.optimizers,
                                                             self.generator, self.amp))  # rank 0 writes
        self.metrics_log = metrics
        if record is not None:
            self.history.append(record)
        self.checkpointed, self.checkpointed_position = epoch, ckpt.position

    def _kept(self) -> str:
        """What an interrupted run leaves, and the command that carries on from it."""
        again = f"vaekit run --resume {self.run_dir}"
        if self.checkpointed == 0 and not self.checkpointed_position:
            return (f"the checkpoint of the pretrained weights (epoch 0) is kept in {self.run_dir} "
                    f"({again} continues from it)")
        if self.checkpointed is not None:
            into = f", {self.checkpointed_position} batches into the next" if self.checkpointed_position else ""
            return (f"the last good checkpoint (epoch {self.checkpointed}{into}) is kept in {self.run_dir} "
                    f"({again} continues from it)")
        return f"no epoch had finished, so {self.run_dir} holds no checkpoint ({again} starts it again from epoch 1)"

    def _nan_message(self, value: float, epoch: int, step: int) -> str:
        return (f"the loss became {value} at step {step} (epoch {epoch}); training stopped and "
                f"{self._kept()}. Try a lower --lr (vaekit run ... --out {self.run_dir} --overwrite replaces the run) "
                "or check the data")

    def progress(self, steps_per_epoch: int, epochs: int, start_epoch: int = 1, label: str = "epoch"):
        """A progress bar over epochs ``start_epoch..epochs`` (None inside the ``with`` when off)."""
        if not self.show_progress:
            return _NoBar()
        return _Bar(self.console, steps_per_epoch, epochs, start_epoch, label)


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _Bar:
    """A rich progress bar over all steps, showing the running loss terms and throughput."""

    def __init__(self, console, steps_per_epoch: int, epochs: int, start_epoch: int, label: str = "epoch") -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(label + " {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            transient=True,
        )
        self.steps = steps_per_epoch
        self.epochs = epochs
        total = steps_per_epoch * (epochs - start_epoch + 1)
        self.task = self.progress.add_task("train", total=total, epoch=start_epoch, epochs=epochs, stats="")
        self.done = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, epoch: int, count: int, elapsed: float, sums: dict[str, float]) -> None:
        self.done += 1
        if self.done % 5 and self.done % self.steps:
            return
        parts = [f"{k} {v / count:.2f}" for k, v in sums.items() if k != "loss"]
        stats = f"loss {sums['loss'] / count:.2f}  " + "  ".join(parts) + f"  {count / max(elapsed, 1e-9):,.0f} samples/s"
        self.progress.update(self.task, completed=self.done, epoch=epoch, stats=stats)


def _epoch_line(record: dict[str, Any], epochs: int, schedule: dict[str, float] | None = None) -> str:
    skip = {"epoch", "step", "epoch_seconds", "samples_per_s"}
    parts = [f"{k} {v:.3g}" for k, v in (schedule or {}).items()]
    parts += [f"{k.replace('train_', '')} {v:.2f}" for k, v in record.items() if k.startswith("train_") and k not in skip]
    tests = [f"{k} {v:.2f}" for k, v in record.items() if k.startswith("test_")]
    return (f"epoch {record['epoch']}/{epochs}  " + "  ".join(parts) + "  |  " + "  ".join(tests)
            + f"  |  {record['samples_per_s']:,.0f} samples/s")


def train(config: RunConfig | dict | str | Path | None = None, *, pm: PluginManager | None = None,
          progress: bool = True, quiet: bool = False, figures: bool = True,
          overwrite: bool = False, **overrides: Any) -> TrainResult:
    """Train one model and write its run directory; the Python API behind ``vaekit run``.

    ``config`` is a :class:`RunConfig`, a dict of its fields, or a TOML path;
    keyword ``overrides`` replace fields (``train(epochs=5, latent_dim=2)``); ``overwrite=True``
    replaces a run already in ``out`` (:class:`Trainer`).  Returns a :class:`TrainResult`.
    Raises a :class:`~vaekit.errors.VaekitError` subclass for bad input (ConfigError for a run
    already in ``out`` or a folder that is not a run, :class:`~vaekit.rundir.RunDirLocked` while
    another process writes ``out``), :class:`~vaekit.errors.TrainingError` if the loss
    becomes NaN/inf (the last good checkpoint is kept).  A run is continued with :func:`resume`,
    which reads its recorded config (``train(resume=...)`` is refused).
    """
    if "resume" in overrides:
        raise ConfigError("train() starts a run; continue one with vaekit.resume(run_dir, epochs=N), "
                          "which uses the run's recorded config")
    if config is None:
        config = RunConfig()
    elif isinstance(config, dict):
        config = RunConfig.from_dict(config)
    elif isinstance(config, (str, Path)):
        config = RunConfig.from_toml(config)
    if overrides:
        config = RunConfig.from_dict({**config.to_dict(), **overrides})
    return Trainer(config, pm, progress=progress, quiet=quiet, figures=figures, overwrite=overwrite).fit()


def resume(run_dir: str | Path, epochs: int | None = None, *, max_steps: int | None = None,
           workers: int | None = None, compile: str | None = None, **kwargs: Any) -> TrainResult:
    """Continue the run in ``run_dir`` from its last checkpoint; the Python API behind ``vaekit run --resume``.

    ``epochs``: a new target, recorded in ``config.json`` (a later resume continues to it); fewer than
    the epochs already done raises ConfigError.  Without it, the recorded target; a run that has done
    every epoch trains nothing and says so.  ``max_steps``: likewise a new limit on the optimizer
    steps of the whole run (0: none), recorded; fewer than the steps taken raises ConfigError.
    ``workers``: data-loading processes for this session (results do not depend on it); ``compile``: the
    :func:`torch.compile` mode for this session (:mod:`vaekit.compiling`; results change by float rounding).  A run that never checkpointed (it failed in its first
    epoch: ``config.json`` alone) starts again from epoch 1 with its recorded config.  ``kwargs``:
    ``pm``, ``progress``, ``quiet``, ``figures`` as for :func:`train`.  Raises CheckpointError if
    ``run_dir`` is not a run, holds weights but no checkpoint, or needs a plugin not installed here;
    :class:`~vaekit.rundir.RunDirLocked` if another process is writing it.
    """
    run_dir = Path(run_dir)
    info = checkpoint.read_run_config(run_dir)
    values = dict(info["config"], out=str(run_dir))
    for key, value in (("epochs", epochs), ("max_steps", max_steps), ("workers", workers), ("compile", compile)):
        if value is not None:
            values[key] = value
    has_checkpoint = checkpoint.has_checkpoint(run_dir)
    if not has_checkpoint and rundir.holds_weights(run_dir):
        raise CheckpointError(f"{str(run_dir)!r} holds trained weights but no checkpoint to resume from; start a new "
                              f"run from its weights with --init {run_dir}, or retrain it with --overwrite")
    try:
        trainer = Trainer(RunConfig.from_dict(values), resume=has_checkpoint, **kwargs)
        trainer.epochs_given, trainer.max_steps_given = epochs is not None, max_steps is not None
        if not has_checkpoint:  # printed once the run directory is locked (Trainer.setup)
            trainer.restart_note = f"no epoch of {run_dir} had finished: starting it again from epoch 1"
        return trainer.fit()
    except UnknownPluginError as e:
        raise CheckpointError(checkpoint.missing_plugin_message(run_dir, info, e)) from None


__all__ = ["TrainResult", "Trainer", "resume", "train"]
