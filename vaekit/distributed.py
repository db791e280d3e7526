"""Training on several processes launched by ``torchrun``: PyTorch's DistributedDataParallel.

``torchrun --standalone --nproc_per_node=N -m vaekit run …`` starts N ranks; each finds ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in its environment and :func:`connect` joins them into one process group
(gloo on the CPU, NCCL on CUDA with one GPU per rank, ``cuda:LOCAL_RANK``).  Without ``torchrun`` (or
with one process) :func:`connect` returns :class:`Single`, whose every method is the one-process
identity, so the :class:`~vaekit.training.Trainer` has one code path.

What :class:`Distributed` does (docs/scaling.md):

* ``--batch-size`` is the global batch.  Every rank draws the same seeded permutation and
  binarization and takes its contiguous share of each batch (:meth:`Distributed.share`).
* The main model trains under :class:`torch.nn.parallel.DistributedDataParallel`, which averages
  the gradients over the ranks; each rank's loss is scaled by ``W · B_r / B`` (:meth:`Distributed.loss_scale`),
  so the average is the gradient of the global batch's mean loss, an uneven last batch too.
* Regularizers with their own optimizer (the AAE discriminator) get their gradients averaged the
  same way before each of their steps (:class:`_SyncedOptimizer`), so they stay identical on every rank.
* The steps' loss terms are summed over the ranks (sample-weighted means), by name, when the trainer
  reads them (every 20 steps: :class:`vaekit.running.RunningTerms`): the ranks check first that they
  have the same names (:meth:`Distributed.batch_sums`).  Every rank sees the
  global batch's loss (a NaN on one rank stops them all) and the metrics are the global ones.
* Rank 0 alone writes the run directory (:meth:`Distributed.on_main`); an error on any rank while
  setting up, loading or writing is shared with the others (:meth:`Distributed.agree`), and so is a
  failure to read a rank's share of a batch (the trainer :meth:`Distributed.settle` checks each batch's
  reading before the step), so none waits for a peer that failed and rank 0 prints ``rank R of W
  failed: ...`` once (:func:`reported_by_main`).
* Regularizers with ``supports_distributed = False`` (per-sample state) are refused
  (:meth:`Distributed.check_regularizers`); a stop requested on any rank is agreed after each step
  and after the epoch-end hooks (:meth:`Distributed.agree_stop`).
* Each rank draws its noise (the VAE's ε) from its own global RNG stream, seeded from ``(seed,
  rank)`` (:func:`rank_seed`; rank 0 keeps the one-process stream) and saved with every checkpoint.

Collectives and the rendezvous wait at most ``VAEKIT_DIST_TIMEOUT`` seconds (default
:data:`DEFAULT_TIMEOUT`); then the rank stops with a one-line error.
"""

from __future__ import annotations

import gc
import os
import zlib
from datetime import timedelta
from typing import Any, Callable

import torch

from .errors import ConfigError, VaekitError
from .rng import derived_seed

TIMEOUT_ENV = "VAEKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
"""Seconds a rank waits for the rendezvous and for any collective before it gives up."""


PEER_GRACE = 1.0
"""Seconds a rank other than 0 waits before it exits on an error rank 0 reports too (``torchrun`` stops
the other processes as soon as one exits with an error: rank 0 must have printed it by then)."""

_connected = False  # this process joined a process group (connect)


class PeerError(VaekitError):
    """Another rank failed: this rank stops too.  The CLI prints it on rank 0 only."""


def reported_by_main(error: BaseException) -> bool:
    """True if ``error``, raised on a rank other than 0, is printed by another rank, so this rank prints nothing.

    Once the process group is up that holds only for errors every rank knows of: a :class:`PeerError`
    and errors marked :func:`mark_shared` (any error inside :meth:`Distributed.agree` or
    :meth:`Distributed.settle`, and errors global by construction: a NaN in the global batch's loss,
    parameters that differ, loss terms that differ).  A rank's own error (a batch share it cannot read
    outside ``settle``, an out-of-memory on its GPU) is printed by that rank, prefixed ``rank N:``.
    Before the process group is up every rank runs the same command line on the same files, so a
    VaekitError (a configuration error, ``--resume`` of a missing run) is printed by each node's
    ``LOCAL_RANK`` 0 alone: once on one machine."""
    if not launched() or env_rank() == 0:
        return False
    if not _connected:
        return isinstance(error, VaekitError) and env_local_rank() != 0
    return isinstance(error, PeerError) or getattr(error, "vaekit_shared", False)


def mark_shared(error: BaseException) -> BaseException:
    """Mark ``error`` as raised on every rank alike (rank 0 prints it: :func:`reported_by_main`); returns it."""
    try:
        error.vaekit_shared = True
    except AttributeError:
        pass
    return error


def env_rank() -> int:
    """This process's rank under ``torchrun`` (``RANK``), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def env_local_rank() -> int:
    """This process's rank on its machine under ``torchrun`` (``LOCAL_RANK``, else ``RANK``), 0 otherwise."""
    try:
        return int(os.environ.get("LOCAL_RANK", env_rank()))
    except ValueError:
        return 0


def launched() -> bool:
    """True when ``torchrun`` (or a user) set ``WORLD_SIZE`` above 1: this process is one of several ranks."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return True  # connect() says what is wrong


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s global RNG stream: ``seed`` itself for rank 0 (as in one process), else a
    62-bit seed drawn from ``numpy.random.SeedSequence([seed, rank])`` (distinct streams per rank)."""
    return derived_seed(seed, rank)


def timeout() -> float:
    """``VAEKIT_DIST_TIMEOUT`` in seconds (default :data:`DEFAULT_TIMEOUT`); ConfigError if not a positive number."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


class Single:
    """One process: every method is the identity (what :func:`connect` returns without ``torchrun``)."""

    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def check_batches(self, n: int, batch_size: int) -> None:
        """Raise ConfigError if a batch of ``n`` samples in batches of ``batch_size`` leaves a rank without data."""

    def check_regularizers(self, regularizers) -> None:
        """Raise ConfigError if a regularizer cannot train on several processes
        (:attr:`Regularizer.supports_distributed <vaekit.interfaces.Regularizer.supports_distributed>` False)."""

    def seed_streams(self, seed: int) -> None:
        """Give this rank's global RNG its own stream (:func:`rank_seed`); rank 0 keeps its stream."""

    def describe(self) -> dict[str, Any]:
        """What ``config.json`` records about the processes (nothing for one)."""
        return {}

    def share(self, n: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of a global batch of ``n`` that are this rank's (all ``n`` in one process)."""
        return 0, n

    def begin_batch(self, n_global: int, n_local: int) -> None:
        """The next step trains on ``n_local`` of a global batch of ``n_global`` samples."""

    def wrap_step(self, model: torch.nn.Module, fn: Callable, ignore: set[int]) -> Callable:
        """``fn(x, c, index)`` run through DistributedDataParallel (``ignore``: ids of parameters it leaves alone)."""
        return fn

    def sync_optimizer(self, optimizer):
        """``optimizer``, averaging its gradients over the ranks before each step."""
        return optimizer

    def batch_sums(self, sums: dict[str, float], n: int) -> tuple[dict[str, float], int]:
        """``sums`` (terms × samples) and the sample count ``n``, summed over the ranks."""
        return sums, n

    def loss_scale(self) -> float:
        """The factor ``W · B_r / B`` of a rank's mean loss over its B_r samples of the global batch of B
        (the sizes given to :meth:`begin_batch`), so that DDP's mean over the W ranks' gradients is the
        global batch mean's gradient (1 in one process)."""
        return 1.0

    def agree_stop(self, reason: str | None) -> str | None:
        """A stop requested on any rank (the first rank's reason), on every rank."""
        return reason

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on every rank; if it raised on any, every rank raises (PeerError where it did not)."""
        return fn()

    def settle(self, error: BaseException | None) -> None:
        """Raise ``error`` (collective: if any rank passes an error, every rank raises, PeerError
        ``"rank R of W failed: ..."`` where it passed None); return if no rank failed."""
        if error is not None:
            raise error

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 alone and return its result on every rank (its error too, as PeerError elsewhere)."""
        return fn()

    def rng_extra(self) -> dict[str, torch.Tensor]:
        """Every rank's global RNG state, for the checkpoint (collective)."""
        return {}

    def restore_rng(self, extra: dict[str, torch.Tensor], seed: int, step: int) -> None:
        """Set this rank's global RNG from a checkpoint's :meth:`rng_extra`."""

    def check_same(self, model: torch.nn.Module, where: str) -> None:
        """Raise if the ranks' parameters differ (they must be identical after every step)."""

    def close(self, finished: bool = True) -> None:
        """Leave the process group (``finished``: every rank got here, meet them first)."""


class Distributed(Single):
    """One of ``world_size`` ranks in a ``torch.distributed`` process group (see the module docstring)."""

    is_main = False

    def __init__(self, device: torch.device, rank: int, world_size: int, local_rank: int, backend: str) -> None:
        super().__init__(device)
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend
        self.is_main = rank == 0
        self.seeds: list[int] = []
        self._ddp = None  # the DistributedDataParallel step (wrap_step)

    # --- set-up -------------------------------------------------------------------------------

    def check_batches(self, n: int, batch_size: int) -> None:
        w = self.world_size
        if batch_size < w:
            raise ConfigError(f"--batch-size {batch_size} is the global batch, shared by {w} processes: give "
                              f"--batch-size >= {w} or start fewer processes (torchrun --nproc_per_node)")
        if n < w:
            raise ConfigError(f"the training set holds {n} samples, fewer than the {w} processes: start fewer "
                              "processes (torchrun --nproc_per_node)")
        last = n % batch_size
        if 0 < last < w:
            fits = next(b for b in range(batch_size + 1, n + w + 1) if not 0 < n % b < w)
            raise ConfigError(f"the last batch of each epoch holds {last} of the {n} training samples, fewer than the "
                              f"{w} processes that share it: choose a --batch-size that leaves 0 or >= {w} samples "
                              f"over (e.g. {fits})")

    def check_regularizers(self, regularizers) -> None:
        refused = [reg.name for reg in regularizers if not getattr(reg, "supports_distributed", True)]
        if refused:
            raise ConfigError(f"{', '.join(refused)} cannot train on {self.world_size} processes (it keeps per-sample "
                              "state: supports_distributed is False): train it in one process, without torchrun")

    def seed_streams(self, seed: int) -> None:
        self.seeds = [rank_seed(seed, r) for r in range(self.world_size)]
        if self.rank:
            torch.manual_seed(self.seeds[self.rank])  # CPU and every CUDA device

    def describe(self) -> dict[str, Any]:
        return {"distributed": {"world_size": self.world_size, "backend": self.backend, "rank_seeds": self.seeds}}

    # --- data ---------------------------------------------------------------------------------

    def share(self, n: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of ``n`` that are this rank's: ``torch.tensor_split``'s contiguous split."""
        q, r = divmod(n, self.world_size)
        lo = self.rank * q + min(self.rank, r)
        return lo, lo + q + (self.rank < r)

    def begin_batch(self, n_global: int, n_local: int) -> None:
        self.batch_size, self.local_size = n_global, n_local  # the regularizers' optimizers weight by them

    # --- the step -----------------------------------------------------------------------------

    def wrap_step(self, model: torch.nn.Module, fn: Callable, ignore: set[int]) -> Callable:
        from torch.nn.parallel import DistributedDataParallel

        step = _Step(model, fn)
        ignored = [f"model.{name}" for name, p in model.named_parameters() if id(p) in ignore]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, ignored)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: a plugin's parameter that some steps do not use (a conditional head) is fine
        self._ddp = DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=True)
        return self._step

    def _step(self, *args):
        return self._ddp(*args)

    def sync_optimizer(self, optimizer):
        return _SyncedOptimizer(optimizer, self)

    def batch_sums(self, sums: dict[str, float], n: int) -> tuple[dict[str, float], int]:
        """Raises TrainingError (on every rank) if the ranks' ``sums`` do not hold the same names: a plugin
        that returns a term on some ranks only (a penalty of None)."""
        import torch.distributed as dist

        keys = sorted(sums)
        code = float(zlib.crc32("\0".join(keys).encode()))  # the names agree: MAX(code) == MIN(code)
        check = torch.tensor([code, -code], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(check, op=dist.ReduceOp.MAX)
        if check[0].item() != -check[1].item():
            names: list[Any] = [None] * self.world_size
            dist.all_gather_object(names, keys)
            from .errors import TrainingError

            shown = [sorted({k.split("\0")[0] for k in ks if not k.startswith("\0")}) for ks in names]  # per-step keys: "name\0i"
            raise mark_shared(TrainingError(
                f"the {self.world_size} processes' loss terms (or metrics) differ: "
                + "; ".join(f"rank {r} has {', '.join(k) or 'none'}" for r, k in enumerate(shown))
                + ": a plugin returned a term (a penalty) on some ranks only; it must return a tensor on every rank"))
        t = torch.tensor([sums[k] for k in keys] + [float(n)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        values = t.tolist()
        return dict(zip(keys, values[:-1])), int(round(values[-1]))

    def loss_scale(self) -> float:
        return self.world_size * self.local_size / self.batch_size

    def agree_stop(self, reason: str | None) -> str | None:
        import torch.distributed as dist

        flag = torch.tensor([reason is not None], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return None
        reasons: list[Any] = [None] * self.world_size
        dist.all_gather_object(reasons, reason)
        return next(r for r in reasons if r is not None)

    # --- agreement ----------------------------------------------------------------------------

    def agree(self, fn: Callable[[], Any]) -> Any:
        try:
            result, error = fn(), None
        except Exception as e:  # noqa: BLE001 - shared with the other ranks, then raised
            result, error = None, e
        self.settle(error)
        return result

    def settle(self, error: BaseException | None) -> None:
        import torch.distributed as dist

        # one small all-reduce when no rank failed; the messages are gathered only when one did
        flag = torch.tensor([error is not None], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return
        failures: list[Any] = [None] * self.world_size
        dist.all_gather_object(failures, None if error is None else str(error).splitlines()[0] if str(error)
                               else type(error).__name__)
        if error is not None:
            raise mark_shared(error)  # every rank knows of it: rank 0 reports it (reported_by_main)
        rank, message = next((r, m) for r, m in enumerate(failures) if m is not None)
        raise PeerError(f"rank {rank} of {self.world_size} failed: {message}")

    def on_main(self, fn: Callable[[], Any]) -> Any:
        import torch.distributed as dist

        result = self.agree(lambda: fn() if self.is_main else None)
        box = [result]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    # --- checkpoints --------------------------------------------------------------------------

    def rng_extra(self) -> dict[str, torch.Tensor]:
        import torch.distributed as dist

        mine = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, mine)
        return {f"distributed.rank{r}.{k}": v for r, s in enumerate(states) for k, v in s.items()}

    def restore_rng(self, extra: dict[str, torch.Tensor], seed: int, step: int) -> None:
        own = f"distributed.rank{self.rank}."
        if f"{own}torch" in extra and f"distributed.rank{self.world_size}.torch" not in extra:
            torch.set_rng_state(extra[f"{own}torch"])
            if self.device.type == "cuda" and f"{own}cuda" in extra:
                torch.cuda.set_rng_state(extra[f"{own}cuda"], self.device)
        elif self.rank:  # saved by another number of processes: a fresh stream, distinct per rank and step
            torch.manual_seed(rank_seed(rank_seed(seed, self.rank), step + 1))

    def check_same(self, model: torch.nn.Module, where: str) -> None:
        import torch.distributed as dist

        from .errors import TrainingError

        with torch.no_grad():
            mine = torch.stack([p.detach().double().sum() for p in model.parameters()] or [torch.zeros((), dtype=torch.float64)])
        mine = mine.to(self._comm_device())
        first = mine.clone()
        dist.broadcast(first, src=0)
        differ = torch.tensor([int(not torch.equal(mine, first))], device=self._comm_device())
        dist.all_reduce(differ, op=dist.ReduceOp.MAX)
        if differ.item():
            raise mark_shared(TrainingError(f"the {self.world_size} processes' parameters differ in {where}: a plugin "
                                            "changed them outside the optimizer on one rank; nothing was written"))

    def close(self, finished: bool = True) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        try:
            if finished:  # no rank leaves while another still reads its last message
                dist.barrier()
        finally:
            # DDP's reducer holds the process group: drop it first, so that the group (and gloo's threads)
            # is destroyed now, not while the interpreter shuts down (a SIGABRT there: pytorch/pytorch#179291)
            self._ddp = None
            gc.collect()
            dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


class _Step(torch.nn.Module):
    """The module DistributedDataParallel wraps: holds the model (its parameters are the ones DDP
    averages) and runs the trainer's step forward, so DDP's reducer sees the forward pass."""

    def __init__(self, model: torch.nn.Module, fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x, c, index):
        return self.fn(x, c, index)


class _SyncedOptimizer:
    """A regularizer's own optimizer whose :meth:`step` first replaces each gradient by the ranks'
    sample-weighted mean ``Σ_r (B_r / B) g_r``: the gradient of the global batch's mean loss."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: Distributed) -> None:
        self.optimizer = optimizer
        self.group = group

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)

    def step(self, closure=None):
        import torch.distributed as dist

        weight = self.group.local_size / self.group.batch_size
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.mul_(weight)
                    dist.all_reduce(p.grad)
        return self.optimizer.step(closure)


def connect(device: torch.device) -> Single:
    """The processes this run trains on: :class:`Single` unless ``torchrun`` set ``WORLD_SIZE`` > 1, else
    this rank of a new process group (gloo on the CPU; NCCL on ``cuda:LOCAL_RANK`` for a CUDA
    ``device``), joined within ``VAEKIT_DIST_TIMEOUT`` seconds.

    Raises ConfigError (one line) if the launcher's variables are incomplete or not numbers
    (``MASTER_ADDR``/``MASTER_PORT`` missing: not launched by ``torchrun``), this node has fewer GPUs
    than processes, or the rendezvous does not complete in time (a peer that never starts).
    """
    if not launched():
        return Single(device)
    import torch.distributed as dist

    env = os.environ
    try:
        world_size, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world_size))
    except KeyError as e:
        raise ConfigError(f"WORLD_SIZE is set but {e.args[0]} is not: start the processes with torchrun "
                          "(torchrun --standalone --nproc_per_node=N -m vaekit run ...)") from None
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE must be whole numbers "
                          "(start the processes with torchrun)") from None
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK {rank} is not in 0..{world_size - 1} (WORLD_SIZE {world_size})")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise ConfigError(f"no rendezvous: {' and '.join(missing)} not set for the {world_size} processes; start "
                          "them with torchrun (--standalone on one machine, --rdzv-endpoint HOST:PORT on several)")
    seconds = timeout()
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count < local_world:
            raise ConfigError(f"--device cuda needs one GPU per process, but this machine runs {local_world} "
                              f"processes and sees {count} GPU{'s' if count != 1 else ''}: start "
                              f"torchrun --nproc_per_node={max(count, 1)}" + ("" if count else " or use --device cpu"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=seconds))
    except (RuntimeError, TimeoutError, ValueError, OSError) as e:
        where = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        raise ConfigError(f"no rendezvous of the {world_size} processes at {where} within {seconds:g} s "
                          f"({TIMEOUT_ENV}): a process did not start or cannot reach it "
                          f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    global _connected
    _connected = True
    return Distributed(device, rank, world_size, local_rank, backend)


__all__ = ["DEFAULT_TIMEOUT", "Distributed", "PEER_GRACE", "PeerError", "Single", "TIMEOUT_ENV", "connect",
           "env_local_rank", "env_rank", "launched", "mark_shared", "rank_seed", "reported_by_main", "timeout"]
