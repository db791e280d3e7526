"""Export to TorchScript and the C++ runtime: parity with Python on real digits, one-line errors."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

import vaekit
from vaekit.errors import CheckpointError, ConfigError
from vaekit.export import export_torchscript, load_exported

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    model = vaekit.load_run(trained_run)
    path = export_torchscript(model, tmp_path_factory.mktemp("export") / "model.pt")
    return model, path


@pytest.fixture(scope="module")
def digits(small_mnist):
    return small_mnist.test_x[:20]


def test_exported_methods_match_the_python_model(exported, digits):
    model, path = exported
    module = load_exported(path)
    assert module.input_shape == [1, 28, 28] and module.latent_dim == 2 and not module.deterministic
    mu, logvar = module.encode(digits)
    with torch.no_grad():
        params = model.encode(digits)
        assert torch.allclose(mu, params[:, :2], atol=1e-6) and torch.allclose(logvar, params[:, 2:], atol=1e-6)
        assert torch.allclose(module.decode(mu), model.decode_mean(mu), atol=1e-6)
        assert torch.allclose(module.reconstruct(digits), model.reconstruct(digits), atol=1e-6)
    # sample(n, seed): the Python model's own seeded sampler (prior.distribution() -> sample_with_generator ->
    # decode_mean) is the independent path; different seeds give different samples
    with torch.no_grad():
        for seed in (3, 11):
            expected = model.sample(5, torch.Generator().manual_seed(seed))
            assert (module.sample(5, seed) - expected).abs().max() <= 1e-6, seed
    assert (module.sample(5, 3) - module.sample(5, 11)).abs().max() > 1e-2
    assert module.config["config"]["encoder"]["name"] == "mlp"
    assert "vaekit::" not in module.code and "vaekit::" not in module.encode_net.code


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_export_leaves_the_callers_model_alone(trained_run, digits, tmp_path, device):
    model = vaekit.load_run(trained_run).to(device).train()
    params = dict(model.named_parameters())
    values = {name: p.detach().clone() for name, p in params.items()}
    module = load_exported(export_torchscript(model, tmp_path / "model.pt"))
    # still training, on its device, with the very same parameter tensors holding the same values
    assert all(m.training for m in model.modules())
    for name, p in model.named_parameters():
        assert p is params[name] and p.device.type == device and torch.equal(p, values[name]), name
    model.eval()
    with torch.no_grad():
        assert torch.allclose(module.reconstruct(digits), model.reconstruct(digits.to(device)).cpu(), atol=1e-5)
        z = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(module.decode(z), model.decode_mean(z.to(device)).cpu(), atol=1e-5)


def test_deterministic_autoencoder_export(tmp_path, small_mnist):
    run = vaekit.train(data="mnist:train_per_class=10,test_per_class=2", encoder="conv:channels=4,8,hidden=16",
                       prior="none", latent_dim=3, epochs=1, out=str(tmp_path / "ae"), quiet=True, figures=False)
    module = load_exported(export_torchscript(vaekit.load_run(run.run_dir), tmp_path / "ae.pt"))
    z, empty = module.encode(small_mnist.test_x[:4])
    assert z.shape == (4, 3) and empty.shape == (4, 0) and module.deterministic and not module.can_sample
    with pytest.raises(Exception, match="deterministic autoencoder \\(prior 'none', no latent target\\): it has no p\\(z\\) to sample from"):
        module.sample(2, 0)


def test_cli_export_and_bad_archives(trained_run, tmp_path):
    from typer.testing import CliRunner

    from vaekit.cli import build_app

    app, runner = build_app(), CliRunner()
    res = runner.invoke(app, ["export", str(trained_run), "--out", str(tmp_path / "m.pt")])
    assert res.exit_code == 0, res.output
    assert load_exported(tmp_path / "m.pt").latent_dim == 2
    res = runner.invoke(app, ["export", str(trained_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and "unknown export format 'onnx'" in res.stderr
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(CheckpointError, match="not a TorchScript archive"):
        load_exported(tmp_path / "junk.pt")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="not a vaekit model"):
        load_exported(tmp_path / "other.pt")


class _Unexportable(vaekit.Encoder):
    """Neither scriptable (uses **kwargs) nor traceable (refuses to be traced)."""

    def __init__(self, input_shape):
        super().__init__(input_shape)
        self.lin = torch.nn.Linear(784, 8)
        self.out_features = 8

    def forward(self, x, **kwargs):
        if torch.jit.is_tracing():
            raise RuntimeError("this encoder cannot be traced")
        return self.lin(x.flatten(1))


def test_unexportable_plugin_is_named(trained_run, monkeypatch):
    model = vaekit.load_run(trained_run)
    model.encoder = _Unexportable((1, 28, 28))
    model.head = torch.nn.Linear(8, 4)
    with pytest.raises(ConfigError, match="cannot export the encoder 'mlp'"):
        export_torchscript(model, "/tmp/never-written.pt")


# --- features that differ from the codes: a k-sparse AE with alpha > 1 -----------------------------

@pytest.fixture(scope="module")
def ksparse_vae(tmp_path_factory):
    """A k-sparse VAE (k = 3 of 12 in the code, ⌊2·3 + ½⌋ = 6 in the features) and its TorchScript archive."""
    from vaekit.config import RunConfig
    from vaekit.manager import get_plugin_manager
    from vaekit.model import build_model

    torch.manual_seed(0)
    model = build_model(RunConfig(encoder="mlp:hidden=32", latent_dim=12, regularizers=["ksparse:k=3,alpha=2"]),
                        (1, 28, 28), get_plugin_manager()).eval()
    return model, export_torchscript(model, tmp_path_factory.mktemp("ksparse") / "model.pt")


def _top(z, k):
    top = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, top.indices, top.values)


def test_exported_encode_gives_features_and_reconstruct_decodes_codes(ksparse_vae, digits, tmp_path):
    """encode returns (top-6(μ), log σ²), the features; reconstruct and sample decode top-3 codes, as the decoder was
    trained; an AOTInductor package (which reconstructs as decode(encode(x))) is refused, naming the way out."""
    from vaekit.export import export_aoti, features_differ

    model, path = ksparse_vae
    module = load_exported(path)
    features, logvar = module.encode(digits)
    with torch.no_grad():
        mu, expected_logvar = model.encode(digits).chunk(2, dim=-1)
        assert torch.allclose(features, _top(mu, 6), atol=1e-6) and torch.allclose(logvar, expected_logvar, atol=1e-6)
        assert torch.allclose(module.reconstruct(digits), model.decode_mean(_top(mu, 3)), atol=1e-6)
        z = torch.randn(4, 12, generator=torch.Generator().manual_seed(5))
        assert torch.allclose(module.sample(4, 5), model.decode_mean(_top(z, 3)), atol=1e-6)
    assert [reg.name for reg in features_differ(model)] == ["ksparse"]
    with pytest.raises(ConfigError, match=r"regularizer 'ksparse' gives features .*\(--format torchscript\)"):
        export_aoti(model, tmp_path / "never.pt2")
    assert not (tmp_path / "never.pt2").exists()
    model.regularizers[0].k_features = 3  # alpha = 1: features are the codes, nothing to refuse
    assert features_differ(model) == []


# --- the C++ runtime ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cpp_build(readme_build):
    """The runner built by cpp_runtime/README.md's Build commands (one build per pytest run, shared with
    tests/test_cpp_runtime.py)."""
    return readme_build / "build"


def _runner(build, *args):
    return subprocess.run([str(build / "vaekit-runner"), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cpp_runner_matches_python(cpp_build, exported, digits, tmp_path):
    model, path = exported
    torch.save(digits, tmp_path / "x.pt")
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    torch.save(z, tmp_path / "z.pt")
    for command, inp in (("encode", "x.pt"), ("decode", "z.pt"), ("reconstruct", "x.pt")):
        res = _runner(cpp_build, path, command, "--in", tmp_path / inp, "--out", tmp_path / f"{command}.pt")
        assert res.returncode == 0, res.stderr
    with torch.no_grad():
        params = model.encode(digits)
        expected = {
            "encode": params[:, :2], "encode.logvar": params[:, 2:],
            "decode": model.decode_mean(z), "reconstruct": model.reconstruct(digits),
        }
    for name, value in expected.items():
        got = torch.load(tmp_path / f"{name}.pt")
        assert (got - value).abs().max() <= 1e-5, name
    res = _runner(cpp_build, path, "sample", "-n", 6, "--seed", 11, "--out", tmp_path / "s.pt")
    assert res.returncode == 0, res.stderr
    assert torch.equal(torch.load(tmp_path / "s.pt"), load_exported(path).sample(6, 11))


def test_cpp_runner_bad_input_is_one_line(cpp_build, exported, tmp_path):
    _, path = exported
    torch.save(torch.rand(3, 5), tmp_path / "wrong.pt")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "other.pt"))
    cases = [
        ((tmp_path / "missing.pt", "encode", "--in", tmp_path / "wrong.pt"), "cannot open model file"),
        ((path, "encode", "--in", tmp_path / "missing.pt"), "cannot open tensor file"),
        ((path, "encode", "--in", tmp_path / "wrong.pt"), "wrong input shape: expected [N, 1, 28, 28], got [3, 5]"),
        ((tmp_path / "wrong.pt", "encode", "--in", tmp_path / "wrong.pt"), "not a TorchScript archive"),
        ((tmp_path / "other.pt", "encode", "--in", tmp_path / "wrong.pt"), "not a vaekit model"),
    ]
    for args, fragment in cases:
        res = _runner(cpp_build, *args, "--out", tmp_path / "o.pt")
        assert res.returncode == 1, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], res.stderr


def test_ctest_and_the_embedding_example(cpp_build, exported):
    _, path = exported
    env = dict(os.environ, VAEKIT_TEST_MODEL=str(path))
    res = subprocess.run(["ctest", "--test-dir", str(cpp_build), "--output-on-failure"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([str(cpp_build / "vaekit-embed-example"), str(path)], capture_output=True, text=True)
    assert res.returncode == 0 and "samples [8, 1, 28, 28]" in res.stdout, res.stdout + res.stderr


def test_readme_example_is_the_compiled_one():
    readme = (ROOT / "cpp_runtime" / "README.md").read_text()
    example = (ROOT / "cpp_runtime" / "examples" / "embed.cpp").read_text()
    assert f"```cpp\n{example}```" in readme
    assert len(example.strip().splitlines()) <= 25


# --- the AOTInductor package ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def aoti_package(trained_run, tmp_path_factory):
    from vaekit.export import export_aoti

    return export_aoti(vaekit.load_run(trained_run), tmp_path_factory.mktemp("aoti") / "model.pt2")


@pytest.mark.slow
def test_aoti_package_matches_the_python_model(aoti_package, exported, digits):
    model, ts_path = exported
    package = load_exported(aoti_package, trust=True)
    assert package.input_shape == [1, 28, 28] and package.latent_dim == 2
    assert package.config["config"]["encoder"]["name"] == "mlp"
    mu, logvar = package.encode(digits)
    with torch.no_grad():
        params = model.encode(digits)
        assert (mu - params[:, :2]).abs().max() <= 1e-5 and (logvar - params[:, 2:]).abs().max() <= 1e-5
        assert (package.reconstruct(digits) - model.reconstruct(digits)).abs().max() <= 1e-5
    # the same seeded draw of z as the TorchScript archive
    assert (package.sample(4, 9) - load_exported(ts_path).sample(4, 9)).abs().max() <= 1e-5


@pytest.mark.slow
def test_cpp_runtime_runs_the_aoti_package(cpp_build, aoti_package, digits, tmp_path):
    torch.save(digits, tmp_path / "x.pt")
    package = load_exported(aoti_package, trust=True)
    res = _runner(cpp_build, aoti_package, "sample", "--out", tmp_path / "s.pt")  # its native code needs an opt-in
    assert res.returncode == 1 and "--trust-native-code" in res.stderr and len(res.stderr.splitlines()) == 1
    res = _runner(cpp_build, aoti_package, "reconstruct", "--in", tmp_path / "x.pt", "--out", tmp_path / "r.pt",
                  "--trust-native-code")
    assert res.returncode == 0, res.stderr
    assert (torch.load(tmp_path / "r.pt") - package.reconstruct(digits)).abs().max() <= 1e-5
    res = _runner(cpp_build, aoti_package, "sample", "-n", 5, "--seed", 2, "--out", tmp_path / "s.pt",
                  "--trust-native-code")
    assert res.returncode == 0, res.stderr
    assert torch.equal(torch.load(tmp_path / "s.pt"), package.sample(5, 2))
    env = dict(os.environ, VAEKIT_TEST_MODEL=str(aoti_package))
    res = subprocess.run(["ctest", "--test-dir", str(cpp_build), "--output-on-failure"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_pt2_package_is_loaded_only_when_trusted(tmp_path, monkeypatch):
    import torch._inductor.package

    def no_native_code(*args, **kwargs):
        pytest.fail("load_package was called: the package's native code was loaded before the trust check")

    monkeypatch.setattr(torch._inductor.package, "load_package", no_native_code)
    (tmp_path / "model.pt2").write_bytes(b"PK\x03\x04 not really a package")
    with pytest.raises(CheckpointError) as refused:
        load_exported(tmp_path / "model.pt2")
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert "compiled native code that runs when it is loaded" in message and "trust=True" in message
    from vaekit.export import AOTIModel

    with pytest.raises(CheckpointError, match="trust=True"):  # the class itself checks too
        AOTIModel(tmp_path / "model.pt2")
    monkeypatch.undo()  # trusted: it reaches the real loader, which rejects this file in one line
    with pytest.raises(CheckpointError, match="not a loadable AOTInductor package"):
        load_exported(tmp_path / "model.pt2", trust=True)


@pytest.mark.parametrize("torch_helper", [True, False], ids=["temporary_cache_dir", "older-torch-fallback"])
def test_private_inductor_cache_is_fresh_and_restored(tmp_path, monkeypatch, torch_helper):
    import sys

    from vaekit.export import _private_inductor_cache

    if not torch_helper:  # a torch without torch._inductor.runtime.cache_dir_utils
        monkeypatch.setitem(sys.modules, "torch._inductor.runtime.cache_dir_utils", None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared"))
    with _private_inductor_cache() as cache:
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == cache and os.listdir(cache) == []
        assert not Path(cache).is_relative_to(tmp_path / "shared")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "shared") and not Path(cache).exists()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    with _private_inductor_cache():
        pass
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_aoti_needs_a_pt2_name(trained_run, tmp_path):
    from vaekit.export import export_aoti

    with pytest.raises(ConfigError, match="must end in .pt2"):
        export_aoti(vaekit.load_run(trained_run), tmp_path / "model.pt")


@pytest.mark.slow
def test_aoti_exports_in_sequence_never_share_compiled_code(tmp_path, monkeypatch, small_mnist):
    """Three exports through one shared Inductor cache: a latent-16 k-sparse model, a latent-2 model (other
    shapes), then a latent-2 model of the same architecture with other weights; each package must be its own
    model.  The k-sparse one also shows a package's encode carries the latent transform (its codes have at
    most k non-zeros and equal model.embed; reconstruct decodes them), exported without sampling (a package
    cannot apply the transform to prior draws)."""
    from vaekit.export import export_aoti

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared-inductor-cache"))
    runs = {name: vaekit.train(data="mnist:train_per_class=10,test_per_class=2", encoder="mlp:hidden=32",
                               latent_dim=latent, seed=seed, epochs=1, out=str(tmp_path / name), quiet=True,
                               figures=False, regularizers=regs).run_dir
            for name, latent, seed, regs in (("z16", 16, 0, ["ksparse:k=5"]), ("z2", 2, 0, []), ("z2-seed1", 2, 1, []))}
    packages = {name: export_aoti(vaekit.load_run(run), tmp_path / f"{name}.pt2", sampling=name != "z16")
                for name, run in runs.items()}
    x = small_mnist.test_x[:8]
    for name, run in runs.items():
        model, package = vaekit.load_run(run), load_exported(packages[name], trust=True)
        with torch.no_grad():
            params, code, recon = model.encode(x), model.embed(x), model.reconstruct(x)
            z = torch.randn(5, model.latent_dim, generator=torch.Generator().manual_seed(0))
            expected_decode = model.decode_mean(z)
        mu, logvar = package.encode(x)
        assert package.latent_dim == model.latent_dim, name
        assert mu.shape == logvar.shape == (8, model.latent_dim), (name, mu.shape)
        d = model.latent_dim
        assert (mu - code).abs().max() <= 1e-5 and (logvar - params[:, d:]).abs().max() <= 1e-5, name
        assert (package.decode(z) - expected_decode).abs().max() <= 1e-5, name
        assert (package.reconstruct(x) - recon).abs().max() <= 1e-5, name
    k_sparse = load_exported(packages["z16"], trust=True).encode(x)[0]
    assert int((k_sparse != 0).sum(1).max()) <= 5 and not torch.equal(k_sparse, vaekit.load_run(runs["z16"]).encode(x)[:, :16])
    # the two latent-2 models really differ, so the last check is not vacuous
    assert (load_exported(packages["z2"], trust=True).encode(x)[0]
            - load_exported(packages["z2-seed1"], trust=True).encode(x)[0]).abs().max() > 1e-2


def _prior_variants():
    from torch.distributions import Independent, Normal

    from vaekit.plugins.priors import GaussianPrior

    class LogSigmaHead(GaussianPrior):
        """Reads its head as [μ, log σ] — not what an archive's encode returns."""

        def posterior(self, params):
            mu, log_sigma = params.chunk(2, dim=-1)
            return Independent(Normal(mu, log_sigma.exp()), 1)

    class OwnSampler(GaussianPrior):
        """N(0, I) as a distribution, but a sampler of its own (here: every z scaled by 2)."""

        def sample(self, n, generator=None):
            return 2 * super().sample(n, generator)

    return LogSigmaHead, OwnSampler


def test_export_refuses_what_it_cannot_carry(tmp_path):
    """A head read as [μ, log σ] and a prior with its own sampler are refused by name, not exported wrongly."""
    from vaekit.testing import composed_model

    LogSigmaHead, OwnSampler = _prior_variants()
    with pytest.raises(ConfigError, match="posterior is not N\\(μ, σ²\\) with parameters \\[μ, log σ²\\]"):
        export_torchscript(composed_model(LogSigmaHead(4)), tmp_path / "a.pt")
    model = composed_model(OwnSampler(4))
    with pytest.raises(ConfigError, match="cannot export sampling from the prior"):
        export_torchscript(model, tmp_path / "b.pt")
    module = load_exported(export_torchscript(model, tmp_path / "b.pt", sampling=False))
    with pytest.raises(Exception, match="exported without sampling"):
        module.sample(2, 0)
    exported = load_exported(export_torchscript(composed_model(), tmp_path / "c.pt"))  # the plain gaussian prior
    assert exported.can_sample


def test_full_covariance_export_gives_the_marginals(tmp_path, small_mnist):
    """A ``gaussian:covariance=full`` model exports to TorchScript: encode returns μ and the log of the posterior's
    marginal variances diag(LLᵀ) (torch's MultivariateNormal.variance), reconstruct and sample(n, seed) match Python."""
    run = vaekit.train(data="mnist:train_per_class=10,test_per_class=2", encoder="mlp:hidden=32", latent_dim=3,
                       prior="gaussian:covariance=full", epochs=1, out=str(tmp_path / "full"), quiet=True, figures=False)
    model = vaekit.load_run(run.run_dir).eval()
    module = load_exported(export_torchscript(model, tmp_path / "full.pt"))
    x = small_mnist.test_x[:20]
    mu, logvar = module.encode(x)
    with torch.no_grad():
        q = model.prior.posterior(model.encode(x))
        assert torch.allclose(mu, q.mean, atol=1e-6) and torch.allclose(logvar, q.variance.log(), atol=1e-5)
        assert (q.scale_tril[:, 1:, 0].abs() > 1e-3).any()  # L has off-diagonal entries: not the diagonal case
        assert torch.allclose(module.reconstruct(x), model.reconstruct(x), atol=1e-6)
        assert (module.sample(5, 3) - model.sample(5, torch.Generator().manual_seed(3))).abs().max() <= 1e-6
