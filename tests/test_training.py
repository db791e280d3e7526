import json

import plugin_for_tests
import pytest
import torch
from safetensors.torch import load_file

import vaekit
from vaekit.errors import ConfigError, TrainingError
from vaekit.manager import PluginManager

from conftest import SMALL_MNIST

FAST = dict(data=SMALL_MNIST, encoder="mlp:hidden=64", latent_dim=4, batch_size=50, quiet=True, figures=False)


@pytest.fixture(scope="module")
def test_pm():
    return PluginManager(extra_plugins=[plugin_for_tests], autoload=False)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_improves_the_test_elbo(trained_run):
    history = _metrics(trained_run)
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[-1]["test_elbo"] > history[0]["test_elbo"] + 20  # nats
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "reconstructions.png", "samples.png",
                 "latent.png", "manifold.png", "loss.png"):
        assert (trained_run / name).exists(), name


def test_same_seed_same_run_on_cpu(tmp_path):
    a = vaekit.train(epochs=1, out=str(tmp_path / "a"), **FAST)
    b = vaekit.train(epochs=1, out=str(tmp_path / "b"), **FAST)
    c = vaekit.train(epochs=1, out=str(tmp_path / "c"), seed=1, **FAST)
    wa, wb, wc = (load_file(r.run_dir / "model.safetensors") for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a.metrics["test_elbo"] == b.metrics["test_elbo"]


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    full = vaekit.train(epochs=2, out=str(tmp_path / "full"), **FAST)
    vaekit.train(epochs=1, out=str(tmp_path / "part"), **FAST)
    resumed = vaekit.training.resume(tmp_path / "part", epochs=2, quiet=True, figures=False)
    w1, w2 = load_file(full.run_dir / "model.safetensors"), load_file(resumed.run_dir / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [m["epoch"] for m in _metrics(resumed.run_dir)] == [1, 2]
    assert _metrics(resumed.run_dir)[1]["test_elbo"] == _metrics(full.run_dir)[1]["test_elbo"]


def test_existing_run_dir_is_not_overwritten(tmp_path):
    vaekit.train(epochs=1, out=str(tmp_path / "r"), **FAST)
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        vaekit.train(epochs=1, out=str(tmp_path / "r"), **FAST)
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before


def test_a_run_that_never_checkpointed_can_be_started_again(tmp_path, test_pm):
    """A run that fails before its first checkpoint leaves only config.json: --resume starts it again
    from epoch 1 with its recorded config (here: the same NaN again), and the same command, run again,
    starts it afresh."""
    out = str(tmp_path / "r")
    with pytest.raises(TrainingError, match="holds no checkpoint"):
        vaekit.train(epochs=1, out=out, likelihood="nan_after:step=1", pm=test_pm, **FAST)
    assert (tmp_path / "r" / "config.json").exists() and not (tmp_path / "r" / "model.safetensors").exists()
    with pytest.raises(TrainingError, match=r"at step 1 \(epoch 1\).*vaekit run --resume .* starts it again"):
        vaekit.training.resume(out, quiet=True, pm=test_pm)
    again = vaekit.train(epochs=1, out=out, **FAST)
    assert [m["epoch"] for m in _metrics(again.run_dir)] == [1]
    with pytest.raises(ConfigError, match="already holds a run"):  # now it has a checkpoint: never overwritten
        vaekit.train(epochs=1, out=out, **FAST)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, test_pm):
    out = tmp_path / "nan"
    # 300 training digits, batch 100: 3 steps per epoch; the 5th training step is in epoch 2
    with pytest.raises(TrainingError, match=r"loss became nan at step 5 \(epoch 2\).*last good checkpoint \(epoch 1\)"):
        vaekit.train(epochs=3, out=str(out), likelihood="nan_after:step=5", pm=test_pm,
                     **{**FAST, "batch_size": 100})
    assert [m["epoch"] for m in _metrics(out)] == [1]
    model = vaekit.load_run(out, pm=test_pm)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_regularizers_penalties_own_optimizers_and_logging(tmp_path, test_pm):
    """vaekit_register_regularizers: penalties are added and logged; own optimizers step alternately."""
    plain = vaekit.train(epochs=3, out=str(tmp_path / "plain"), pm=test_pm, **FAST)
    reg = vaekit.train(epochs=3, out=str(tmp_path / "reg"), pm=test_pm,
                       regularizers=["code_l2:weight=20", "tracker"], **FAST)
    m = reg.metrics
    assert {"train_code_l2", "train_tracker", "train_tracker_loss"} <= set(m)
    # the penalty does what it exists for: smaller codes than without it
    data = vaekit.training.load_data(vaekit.PluginSpec.parse(SMALL_MNIST), test_pm)
    with torch.no_grad():
        z_reg = reg.model.embed(data.test_x).square().sum(1).mean()
        z_plain = plain.model.embed(data.test_x).square().sum(1).mean()
    assert z_reg < 0.5 * z_plain
    # the tracker's parameter is stepped by its own optimizer only, and tracks the mean code
    tracker = reg.model.regularizers[1]
    with torch.no_grad():
        mean_code = reg.model.embed(data.train_x).mean(0)
    assert torch.allclose(tracker.m, mean_code, atol=0.3)


def test_regularizer_parameters_belong_to_their_own_optimizer(tmp_path, test_pm):
    from vaekit.config import RunConfig
    from vaekit.training import Trainer

    t = Trainer(RunConfig(data=SMALL_MNIST, encoder="mlp", regularizers=["tracker"], out=str(tmp_path / "t")),
                test_pm, quiet=True)
    t.setup()
    m = t.model.regularizers[0].m
    ids = {name: {id(p) for g in opt.param_groups for p in g["params"]} for name, opt in t.optimizers.items()}
    assert id(m) not in ids["model"] and ids["regularizer0"] == {id(m)}


def test_corrupt_applies_in_training_only_and_transform_always(test_pm):
    from vaekit.config import RunConfig
    from vaekit.model import build_model

    model = build_model(RunConfig(encoder="mlp", regularizers=["zero_half"]), (1, 28, 28), test_pm)
    x = torch.rand(2, 1, 28, 28)
    rec = model.train()(x)
    assert torch.equal(rec.x, x) and rec.x_input.flatten(1)[:, :392].abs().sum() == 0
    rec = model.eval()(x)
    assert torch.equal(rec.x_input, x)
    params = model.encode(x)
    assert torch.allclose(model.embed(x), 0.5 * model.prior.mean(params))


def test_fit_lifecycle_hooks(tmp_path, test_pm):
    """vaekit_fit_start, vaekit_epoch_end and vaekit_fit_end are called in order; epoch_end may add metrics."""
    plugin_for_tests.CALLS.clear()
    vaekit.train(epochs=2, out=str(tmp_path / "h"), pm=test_pm, **FAST)
    assert plugin_for_tests.CALLS == [("fit_start", 1), ("epoch_end", 1), ("epoch_end", 2), ("fit_end", 2)]
    assert [m["plugin_note"] for m in _metrics(tmp_path / "h")] == [10, 20]


def test_custom_dataset_encoder_decoder_prior(tmp_path, test_pm):
    res = vaekit.train(data="tiny", encoder="identity", decoder="affine", prior="fixed", latent_dim=3,
                       epochs=2, out=str(tmp_path / "t"), pm=test_pm, quiet=True, figures=False)
    assert "test_log_px" in res.metrics and "test_elbo" not in res.metrics


def _binary_rows(x):
    """Rows of a 0/1 tensor ``[N, 16]`` as sorted integers: the multiset of rows, whatever their order."""
    return (x.long() << torch.arange(x.shape[1])).sum(1).sort().values


def _seen_over_epochs(tmp_path, test_pm, binarize, epochs):
    """The inputs of each training epoch (``[200, 16]`` each) on 200 copies of the grey ramp, and the ramp."""
    res = vaekit.train(data="grey:n=200", encoder="identity", decoder="affine", latent_dim=2, binarize=binarize,
                       regularizers=["recorder"], epochs=epochs, batch_size=100, out=str(tmp_path / binarize),
                       pm=test_pm, quiet=True, figures=False)
    grey = vaekit.training.load_data(vaekit.PluginSpec.parse("grey:n=200"), test_pm).train_x[0]
    return res.model.regularizers[0].seen(), grey


def test_dynamic_binarization_draws_fresh_binary_samples_each_epoch(tmp_path, test_pm):
    """Dynamic binarization: every epoch a fresh Bernoulli draw with the grey level as probability (the data are the reference)."""
    epochs = 8
    seen, grey = _seen_over_epochs(tmp_path, test_pm, "dynamic", epochs)
    assert len(seen) == epochs and all(s.shape == (200, 16) for s in seen)
    assert all(((s == 0) | (s == 1)).all() for s in seen)
    for a, b in zip(seen, seen[1:]):
        assert not torch.equal(_binary_rows(a), _binary_rows(b))  # fresh draws, not a reshuffle of the same ones
    # the frequency of 1s per pixel over 8 x 200 draws is the grey level, within 4 binomial standard errors
    freq = torch.stack(seen).mean((0, 1))
    se = (grey * (1 - grey) / (epochs * 200)).sqrt()
    assert ((freq - grey).abs() <= 4 * se).all(), (freq, grey)
    # and the first epoch alone (200 draws) is further off than all eight: it approaches the grey level
    first = seen[0].mean(0)
    assert (first - grey).square().mean() > (freq - grey).square().mean()


def test_static_binarization_is_fixed_and_gaussian_data_are_not_binarized(tmp_path, test_pm):
    from vaekit.config import RunConfig
    from vaekit.training import Trainer

    t = Trainer(RunConfig(data=SMALL_MNIST, encoder="mlp", binarize="static", out=str(tmp_path / "s")), quiet=True)
    t.setup()
    assert set(t.train_x.unique().tolist()) == {0.0, 1.0}
    seen, grey = _seen_over_epochs(tmp_path, test_pm, "static", 2)
    assert all(((s == 0) | (s == 1)).all() for s in seen)
    assert torch.equal(_binary_rows(seen[0]), _binary_rows(seen[1]))  # the same draws, reshuffled
    t = Trainer(RunConfig(data=SMALL_MNIST, encoder="mlp", likelihood="gaussian", out=str(tmp_path / "g")), quiet=True)
    t.setup()
    assert t.binarize == "none" and len(t.train_x.unique()) > 2


def test_bernoulli_rejects_data_outside_unit_interval(tmp_path):
    import numpy as np

    np.save(tmp_path / "big.npy", np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32))
    with pytest.raises(vaekit.DataError, match="bernoulli likelihood needs the training data in \\[0, 1\\]"):
        vaekit.train(data=str(tmp_path / "big.npy"), encoder="mlp", out=str(tmp_path / "r"), quiet=True)


def test_fused_op_and_eager_formula_train_to_the_same_figures(tmp_path, monkeypatch):
    import vaekit.plugins.priors as priors

    calls = []
    real = priors.reparameterize_kl
    monkeypatch.setattr(priors, "reparameterize_kl", lambda mu, lv: calls.append(1) or real(mu, lv))
    fused = vaekit.train(epochs=2, out=str(tmp_path / "fused"), **FAST)
    n = len(calls)
    assert n >= fused.metrics["step"]  # the gaussian prior goes through the op by default (train and test)
    eager = vaekit.train(epochs=2, prior="gaussian:fused=false", out=str(tmp_path / "eager"), **FAST)
    assert len(calls) == n
    assert eager.metrics["test_elbo"] == pytest.approx(fused.metrics["test_elbo"], abs=0.05)
    assert eager.metrics["train_kl"] == pytest.approx(fused.metrics["train_kl"], abs=0.05)


def test_a_failing_figure_never_loses_the_run(tmp_path, monkeypatch, capsys):
    from vaekit import viz

    def broken(*args, **kwargs):
        raise NotImplementedError("seeded sampling of Weird is not implemented")

    monkeypatch.setattr(viz, "plot_samples", broken)
    result = vaekit.train(epochs=1, out=str(tmp_path / "r"), **{**FAST, "figures": True})  # quiet: warnings still show
    assert result.metrics["epoch"] == 1 and (result.run_dir / "model.safetensors").exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: samples.png not written (NotImplementedError: seeded sampling of Weird is not implemented)"]
    assert not (result.run_dir / "samples.png").exists()
    assert all((result.run_dir / f).exists() for f in ("reconstructions.png", "latent.png", "loss.png"))


def test_no_figures_flag(tmp_path):
    from typer.testing import CliRunner

    from vaekit.cli import build_app

    out = tmp_path / "r"
    res = CliRunner().invoke(build_app(), ["run", "--data", SMALL_MNIST, "--encoder", "mlp:hidden=16", "--epochs", "1",
                                           "--no-figures", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").exists() and not list(out.glob("*.png"))


# --- --init RUN ---------------------------------------------------------------------------------

AE = dict(FAST, prior="none", lr=3e-3)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A small MLP autoencoder trained 4 epochs: the run the --init tests start from."""
    return vaekit.train(epochs=4, out=str(tmp_path_factory.mktemp("init") / "src"), **AE)


def test_init_copies_the_source_weights_by_name_and_keeps_the_new_runs_own(source_run, tmp_path, capsys):
    """Every tensor the runs share by name starts at the source's value (read back with safetensors);
    a new regularizer's parameter keeps its initialization; the likelihood's fixed σ stays this run's."""
    from vaekit.config import RunConfig
    from vaekit.training import Trainer

    pm = PluginManager(extra_plugins=[plugin_for_tests], autoload=False)
    cfg = RunConfig.from_dict({**{k: v for k, v in AE.items() if k not in ("quiet", "figures")}, "epochs": 1,
                               "regularizers": ["tracker"], "init": str(source_run.run_dir),
                               "out": str(tmp_path / "ft")})
    t = Trainer(cfg, pm, quiet=False, progress=False)
    t.setup()
    source = load_file(source_run.run_dir / "model.safetensors")
    own = t.model.state_dict()
    shared = [k for k in own if k in source]
    assert len(shared) == len(source) == len(own) - 1  # all but the tracker's m
    assert all(torch.equal(own[k], source[k]) for k in shared)
    assert torch.equal(own["regularizers.0.m"], torch.zeros(4))  # MeanTracker starts at 0
    assert f"initialized {len(shared)} of {len(own)} tensors from {source_run.run_dir}" in capsys.readouterr().err
    info = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert info["config"]["init"] == str(source_run.run_dir.resolve())

    gsrc = vaekit.train(epochs=1, out=str(tmp_path / "gsrc"), **{**AE, "likelihood": "gaussian:sigma=0.2"})
    sigma = Trainer(RunConfig(data=SMALL_MNIST, encoder="mlp:hidden=64", prior="none", latent_dim=4,
                              likelihood="gaussian:sigma=0.05", init=str(gsrc.run_dir), out=str(tmp_path / "g")),
                    quiet=True)
    sigma.setup()
    assert torch.all(sigma.model.likelihood.sigma() == 0.05)
    assert torch.equal(sigma.model.head.weight, load_file(gsrc.run_dir / "model.safetensors")["head.weight"])


def test_fine_tuning_from_a_run_starts_at_its_loss(source_run, tmp_path):
    """The first epoch of a run initialized from another is no worse than the source's last
    (it continues, seen 224 vs 248 nats) and far below a fresh run's first (seen 514)."""
    tuned = vaekit.train(epochs=1, init=str(source_run.run_dir), out=str(tmp_path / "ft"), **AE)
    fresh = vaekit.train(epochs=1, out=str(tmp_path / "fresh"), **AE)
    last, first, scratch = source_run.history[-1]["train_loss"], tuned.history[0]["train_loss"], fresh.history[0]["train_loss"]
    assert first <= 1.02 * last and first < 0.6 * scratch, (first, last, scratch)


def test_resume_does_not_initialize_again(source_run, tmp_path):
    """A resumed --init run continues from its own checkpoint, even with the source run gone:
    bit-identical to the uninterrupted run."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(source_run.run_dir, source)
    full = vaekit.train(epochs=2, init=str(source), out=str(tmp_path / "full"), **AE)
    vaekit.train(epochs=1, init=str(source), out=str(tmp_path / "part"), **AE)
    shutil.rmtree(source)  # resume must not need it
    resumed = vaekit.training.resume(tmp_path / "part", epochs=2, quiet=True, figures=False)
    w1, w2 = load_file(full.run_dir / "model.safetensors"), load_file(resumed.run_dir / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_init_errors(source_run, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ConfigError, match=r"encoder\.net\.0\.weight has shape \[64, 784\] there but \[32, 784\] in this model"):
        vaekit.train(epochs=1, init=str(source_run.run_dir), out=str(tmp_path / "a"), **{**AE, "encoder": "mlp:hidden=32"})
    with pytest.raises(vaekit.CheckpointError, match="run directory .*nowhere.* does not exist"):
        vaekit.train(epochs=1, init=str(tmp_path / "nowhere"), out=str(tmp_path / "b"), **AE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(vaekit.CheckpointError, match="model.safetensors' is missing"):
        vaekit.train(epochs=1, init=str(tmp_path / "empty"), out=str(tmp_path / "c"), **AE)
    (tmp_path / "foreign").mkdir()
    save_file({"backbone.fc.weight": torch.zeros(2, 2)}, tmp_path / "foreign" / "model.safetensors")
    with pytest.raises(ConfigError, match="none of its tensors .*backbone.fc.weight.* has a name in this model"):
        vaekit.train(epochs=1, init=str(tmp_path / "foreign"), out=str(tmp_path / "d"), **AE)
    assert not any((tmp_path / name).exists() for name in "abcd")  # a failed init writes no run directory
