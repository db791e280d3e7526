"""Greedy layer-wise pretraining (``--pretrain layerwise``): the stacked (denoising) autoencoder."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import vaekit
from vaekit.cli import build_app
from vaekit.config import RunConfig
from vaekit.training import Trainer

DATA = "mnist:train_per_class=50,test_per_class=10"
STACK = dict(data=DATA, encoder="mlp:hidden=256,256,512", prior="none", latent_dim=10, batch_size=25)


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _test_mse(model, x):
    with torch.no_grad():
        return (model.reconstruct(x) - x).square().mean().item()


def test_stages_learn_and_the_pretrained_stack_reconstructs(tmp_path):
    """Each stage's loss falls over its epochs, and the stack after pretraining alone (no end-to-end
    epoch; its decoder assembled from the stages' decoder layers) reconstructs test digits far better
    than the same architecture at its random initialization and better than the best code-blind
    reconstruction, the mean training digit (MSE seen 0.053 vs 0.231 and 0.069; scikit-learn's
    10-component PCA, for scale: 0.037)."""
    t = Trainer(RunConfig(**STACK, pretrain="layerwise:epochs=5,lr=3e-3", out=str(tmp_path / "r")), quiet=True)
    t.setup()
    random_init = copy.deepcopy(t.model)
    t.pretraining.run(t)
    stages = [m for m in _lines(t.run_dir) if m.get("stage") == "pretrain"]
    assert [(m["layer"], m["epoch"]) for m in stages] == [(i, e) for i in (1, 2, 3, 4) for e in (1, 2, 3, 4, 5)]
    for layer in (1, 2, 3, 4):
        losses = [m["train_loss"] for m in stages if m["layer"] == layer]
        assert losses[-1] < 0.9 * losses[0], (layer, losses)
    x = t.data.test_x
    pretrained, fresh = _test_mse(t.model, x), _test_mse(random_init, x)
    mean_digit = (x - t.data.train_x.mean(0)).square().mean().item()
    assert pretrained < 0.4 * fresh and pretrained < 0.85 * mean_digit, (pretrained, fresh, mean_digit)


def test_pretraining_helps_fine_tuning(tmp_path):
    """What the stacked AE exists for: after the same end-to-end epochs, the layer-wise pretrained
    stack reconstructs the test digits better than the same stack trained from scratch
    (test −log p(x|z) seen 151.7 vs 205.0 nats; the review's measurement)."""
    args = dict(STACK, epochs=5, quiet=True, figures=False)
    stacked = vaekit.train(pretrain="layerwise:epochs=5,lr=3e-3", out=str(tmp_path / "stacked"), **args)
    scratch = vaekit.train(out=str(tmp_path / "scratch"), **args)
    nll = [-run.history[-1]["test_log_px"] for run in (stacked, scratch)]
    assert nll[0] < 0.85 * nll[1], nll


def test_the_last_stage_pretrains_on_the_codes_the_decoder_reads(tmp_path):
    """With a latent transform (the sparse AE's sigmoid) the last stage's code is the decoder's code,
    sigmoid(head(h)), so the head and the mirrored decoder's first layer are pretrained on what fine-tuning decodes:
    the pretrained stack (no end-to-end epoch) reconstructs test digits better than the same stages pretrained on
    the raw code head(h) (the old stage, which the decoder then read through a sigmoid it never saw).
    Seen: MSE 0.077 vs 0.113 (seeds 1, 2: 0.074 vs 0.104, 0.073 vs 0.112; ratios 0.65-0.71)."""
    def pretrained(raw_code: bool, out: str):
        t = Trainer(RunConfig(data="mnist:train_per_class=30,test_per_class=10", encoder="mlp:hidden=128", prior="none",
                              latent_dim=32, batch_size=25, regularizers=["sparsity"], pretrain="layerwise:epochs=4,lr=3e-3",
                              out=str(tmp_path / out)), quiet=True)
        t.setup()
        model, last = t.model, t.pretraining.stages[-1]
        h = model.encoder(t.data.test_x[:4])
        with torch.no_grad():
            assert torch.allclose(last.encode(h), torch.sigmoid(model.head(h)))
        if raw_code:
            last.encode = lambda h: model.head(h)
        t.pretraining.run(t)
        return _test_mse(model.eval(), t.data.test_x)

    new, raw = pretrained(False, "code"), pretrained(True, "raw")
    assert new < 0.85 * raw, (new, raw)


def test_a_decoder_that_is_not_the_mirror_keeps_its_initialization(tmp_path, capsys):
    t = Trainer(RunConfig(data="mnist:train_per_class=10,test_per_class=2", encoder="mlp:hidden=64,64", prior="none",
                          decoder="mlp:hidden=64", pretrain="layerwise:epochs=1", out=str(tmp_path / "r")),
                quiet=False, progress=False)
    t.setup()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.pretraining.run(t)
    after = t.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert not torch.equal(before["encoder.net.0.weight"], after["encoder.net.0.weight"])
    assert "the encoder only (the decoder does not mirror it)" in " ".join(capsys.readouterr().err.split())


def test_resume_skips_pretraining_and_keeps_its_lines(tmp_path):
    """The pretraining lines stay in metrics.jsonl and out of the history; a resumed run does not
    pretrain again and ends bit-identical to the uninterrupted run."""
    args = dict(STACK, data="mnist:train_per_class=20,test_per_class=5", encoder="mlp:hidden=64,128", batch_size=50,
                pretrain="layerwise:epochs=1", quiet=True, figures=False)
    full = vaekit.train(epochs=2, out=str(tmp_path / "full"), **args)
    vaekit.train(epochs=1, out=str(tmp_path / "part"), **args)
    before = _lines(tmp_path / "part")
    resumed = vaekit.training.resume(tmp_path / "part", epochs=2, quiet=True, figures=False)
    assert [m["epoch"] for m in full.history] == [m["epoch"] for m in resumed.history] == [1, 2]
    lines = _lines(resumed.run_dir)
    assert [m.get("stage") for m in lines] == ["pretrain"] * 3 + [None, None]
    assert lines[:4] == before
    w1, w2 = load_file(full.run_dir / "model.safetensors"), load_file(resumed.run_dir / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


class _InterruptAtFitStart:
    """A plugin that stops a run right after pretraining, as a Ctrl-C there would."""

    @vaekit.hookimpl
    def vaekit_fit_start(self, trainer):
        raise KeyboardInterrupt


def test_a_run_interrupted_after_pretraining_resumes_from_the_pretrained_weights(tmp_path):
    """Pretraining ends with a checkpoint ("epoch 0"): a run stopped before its first epoch resumes
    without pretraining again and ends bit-identical to the uninterrupted run."""
    from vaekit.manager import PluginManager

    args = dict(STACK, data="mnist:train_per_class=20,test_per_class=5", encoder="mlp:hidden=64,128", batch_size=50,
                pretrain="layerwise:epochs=1", quiet=True, figures=False)
    with pytest.raises(KeyboardInterrupt):
        vaekit.train(epochs=2, out=str(tmp_path / "part"), pm=PluginManager([_InterruptAtFitStart()], autoload=False),
                     **args)
    assert (tmp_path / "part" / "trainer_state.safetensors").exists()
    resumed = vaekit.training.resume(tmp_path / "part", quiet=True, figures=False)
    full = vaekit.train(epochs=2, out=str(tmp_path / "full"), **args)
    assert [m.get("stage") for m in _lines(resumed.run_dir)] == ["pretrain"] * 3 + [None, None]
    w1, w2 = load_file(full.run_dir / "model.safetensors"), load_file(resumed.run_dir / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_stacked_autoencoder_from_the_cli(tmp_path):
    """The issue's command on a small subset: pretraining lines, one training epoch, eval works."""
    app = build_app()
    out = tmp_path / "sae"
    res = CliRunner().invoke(app, ["run", "--data", "mnist:train_per_class=20,test_per_class=5", "--encoder",
                                   "mlp:hidden=500,500,2000", "--prior", "none", "--pretrain", "layerwise:epochs=1,mask=0.2",
                                   "--epochs", "1", "--no-progress", "--out", str(out)])
    assert res.exit_code == 0, res.output
    err = " ".join(res.stderr.split())
    assert "pretraining 4 layers greedily, 1 epochs each, mask 0.2: the encoder and the mirrored decoder" in err
    assert all(f"pretrain layer {i}/4 epoch 1/1 loss" in err for i in (1, 2, 3, 4))
    lines = _lines(out)
    assert [m.get("layer") for m in lines] == [1, 2, 3, 4, None] and lines[-1]["epoch"] == 1
    info = json.loads((out / "config.json").read_text())["config"]
    assert info["pretrain"] == {"name": "layerwise", "options": {"epochs": 1, "lr": None, "mask": 0.2}}
    assert info["decoder"]["options"]["hidden"] == [2000, 500, 500]
    assert (out / "loss.png").exists()
    ev = CliRunner().invoke(app, ["eval", str(out), "--json"])
    assert ev.exit_code == 0, ev.output


@pytest.mark.parametrize("args,fragment", [
    (["--pretrain", "layerwise:epochs=0"], "epochs must be at least 1, got 0"),
    (["--pretrain", "layerwise:mask=0.2,epoch=2"], "pretraining method 'layerwise' has no option 'epoch'"),
    (["--pretrain", "layerwise", "--encoder", "conv"], "--pretrain layerwise needs an encoder made of Linear layers"),
])
def test_bad_pretraining_is_one_line(args, fragment, tmp_path):
    res = CliRunner().invoke(build_app(), ["run", "--data", "mnist:train_per_class=10,test_per_class=2", "--epochs", "1",
                                           "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 1
    errors = [line for line in res.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], res.stderr
    assert not (tmp_path / "r").exists()
