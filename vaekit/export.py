"""Export a trained model as a self-describing TorchScript archive or AOTInductor package.

The archive is one scripted module with the methods

* ``encode(x [B, *S]) -> (mu [B, d], logvar [B, d])`` — ``mu`` is the features,
  ``VAEModel.embed(x)``: the posterior mean after the regularizers' feature transforms (a sparse
  AE's sigmoid, a k-sparse AE's top-k — top-⌊αk + ½⌋ with alpha > 1), ``logvar`` the posterior's
  log σ² as is; so for a VAE with a transform ``encode`` returns ``(transform(μ), log σ²)``.  For a
  full-covariance Gaussian posterior N(μ, LLᵀ) (``gaussian:covariance=full``) ``logvar`` is the log of
  its marginal variances, ``log diag(LLᵀ)``: the correlations are not exported.  For a
  deterministic autoencoder ``mu`` is the code and ``logvar`` is empty (``[B, 0]``), so the
  signature is the same for every model;
* ``decode(code [B, d]) -> x_mean [B, *S]`` — the likelihood's mean (e.g. sigmoid of the logits) for
  a code as the decoder reads it — as ``encode`` returns it, unless the features differ from the
  codes (a k-sparse AE with alpha > 1: decode ``VAEModel.code``) — no latent transform is applied;
* ``reconstruct(x) -> x_mean`` — decode of the code the decoder reads, ``VAEModel.reconstruct``
  (``transform_latent`` of μ: a k-sparse AE's k units even where ``encode`` returns αk);
* ``sample(n, seed) -> x_mean [n, *S]`` — ``decode(transform(z))``, z ~ N(0, I) from a
  ``torch.Generator`` seeded with ``seed``, so Python and C++ draw the same samples;

plus attributes ``vaekit_format``, ``input_shape``, ``latent_dim``, ``deterministic``,
``can_sample``, ``num_classes`` (0) and ``conditional`` (False), and the run's ``config.json`` as an extra file.
Every method checks its input as the C++ runtime does and raises (``torch.jit.Error`` in Python) ("wrong input shape:
expected [N, 1, 28, 28], got [8, 784]"; "wrong latent shape: …") for ``x`` not ``[N, *input_shape]``
or a code not ``[N, latent_dim]``.

A conditional VAE (``--condition label``, :mod:`vaekit.conditioning`) is exported as
:class:`ConditionalExportedModel`, whose methods take the labels too — ``encode(x, c)``,
``decode(code, c)``, ``reconstruct(x, c)`` with ``c [B]`` int64 labels in ``0..num_classes-1``, and
``sample(n, seed, label)`` — with ``num_classes`` = K and ``conditional`` = True (TorchScript only).  Only plain tensor ops are
recorded (the fused op is replaced by its formula), so libtorch alone runs it.

The AOTInductor package (``.pt2``, :func:`export_aoti`) holds two compiled models, ``encode``
(feature transforms included) and ``decode`` (dynamic batch size), compiled for a portable CPU target (x86-64-v3, i.e. AVX2,
rather than ``-march=native``), with the same attributes as package metadata; ``reconstruct``
and ``sample`` are composed from them by the loaders (:class:`AOTIModel` here, ``vaekit::Model``
in C++), with the same seeded generator as the TorchScript archive; the loaders cannot apply a
latent transform to the draws, so sampling from a model with one is refused (:func:`sample_error`),
and since they reconstruct as ``decode(encode(x))`` a model whose features differ from its codes (a
k-sparse AE with alpha > 1) is refused too (:func:`features_differ`; export it as TorchScript).
Loading a package runs the native code inside it, so :func:`load_exported` loads a ``.pt2`` only
with ``trust=True``; the TorchScript archive is the safe default.
"""

import contextlib
import copy
import json
from pathlib import Path
from typing import List, Tuple

import torch
from torch import nn

from .conditioning import append_label
from .errors import CheckpointError, ConfigError, first_line

FORMAT = "vaekit-torchscript/1"
AOTI_FORMAT = "vaekit-aoti/1"


def _transforming(model) -> list:
    """The model's regularizers that override ``transform_latent`` or ``transform_features`` (the rest
    leave codes and features alone)."""
    from .interfaces import Regularizer

    return [reg for reg in model.regularizers if type(reg).transform_latent is not Regularizer.transform_latent
            or type(reg).transform_features is not Regularizer.transform_features]


@torch.no_grad()
def features_differ(model) -> list:
    """The regularizers whose features (``transform_features``, what ``encode`` returns) differ from the
    codes their decoder reads (``transform_latent``) — a k-sparse AE with alpha > 1 — on a probe of
    random latent values; empty when ``embed`` and ``code`` agree."""
    from .interfaces import Regularizer

    z = torch.randn(64, model.latent_dim, generator=torch.Generator().manual_seed(0))
    z = z.to(model.prior._device_anchor.device)
    if torch.equal(model.transform_features(z), model.transform_latent(z)):
        return []
    return [reg for reg in model.regularizers if type(reg).transform_features is not Regularizer.transform_features]


class _Transform(nn.Module):
    """z -> the code (``features=False``: ``VAEModel.transform_latent``) or the features
    (``features=True``: ``VAEModel.transform_features``): the regularizers' transforms in order."""

    def __init__(self, model, features: bool = False) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(_transforming(model))
        self.features = features

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for reg in self.transforms:
            z = reg.transform_features(z) if self.features else reg.transform_latent(z)
        return z


class _Params(nn.Module):
    """x -> the posterior parameters ``[B, P]`` (encoder, head): ``VAEModel.encode``, in the exported
    layout (:func:`_marginals`: ``[μ, log σ²]`` for a full-covariance Gaussian)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.head = model.head
        self.marginals = _marginals(model.prior)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.marginals(self.head(self.encoder(x)))


def _marginals(prior) -> nn.Module:
    """The prior's ``export_marginals()`` module (head output -> ``[μ, log σ²]`` of the posterior's
    marginals, e.g. the full-covariance ``gaussian`` prior's), or the identity for a prior without one."""
    layout = getattr(prior, "export_marginals", None)
    return layout() if callable(layout) else nn.Identity()


class _Encode(nn.Module):
    """x -> the features (deterministic AE) or ``[features(μ), log σ²]`` (encoder, head, feature
    transforms): an AOTInductor package's ``encode`` part; its first part is ``VAEModel.embed``."""

    def __init__(self, model) -> None:
        super().__init__()
        self.params = _Params(model)
        self.transform = _Transform(model, features=True)
        self.deterministic = not model.prior.stochastic
        self.latent_dim = model.latent_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self.params(x)
        if self.deterministic:
            return self.transform(params)
        code = self.transform(params[:, : self.latent_dim])
        return torch.cat([code, params[:, self.latent_dim:]], dim=-1)


class _Decode(nn.Module):
    """code -> likelihood mean (decoder, likelihood link); mirrors ``VAEModel.decode_mean``."""

    def __init__(self, model) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.likelihood = model.likelihood

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(code))


class _CondParams(nn.Module):
    """(x, c) -> the posterior parameters ``[B, P]`` of a conditional model: ``VAEModel.encode(x, c)``
    (the encoder plugin reads x with the one-hot of c appended, :func:`vaekit.conditioning.append_label`),
    in the exported layout (:func:`_marginals`, as :class:`_Params`)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.encoder = model.encoder.inner
        self.head = model.head
        self.marginals = _marginals(model.prior)
        self.num_classes = model.num_classes

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.marginals(self.head(self.encoder(append_label(x, c, self.num_classes))))


class _CondDecode(nn.Module):
    """(code, c) -> likelihood mean of a conditional model: ``VAEModel.decode_mean(code, c)``."""

    def __init__(self, model) -> None:
        super().__init__()
        self.decoder = model.decoder.inner
        self.likelihood = model.likelihood
        self.num_classes = model.num_classes

    def forward(self, code: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(append_label(code, c, self.num_classes)))


class _Archive(nn.Module):
    """What every exported module holds: its parts and the attributes the loaders read."""

    def __init__(self, encode: nn.Module, decode: nn.Module, transform: nn.Module, features: nn.Module,
                 input_shape: List[int], latent_dim: int, deterministic: bool, sample_error: str,
                 num_classes: int = 0) -> None:
        super().__init__()
        self.encode_net = encode
        self.decode_net = decode
        self.transform_net = transform
        self.features_net = features
        self.vaekit_format = FORMAT
        self.input_shape = input_shape
        self.latent_dim = latent_dim
        self.deterministic = deterministic
        self.can_sample = sample_error == ""
        self.sample_error = sample_error
        self.num_classes = num_classes
        self.conditional = num_classes > 0

    def _check_input(self, x: torch.Tensor) -> None:
        """RuntimeError unless ``x`` is ``[N, *input_shape]`` (the C++ runtime's ``check_input``, same words)."""
        ok = x.dim() == len(self.input_shape) + 1
        for i in range(len(self.input_shape)):
            if ok and x.shape[i + 1] != self.input_shape[i]:
                ok = False
        if not ok:
            raise RuntimeError("wrong input shape: expected [N, " + ", ".join([str(s) for s in self.input_shape])
                               + "], got " + str(x.shape))

    def _check_latent(self, code: torch.Tensor) -> None:
        """RuntimeError unless ``code`` is ``[N, latent_dim]`` (the C++ runtime's ``check_latent``)."""
        if code.dim() != 2 or code.shape[1] != self.latent_dim:
            raise RuntimeError("wrong latent shape: expected [N, " + str(self.latent_dim) + "], got " + str(code.shape))


class ExportedModel(_Archive):
    """The exported module; see the module docstring for its methods."""

    def _mean_logvar(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        params = self.encode_net(x)
        if self.deterministic:
            return params, params.new_empty([params.shape[0], 0])
        mu, logvar = params.chunk(2, dim=-1)
        return mu, logvar

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self._mean_logvar(x)
        return self.features_net(mu), logvar

    @torch.jit.export
    def decode(self, code: torch.Tensor) -> torch.Tensor:
        self._check_latent(code)
        return self.decode_net(code)

    @torch.jit.export
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self._mean_logvar(x)
        return self.decode(self.transform_net(mu))

    @torch.jit.export
    def sample(self, n: int, seed: int) -> torch.Tensor:
        if not self.can_sample:
            raise RuntimeError(self.sample_error)
        g = torch.Generator()
        g.manual_seed(seed)
        z = torch.randn([n, self.latent_dim], generator=g)
        return self.decode(self.transform_net(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)


class ConditionalExportedModel(_Archive):
    """The exported module of a conditional VAE: :class:`ExportedModel`'s methods, each given the labels
    ``c [B]`` (int64, ``0..num_classes-1``; ``sample`` takes one ``label`` for all ``n``)."""

    def _check_labels(self, c: torch.Tensor, batch: int) -> None:
        if c.dim() != 1 or c.shape[0] != batch:
            raise RuntimeError("the labels c must be int64 of shape [B], one per input row")
        if batch > 0 and (int(c.min()) < 0 or int(c.max()) >= self.num_classes):
            raise RuntimeError("a label is out of range: this model knows the labels 0.." + str(self.num_classes - 1))

    def _mean_logvar(self, x: torch.Tensor, c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        self._check_labels(c, x.shape[0])
        params = self.encode_net(x, c)
        if self.deterministic:
            return params, params.new_empty([params.shape[0], 0])
        mu, logvar = params.chunk(2, dim=-1)
        return mu, logvar

    @torch.jit.export
    def encode(self, x: torch.Tensor, c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self._mean_logvar(x, c)
        return self.features_net(mu), logvar

    @torch.jit.export
    def decode(self, code: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self._check_latent(code)
        self._check_labels(c, code.shape[0])
        return self.decode_net(code, c)

    @torch.jit.export
    def reconstruct(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mu, _ = self._mean_logvar(x, c)
        return self.decode(self.transform_net(mu), c)

    @torch.jit.export
    def sample(self, n: int, seed: int, label: int) -> torch.Tensor:
        if not self.can_sample:
            raise RuntimeError(self.sample_error)
        g = torch.Generator()
        g.manual_seed(seed)
        z = torch.randn([n, self.latent_dim], generator=g)
        return self.decode(self.transform_net(z), torch.full([n], label, dtype=torch.long))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x, c)


def _probe_labels(model, n: int):
    """Labels ``[n]`` (all 0) for probing a conditional model; None for an unconditional one."""
    return torch.zeros(n, dtype=torch.long) if getattr(model, "conditional", False) else None


def _script_or_trace(module: nn.Module, example, what: str) -> torch.jit.ScriptModule:
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
    return first_line(e, 200)


def _normal_base(p):
    from .interfaces import base_of

    return base_of(p, torch.distributions.Normal)


def _uses_standard_normal(model) -> bool:
    """The model samples z ~ N(0, I) through the default sampler (what an archive's ``sample`` does)."""
    from .interfaces import Prior

    if model.prior.stochastic and type(model.prior).sample is not Prior.sample:
        return False  # a sampler of the prior's own
    base = _normal_base(model.sampling_distribution())
    return base is not None and bool((base.loc == 0).all()) and bool((base.scale == 1).all())


@torch.no_grad()
def sample_error(model, sampling: bool = True, aoti: bool = False) -> str:
    """Check what an archive can carry of ``model``'s prior; returns why ``sample`` is unavailable
    (``""`` when it is available).

    An archive's ``encode`` returns the head's ``[μ, log σ²]`` (μ through the latent transforms; a prior
    with ``export_marginals()``, the full-covariance ``gaussian``, maps its head's output to its
    posterior's mean and log marginal variances first) and its ``sample(n, seed)`` draws z ~ N(0, I).
    Raises ConfigError, naming the prior, if the posterior is not Gaussian with that mean and those
    variances, or if ``sampling`` is True and the model samples
    from another p(z) — or, for an AOTInductor package (``aoti``), has a latent transform, which the
    package's loaders cannot apply to the draws (with ``sampling=False`` the archive is written
    without ``sample``, and says why when it is called).
    """
    name = getattr(model, "run_info", {}).get("config", {}).get("prior", {}).get("name", type(model.prior).__name__)
    d = model.latent_dim
    if model.prior.stochastic:
        x = torch.rand([2] + list(model.data_shape))
        encoded = model.encode(x, _probe_labels(model, 2))
        q, params = model.prior.posterior(encoded), _marginals(model.prior)(encoded)
        gaussian = _normal_base(q) is not None or type(q) is torch.distributions.MultivariateNormal
        mu, logvar = params.chunk(2, dim=-1)
        if not (gaussian and params.shape[-1] == 2 * d and torch.allclose(q.mean, mu)
                and torch.allclose(q.variance, logvar.exp(), rtol=1e-4)):
            raise ConfigError(f"cannot export the prior {name!r}: its posterior is not N(μ, σ²) with parameters "
                              "[μ, log σ²] (or a full-covariance Gaussian with marginal variances σ²), "
                              "which is what an exported encode returns")
    if not model.can_sample:
        return f"this model is a deterministic autoencoder (prior {name!r}, no latent target): it has no p(z) to sample from"
    if aoti and _uses_standard_normal(model) and _transforming(model):
        names = ", ".join(repr(reg.name) for reg in _transforming(model))
        if sampling:
            raise ConfigError(f"cannot export sampling to an AOTInductor package: the regularizer {names} transforms "
                              "the latent draws, which the package's loaders cannot do; export with --no-sampling, "
                              "or as TorchScript (--format torchscript), which samples with the transform")
        return (f"this package was exported without sampling (--no-sampling): the regularizer {names} transforms "
                "the latent draws; sample with the TorchScript export or in Python (vaekit sample RUN)")
    if _uses_standard_normal(model):
        return ""
    if sampling:
        raise ConfigError(f"cannot export sampling from the prior {name!r}: an exported model samples z ~ N(0, I) only; "
                          "export with --no-sampling for encode, decode and reconstruct, and sample in Python "
                          "(vaekit sample RUN)")
    return (f"this model was exported without sampling (--no-sampling): its prior {name!r} is not N(0, I); "
            "sample in Python with vaekit sample RUN")


def _cpu_eval_copy(model):
    """A CPU copy of ``model`` in eval mode (with its ``run_info``); the caller's model keeps its device and mode."""
    return copy.deepcopy(model).cpu().eval()


def export_torchscript(model, out, sampling: bool = True) -> Path:
    """Write ``model`` (from :func:`vaekit.load_run`) as a TorchScript archive at ``out``.

    Exports a CPU copy in eval mode: ``model`` itself is not moved or switched out of training.
    Raises ConfigError if a plugin can be neither scripted nor traced (the message names it), or
    if the prior cannot be carried (:func:`sample_error`; ``sampling=False`` writes the archive
    without ``sample`` for a prior other than N(0, I)).
    """
    model = _cpu_eval_copy(model)
    why_not = sample_error(model, sampling)
    shape = list(model.data_shape)
    info = getattr(model, "run_info", {})
    names = info.get("config", {})
    if getattr(model, "conditional", False):
        return _export_conditional(model, out, why_not, info)
    encode = _script_or_trace(_Params(model), torch.rand([2] + shape),
                              f"encoder {names.get('encoder', {}).get('name', '?')!r}")
    decode = _script_or_trace(_Decode(model), torch.randn(2, model.latent_dim),
                              f"decoder {names.get('decoder', {}).get('name', '?')!r} (with its likelihood)")
    regs = ", ".join(repr(r.name) for r in _transforming(model))
    transform, features = (_script_or_trace(_Transform(model, features), torch.randn(2, model.latent_dim),
                                            f"latent transform of the regularizers {regs}") for features in (False, True))
    wrapper = ExportedModel(encode, decode, transform, features, shape, model.latent_dim, not model.prior.stochastic,
                            why_not)
    scripted = torch.jit.script(wrapper)
    out = Path(out)
    extra = {"config.json": json.dumps(info, indent=2)}
    from .checkpoint import atomic_write

    atomic_write(out, lambda tmp: scripted.save(tmp, _extra_files=extra))
    return out


def _export_conditional(model, out, why_not: str, info: dict) -> Path:
    """:func:`export_torchscript` of a conditional model: a :class:`ConditionalExportedModel`."""
    shape, names, c = list(model.data_shape), info.get("config", {}), _probe_labels(model, 2)
    encode = _script_or_trace(_CondParams(model), (torch.rand([2] + shape), c),
                              f"encoder {names.get('encoder', {}).get('name', '?')!r} (conditional)")
    decode = _script_or_trace(_CondDecode(model), (torch.randn(2, model.latent_dim), c),
                              f"decoder {names.get('decoder', {}).get('name', '?')!r} (conditional, with its likelihood)")
    regs = ", ".join(repr(r.name) for r in _transforming(model))
    transform, features = (_script_or_trace(_Transform(model, features), torch.randn(2, model.latent_dim),
                                            f"latent transform of the regularizers {regs}") for features in (False, True))
    scripted = torch.jit.script(ConditionalExportedModel(encode, decode, transform, features, shape, model.latent_dim,
                                                         not model.prior.stochastic, why_not, model.num_classes))
    out = Path(out)
    extra = {"config.json": json.dumps(info, indent=2)}
    from .checkpoint import atomic_write

    atomic_write(out, lambda tmp: scripted.save(tmp, _extra_files=extra))
    return out


def _metadata(model, info: dict, why_not: str) -> dict:
    return {
        "vaekit_format": AOTI_FORMAT,
        "input_shape": ",".join(str(s) for s in model.data_shape),
        "latent_dim": str(model.latent_dim),
        "deterministic": str(int(not model.prior.stochastic)),
        "can_sample": str(int(why_not == "")),
        "sample_error": why_not,
        "config_json": json.dumps(info),
    }


def export_aoti(model, out, sampling: bool = True) -> Path:
    """Compile ``model`` with AOTInductor into a ``.pt2`` package at ``out`` (about 30 s on 2 cores).

    Compiles a CPU copy in eval mode: ``model`` itself is not moved or switched out of training.
    Raises ConfigError if a plugin cannot be exported by ``torch.export``, the prior cannot be
    carried (:func:`sample_error`, ``sampling`` as in :func:`export_torchscript`), the model's
    features differ from its codes (:func:`features_differ`: a k-sparse AE with alpha > 1, which the
    TorchScript archive carries), or the output name does not end in ``.pt2``.
    """
    import logging
    import platform
    import tempfile
    import warnings

    import torch._inductor
    from torch._inductor.package import package_aoti

    out = Path(out)
    if out.suffix != ".pt2":
        raise ConfigError(f"an AOTInductor package must end in .pt2, got {str(out)!r}")
    if getattr(model, "conditional", False):
        raise ConfigError("cannot export a conditional VAE (--condition label) to an AOTInductor package: "
                          "export it as TorchScript (--format torchscript), whose methods take the labels")
    model = _cpu_eval_copy(model)
    differ = features_differ(model)
    if differ:
        names = ", ".join(repr(reg.name) for reg in differ)
        raise ConfigError(f"cannot export to an AOTInductor package: the regularizer {names} gives features (what "
                          "encode returns, e.g. ksparse with alpha > 1) that differ from the codes its decoder reads, "
                          "and a package reconstructs as decode(encode(x)); export as TorchScript (--format torchscript)")
    shape = list(model.data_shape)
    info = getattr(model, "run_info", {})
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    parts = {"encode": (_Encode(model), torch.rand([2] + shape), "x"),
             "decode": (_Decode(model), torch.randn(2, model.latent_dim), "code")}
    options = {"aot_inductor.package": True, "aot_inductor.metadata": _metadata(model, info, sample_error(model, sampling, aoti=True))}
    if platform.machine() in ("x86_64", "AMD64"):
        options.update({"cpp.march": "x86-64-v3", "cpp.simdlen": 256})  # portable AVX2, not -march=native
    files = {}
    logging.getLogger("torch._inductor").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")  # torch-internal pytree notice
    # Inductor writes "<model_name_for_generated_files>" into its cache folder and keeps a file that is
    # already there, so a shared cache can hand back another model's compiled code and weights: compile
    # in a private cache that lives only for this export.
    with _private_inductor_cache(), tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for name, (module, example, arg) in parts.items():
            try:
                program = torch.export.export(module.eval(), (example,), dynamic_shapes={arg: {0: batch}})
            except Exception as e:  # noqa: BLE001 - name the part that failed
                raise ConfigError(f"cannot export the model's {name} part with torch.export: {_first(e)}") from None
            files[name] = torch._inductor.aot_compile(
                program.module(), program.example_inputs[0],
                options=dict(options, **{"aot_inductor.model_name_for_generated_files": name, "fx_graph_cache": False}))
        staged = Path(tmp) / out.name
        package_aoti(str(staged), files)
        staged.replace(out)  # atomic: a kill never leaves half a package
    return out


@contextlib.contextmanager
def _private_inductor_cache():
    """Compile in a fresh, empty Inductor cache folder for the duration (then restore and delete it).

    Uses torch's ``temporary_cache_dir``, which also clears Inductor's in-memory caches (e.g.
    memoised cache paths) on the way in and out; on a torch without it, only
    ``TORCHINDUCTOR_CACHE_DIR`` is set and restored.
    """
    import tempfile

    try:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # older torch: set the variable only
        temporary_cache_dir = _cache_dir_variable
    with tempfile.TemporaryDirectory(prefix="vaekit-inductor-") as cache, temporary_cache_dir(cache):
        yield cache


@contextlib.contextmanager
def _cache_dir_variable(cache: str):
    """Point ``TORCHINDUCTOR_CACHE_DIR`` at ``cache`` for the duration (then restore it)."""
    import os

    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


class AOTIModel:
    """A loaded ``.pt2`` package with the TorchScript archive's methods and attributes.

    Constructing one loads and runs the package's native code, so it needs ``trust=True`` like
    ``load_exported(path, trust=True)``; CheckpointError otherwise, before anything is loaded.
    """

    def __init__(self, path: Path, *, trust: bool = False) -> None:
        import logging

        _require_trust(Path(path), trust)
        from torch._inductor.package import load_package

        logging.getLogger("torch.export.pt2_archive").setLevel(logging.ERROR)
        self._encode = load_package(str(path), "encode")
        self._decode = load_package(str(path), "decode")
        meta = self._encode.get_metadata()
        if meta.get("vaekit_format") != AOTI_FORMAT:
            raise CheckpointError(f"{str(path)!r} is an AOTInductor package but not a vaekit model")
        self.vaekit_format = AOTI_FORMAT
        self.input_shape = [int(s) for s in meta["input_shape"].split(",")]
        self.latent_dim = int(meta["latent_dim"])
        self.deterministic = meta["deterministic"] == "1"
        self.can_sample = meta["can_sample"] == "1"
        self.sample_error = meta.get("sample_error", "")
        self.config = json.loads(meta["config_json"])

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        params = self._encode(x.float().contiguous())
        if self.deterministic:
            return params, params.new_empty([params.shape[0], 0])
        mu, logvar = params.chunk(2, dim=-1)
        return mu, logvar

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self._decode(code.float().contiguous())

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0].contiguous())

    def sample(self, n: int, seed: int) -> torch.Tensor:
        if not self.can_sample:
            raise RuntimeError(self.sample_error)
        g = torch.Generator()
        g.manual_seed(seed)
        return self.decode(torch.randn([n, self.latent_dim], generator=g))


def _require_trust(path: Path, trust: bool) -> None:
    if not trust:
        raise CheckpointError(
            f"{str(path)!r} is an AOTInductor package: it contains compiled native code that runs when it "
            "is loaded, so load only a package you trust, with load_exported(path, trust=True) "
            "(a TorchScript archive, .pt, needs no trust)")


def load_exported(path, *, trust: bool = False):
    """Load an exported model: a TorchScript archive (``.pt``) or an AOTInductor package (``.pt2``).

    Both have ``encode``, ``decode``, ``reconstruct``, ``sample(n, seed)``, ``input_shape``,
    ``latent_dim`` and ``config`` (the run's config.json as a dict); a conditional model's archive
    has ``encode(x, c)``, ``decode(code, c)``, ``reconstruct(x, c)``, ``sample(n, seed, label)`` and
    ``conditional`` True, ``num_classes`` K (:class:`ConditionalExportedModel`).

    A TorchScript archive is the safe default: loading it only reads a program of tensor ops.  An
    AOTInductor package holds compiled native code (shared libraries) that runs as soon as it is
    loaded, with the rights of this process — a crafted package runs whatever it likes — so a
    ``.pt2`` is loaded only with ``trust=True``, for a package you built or otherwise trust.

    Raises CheckpointError if the file is missing or not a vaekit model, and for a ``.pt2`` without
    ``trust=True`` (before anything in it is loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported model {str(path)!r} does not exist")
    if path.suffix == ".pt2":
        _require_trust(path, trust)
        try:
            return AOTIModel(path, trust=True)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{str(path)!r} is not a loadable AOTInductor package ({_first(e)})") from None
    extra = {"config.json": ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:  # noqa: BLE001 - any load failure: not a (valid) archive
        raise CheckpointError(f"{str(path)!r} is not a TorchScript archive ({_first(e)})") from None
    if getattr(module, "vaekit_format", None) != FORMAT:
        raise CheckpointError(f"{str(path)!r} is a TorchScript archive but not a vaekit model")
    module.config = json.loads(extra["config.json"] or "{}")
    return module
