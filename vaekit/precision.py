"""``--precision``: mixed-precision training with ``torch.autocast`` and a gradient scaler.

* ``fp32``: plain float32.
* ``bf16``: the forward pass and loss under ``torch.autocast(dtype=torch.bfloat16)``, on the CPU
  and on CUDA; bfloat16 has float32's range, so no loss scaling is needed.
* ``fp16``: the same with float16 and a ``torch.amp.GradScaler`` (Micikevicius et al. 2018,
  "Mixed Precision Training"): the loss is scaled before backward, steps whose gradients
  overflow are skipped and the scale adapts.  Meant for CUDA; it also runs on the CPU, slowly.

Parameters and optimizer state stay float32; ops that autocast to float32 (losses, the fused
reparameterize + KL op) keep their precision.  The scaler's state is part of the checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast context and optimizer step for one precision on one device.

    :param precision: ``fp32``, ``bf16`` or ``fp16``.
    :param device: the device the model trains on.
    Raises KeyError for an unknown precision (the config validates it first).
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self):
        """A context in which the forward pass and loss run at this precision."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimizer step (through the gradient scaler for fp16)."""
        if not self.scaler.is_enabled():
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (empty unless fp16), JSON-serialisable."""
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)
