"""Export a trained model as a self-describing TorchScript archive (and an AOTInductor package).

The archive is one scripted module with the methods

* ``encode(x [B, *S]) -> (mu [B, d], logvar [B, d])`` — for a deterministic autoencoder ``mu`` is
  the code ``z`` and ``logvar`` is empty (``[B, 0]``), so the signature is the same for every model;
* ``decode(z [B, d]) -> x_mean [B, *S]`` — the likelihood's mean (e.g. sigmoid of the logits);
* ``reconstruct(x) -> x_mean`` — decode of the posterior mean;
* ``sample(n, seed) -> x_mean [n, *S]`` — z ~ N(0, I) from a ``torch.Generator`` seeded with ``seed``,
  so Python and C++ draw the same samples;

plus attributes ``vaekit_format``, ``input_shape``, ``latent_dim``, ``deterministic``,
``can_sample`` and the run's ``config.json`` as an extra file.  Only plain tensor ops are
recorded (the fused op is replaced by its formula), so libtorch alone runs it.
"""

import json
from pathlib import Path
from typing import List, Tuple

import torch
from torch import nn

from .errors import CheckpointError, ConfigError

FORMAT = "vaekit-torchscript/1"


class _Encode(nn.Module):
    """x -> posterior parameters (encoder + head), the part that is scripted or traced."""

    def __init__(self, model) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class _Decode(nn.Module):
    """z -> likelihood mean (latent transforms, decoder, likelihood link); mirrors ``VAEModel.decode_mean``."""

    def __init__(self, model) -> None:
        super().__init__()
        self.transforms = model.regularizers
        self.decoder = model.decoder
        self.likelihood = model.likelihood

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for reg in self.transforms:
            z = reg.transform_latent(z)
        return self.likelihood.mean(self.decoder(z))


class ExportedModel(nn.Module):
    """The exported module; see the module docstring for its methods."""

    def __init__(self, encode: nn.Module, decode: nn.Module, input_shape: List[int], latent_dim: int,
                 deterministic: bool, can_sample: bool) -> None:
        super().__init__()
        self.encode_net = encode
        self.decode_net = decode
        self.vaekit_format = FORMAT
        self.input_shape = input_shape
        self.latent_dim = latent_dim
        self.deterministic = deterministic
        self.can_sample = can_sample

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        params = self.encode_net(x)
        if self.deterministic:
            return params, params.new_empty([params.shape[0], 0])
        mu, logvar = params.chunk(2, dim=-1)
        return mu, logvar

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_net(z)

    @torch.jit.export
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(x)
        return self.decode(mu)

    @torch.jit.export
    def sample(self, n: int, seed: int) -> torch.Tensor:
        if not self.can_sample:
            raise RuntimeError("this model has no prior to sample from (a plain deterministic autoencoder)")
        g = torch.Generator()
        g.manual_seed(seed)
        z = torch.randn([n, self.latent_dim], generator=g)
        return self.decode(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)


def _script_or_trace(module: nn.Module, example: torch.Tensor, what: str) -> torch.jit.ScriptModule:
    """Script ``module``; if that fails, trace it on ``example``; ConfigError naming ``what`` if neither works."""
    module = module.eval()
    try:
        return torch.jit.script(module)
    except Exception as script_error:  # noqa: BLE001 - fall back to tracing
        try:
            with torch.no_grad():
                traced = torch.jit.trace(module, example, check_trace=True)
            return traced
        except Exception as trace_error:  # noqa: BLE001
            raise ConfigError(
                f"cannot export the {what}: TorchScript could neither script it ({_first(script_error)}) "
                f"nor trace it ({_first(trace_error)})"
            ) from None


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _uses_standard_normal(model) -> bool:
    p = model.sampling_distribution()
    if p is None:
        return False
    base = getattr(p, "base_dist", p)
    return (isinstance(base, torch.distributions.Normal) and bool((base.loc == 0).all())
            and bool((base.scale == 1).all()))


def export_torchscript(model, out) -> Path:
    """Write ``model`` (from :func:`vaekit.load_run`) as a TorchScript archive at ``out``.

    Raises ConfigError if a plugin can be neither scripted nor traced (the message names it).
    """
    model = model.cpu().eval()
    shape = list(model.data_shape)
    info = getattr(model, "run_info", {})
    names = info.get("config", {})
    encode = _script_or_trace(_Encode(model), torch.rand([2] + shape),
                              f"encoder {names.get('encoder', {}).get('name', '?')!r}")
    decode = _script_or_trace(_Decode(model), torch.randn(2, model.latent_dim),
                              f"decoder {names.get('decoder', {}).get('name', '?')!r} (with its likelihood)")
    wrapper = ExportedModel(encode, decode, shape, model.latent_dim, not model.prior.stochastic,
                            _uses_standard_normal(model))
    scripted = torch.jit.script(wrapper)
    out = Path(out)
    extra = {"config.json": json.dumps(info, indent=2)}
    from .checkpoint import atomic_write

    atomic_write(out, lambda tmp: scripted.save(tmp, _extra_files=extra))
    return out


def load_exported(path) -> torch.jit.ScriptModule:
    """Load an exported archive; the module gets a ``config`` attribute (the run's config.json as a dict).

    Raises CheckpointError if the file is missing or not a vaekit archive.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported model {str(path)!r} does not exist")
    extra = {"config.json": ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:  # noqa: BLE001 - any load failure: not a (valid) archive
        raise CheckpointError(f"{str(path)!r} is not a TorchScript archive ({_first(e)})") from None
    if getattr(module, "vaekit_format", None) != FORMAT:
        raise CheckpointError(f"{str(path)!r} is a TorchScript archive but not a vaekit model")
    module.config = json.loads(extra["config.json"] or "{}")
    return module
