"""End-to-end CLI tests on real MNIST digits, and one readable line for each kind of bad input."""

import json
import shutil

import numpy as np
import plugin_for_tests
import pytest
from typer.testing import CliRunner

from vaekit.cli import build_app
from vaekit.manager import PluginManager

from conftest import SMALL_MNIST

runner = CliRunner()
APP = build_app()
TINY = ["--data", "mnist:train_per_class=10,test_per_class=2", "--epochs", "1", "--no-progress"]


def invoke(*args, app=APP):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "conv-vae"
    result = invoke("run", "--data", SMALL_MNIST, "--encoder", "conv:channels=8,16,hidden=64", "--prior", "gaussian",
                    "--latent-dim", "2", "--epochs", "2", "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_run_writes_a_complete_run_directory(cli_run):
    out, result = cli_run
    assert f"run written to {out}" in result.stdout
    assert "epoch 2/2" in result.stderr and "test_elbo" in result.stderr
    assert "pixels uint8 / 255" in " ".join(result.stderr.split())  # the header line, wrapped by the console
    for name in ("config.json", "model.safetensors", "trainer_state.safetensors", "metrics.jsonl",
                 "reconstructions.png", "samples.png", "latent.png", "manifold.png", "loss.png"):
        assert (out / name).is_file(), name
    info = json.loads((out / "config.json").read_text())
    assert info["config"]["encoder"] == {"name": "conv", "options": {"channels": [8, 16], "hidden": 64, "activation": "relu"}}
    # the decoder mirrors the encoder: channels reversed, hidden and activation kept
    assert info["config"]["decoder"] == {"name": "conv", "options": {"channels": [16, 8], "hidden": 64, "activation": "relu"}}
    assert info["config"]["binarize"] == "dynamic"
    assert info["data"] == {"name": "mnist", "shape": [1, 28, 28], "n_train": 300, "n_test": 100, "num_classes": 10,
                            "scaling": "uint8 / 255"}
    assert set(info["versions"]) == {"vaekit", "torch", "python"}


def test_eval_json_and_table(cli_run):
    out, _ = cli_run
    res = invoke("eval", out, "--nll-samples", "50", "--json")
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout)
    assert figures["n"] == 100 and figures["nll_samples"] == 50
    assert figures["nll"] <= -figures["elbo"] + 0.5  # the importance-sampled bound is tighter
    assert 0 < figures["nll_mc_se"] < figures["nll_se"] < 10  # nats; the literature's table gives NLL ± se
    assert figures["nll_rows_per_s"] == pytest.approx(100 * 50 / figures["nll_seconds"])  # decoder rows N·K per s
    # all K draws of a batch are made at once: a budget of one decoder row a chunk gives the same estimate
    tiny = json.loads(invoke("eval", out, "--nll-samples", "50", "--json", "--memory-budget-mib", "0.0001").stdout)
    assert tiny["nll"] == pytest.approx(figures["nll"], abs=1e-4)  # seen: 3e-7 nats apart (a conv run, K = 5)
    table = invoke("eval", out, "-k", "5")
    assert table.exit_code == 0 and "NLL (importance-sampled)" in table.stdout
    assert "decoder rows per second" in table.stdout and "NLL time" in table.stdout
    assert "standard error over test points" in table.stdout and "Monte-Carlo standard error" in table.stdout


def test_sample_writes_a_png(cli_run, tmp_path):
    out, _ = cli_run
    res = invoke("sample", out, "-n", "9", "--out", tmp_path / "s.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plugins_listing():
    res = invoke("plugins", "--json")
    listing = json.loads(res.stdout)
    assert {p["name"] for p in listing["encoder"]} >= {"conv", "mlp"}
    conv = next(p for p in listing["encoder"] if p["name"] == "conv")
    assert conv["source"] == "builtin" and conv["options"]["channels"]["default"] == [32, 64]
    table = invoke("plugins")
    assert table.exit_code == 0 and "likelihoods" in table.stdout and "bernoulli" in table.stdout


def test_plugin_commands_are_added_and_their_errors_are_one_line():
    """vaekit_register_commands adds commands to the CLI."""
    app = build_app(PluginManager(extra_plugins=[plugin_for_tests], autoload=False))
    res = invoke("hello", "--name", "vae", app=app)
    assert res.exit_code == 0 and "hello vae" in res.stdout
    assert_one_line_error(invoke("hello", "--name", "error", app=app), "a plugin command failed cleanly")


# --- bad input: one line, exit code 1, no traceback ---------------------------------------------

@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--encoder", "convv"], "unknown encoder 'convv'; known encoders: conv, linear, mlp; did you mean 'conv'?"),
        (["--prior", "gauss"], "unknown prior 'gauss'"),
        (["--encoder", "conv:chanels=8"], "encoder 'conv' has no option 'chanels'"),
        (["--encoder", "mlp:hidden=wide"], "option 'hidden': 'wide' must be a comma-separated list of int"),
        (["--latent-dim", "0"], "latent-dim must be at least 1"),
        (["--data", "nonexistent_dataset"], "unknown dataset 'nonexistent_dataset'"),
        (["--data", "/no/such/file.npy"], "does not exist"),
        (["--device", "tpu"], "one of auto, cpu, cuda"),
        (["--binarize", "sometimes"], "binarize"),
    ],
)
def test_bad_flags(args, fragment, tmp_path):
    assert_one_line_error(invoke("run", *TINY, "--out", tmp_path / "r", *args), fragment)


@pytest.mark.parametrize(
    "array,extra,fragment",
    [
        (np.random.default_rng(0).random((20, 30)), ["--encoder", "conv"], "conv encoder needs image data [C, H, W]"),
        (np.zeros(7), [], "shape [N, ...]"),
        (np.array([[0.1, np.inf]] * 10), ["--encoder", "mlp"], "NaN/inf"),
    ],
    ids=["conv-on-vectors", "wrong-shape", "inf"],
)
def test_bad_data(tmp_path, array, extra, fragment):
    path = tmp_path / "d.npy"
    np.save(path, array)
    assert_one_line_error(invoke("run", "--data", path, "--epochs", "1", "--out", tmp_path / "r", *extra), fragment)


def test_unreadable_data(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip")
    assert_one_line_error(invoke("run", "--data", path, "--out", tmp_path / "r"), "cannot read")


def test_nan_loss_mid_training(tmp_path, monkeypatch):
    pm = PluginManager(extra_plugins=[plugin_for_tests], autoload=False)
    monkeypatch.setattr("vaekit.training.get_plugin_manager", lambda: pm)
    res = invoke("run", "--data", SMALL_MNIST, "--encoder", "mlp", "--likelihood", "nan_after:step=4",
                 "--batch-size", "100", "--epochs", "3", "--out", tmp_path / "r", "--no-progress")
    assert_one_line_error(res, "loss became nan at step 4 (epoch 2)")
    assert "last good checkpoint (epoch 1)" in res.stderr
    assert (tmp_path / "r" / "model.safetensors").exists()


def test_corrupt_checkpoint(cli_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run[0], run)
    (run / "model.safetensors").write_bytes(b"\x00" * 20)
    assert_one_line_error(invoke("eval", run, "-k", "2"), "is corrupt or truncated")
    assert_one_line_error(invoke("sample", run), "is corrupt or truncated")
    for command, out in (("embed", "c.npy"), ("reconstruct", "r.npy"), ("score", "s.csv")):
        assert_one_line_error(invoke(command, run, "--out", tmp_path / out), "is corrupt or truncated")


def test_mismatched_checkpoint(cli_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run[0], run)
    info = json.loads((run / "config.json").read_text())
    info["config"]["encoder"]["options"]["hidden"] = 32
    (run / "config.json").write_text(json.dumps(info))
    assert_one_line_error(invoke("eval", run), "does not match its config.json")


def test_not_a_run_directory(tmp_path):
    assert_one_line_error(invoke("eval", tmp_path), "config.json")
    assert_one_line_error(invoke("sample", tmp_path / "missing"), "does not exist")
    assert_one_line_error(invoke("embed", tmp_path / "missing", "--out", tmp_path / "c.npy"), "does not exist")
    assert_one_line_error(invoke("score", tmp_path, "--out", tmp_path / "s.csv"), "config.json")


def test_existing_run_is_not_overwritten_and_resume(cli_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run[0], run)
    assert_one_line_error(invoke("run", *TINY, "--out", run), "already holds a run")
    res = invoke("run", "--resume", run, "--epochs", "3", "--no-progress")
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert_one_line_error(invoke("run", "--resume", run, "--latent-dim", "3"), "only --epochs may change")


def test_debug_shows_the_traceback(tmp_path):
    res = invoke("--debug", "run", *TINY, "--encoder", "convv", "--out", tmp_path / "r")
    assert res.exit_code == 1
    assert res.exception is not None and "convv" in str(res.exception)


def test_sample_from_an_autoencoder_is_refused(tmp_path):
    res = invoke("run", *TINY, "--encoder", "mlp", "--prior", "none", "--out", tmp_path / "ae", "-q")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "ae" / "samples.png").exists()
    assert_one_line_error(invoke("sample", tmp_path / "ae"), "no prior distribution to sample from")
    ev = invoke("eval", tmp_path / "ae", "--json")
    assert ev.exit_code == 0 and "nll" not in json.loads(ev.stdout)


@pytest.mark.parametrize(
    "args,figure",
    [(["--likelihood", "mcc", "--prior", "none"], "reconstructions.png"),
     (["--regularizer", "sparsity", "--prior", "none", "--latent-dim", "800"], "reconstructions.png"),
     (["--regularizer", "adversarial", "--prior", "none"], "samples.png"),
     (["--regularizer", "mmd:kernel=rbf", "--prior", "none"], "samples.png")],
    ids=["mcc", "sparsity", "adversarial", "mmd"],
)
def test_method_plugins_run_from_the_cli(args, figure, tmp_path):
    res = invoke("run", *TINY, "--encoder", "mlp:hidden=64", *args, "--out", tmp_path / "r")
    assert res.exit_code == 0, res.output
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "loss.png", figure):
        assert (tmp_path / "r" / name).exists(), name
    ev = invoke("eval", tmp_path / "r", "-k", "5", "--json")
    assert ev.exit_code == 0, ev.output


# --- embed / reconstruct / score: bad input ------------------------------------------------------

@pytest.mark.parametrize(
    "args,fragment",
    [
        (["embed", "--out", "{tmp}/codes.txt"], "--out must end in .npy or .npz, got 'codes.txt'"),
        (["reconstruct", "--out", "{tmp}/missing/recon.npy"], "output folder"),
        (["score", "--out", "{tmp}/scores.npy"], "--out must end in .csv"),
        (["embed", "--out", "{tmp}/c.npy", "--split", "valid"], "--split must be one of train, test, all, got 'valid'"),
        (["score", "--out", "{tmp}/s.csv", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["score", "--out", "{tmp}/s.csv", "-k", "-1"], "--nll-samples must be >= 0"),
        (["embed", "--out", "{tmp}/c.npy", "--device", "tpu"], "'tpu' must be one of auto, cpu, cuda"),
        (["reconstruct", "--out", "{tmp}/r.npy", "--png", "{tmp}/grid.jpg"], "--png must end in .png"),
        (["embed", "--out", "{tmp}/c.npy", "--data", "digits"],
         "digits: samples have shape [1, 8, 8], but the run was trained on mnist of shape [1, 28, 28]"),
        (["embed", "--out", "{tmp}/c.npy", "--data", "mnist:classes=12"], "no sample has class 12"),
        (["score", "--out", "{tmp}/s.csv", "--normal-class", "11"],
         "normal class 11 is not among the labels of the scored data (0,1,2,3,4,5,6,7,8,9)"),
        (["score", "--out", "{tmp}/s.csv", "--data", "mnist:classes=3,test_per_class=2", "--normal-class", "3"],
         "every scored sample is of the normal class 3"),
    ],
    ids=["embed-suffix", "out-folder", "score-suffix", "split", "batch-size", "nll-samples", "device", "png-suffix",
         "shape", "absent-class", "normal-class", "only-normal"],
)
def test_apply_commands_bad_options(cli_run, tmp_path, args, fragment):
    command, *rest = args
    res = invoke(command, cli_run[0], *[a.format(tmp=tmp_path) for a in rest])
    assert_one_line_error(res, fragment)
    assert not [p for p in tmp_path.iterdir() if p.is_file()]  # nothing written


@pytest.mark.parametrize(
    "array,args,fragment",
    [
        (np.full((20, 1, 28, 28), np.nan, dtype=np.float32), ["embed", "--out", "c.npy"], "NaN/inf"),
        (np.zeros((20, 1, 28, 28), dtype=np.float32), ["score", "--out", "s.csv", "--normal-class", "0"],
         "--normal-class needs labelled data"),
        (np.zeros((20, 784), dtype=np.float32), ["reconstruct", "--out", "r.npy"], "samples have shape [784]"),
        (np.full((20, 1, 28, 28), 2.0, dtype=np.float32), ["score", "--out", "s.csv"], "[0, 1]"),
    ],
    ids=["nan", "unlabelled", "flat", "out-of-range"],
)
def test_apply_commands_bad_data(cli_run, tmp_path, array, args, fragment):
    np.save(tmp_path / "d.npy", array)
    command, _, out, *rest = args
    assert_one_line_error(invoke(command, cli_run[0], "--data", tmp_path / "d.npy", "--out", tmp_path / out, *rest), fragment)
    assert not (tmp_path / out).exists()


def test_png_of_vector_data_is_refused(tmp_path):
    np.save(tmp_path / "v.npy", np.random.default_rng(0).random((40, 10)).astype(np.float32))
    res = invoke("run", "--data", tmp_path / "v.npy", "--encoder", "mlp:hidden=8", "--latent-dim", "2", "--likelihood",
                 "gaussian", "--epochs", "1", "--out", tmp_path / "r", "-q")
    assert res.exit_code == 0, res.output
    assert_one_line_error(invoke("reconstruct", tmp_path / "r", "--out", tmp_path / "rec.npy", "--png", tmp_path / "g.png"),
                          "--png needs image data; samples of shape [10] are not images")
    assert not (tmp_path / "rec.npy").exists()
    np.save(tmp_path / "rec.labels.npy", np.arange(3))  # labels of some earlier output
    ok = invoke("reconstruct", tmp_path / "r", "--out", tmp_path / "rec.npy")  # without --png: any data
    assert ok.exit_code == 0 and np.load(tmp_path / "rec.npy").shape == (4, 10)
    assert not (tmp_path / "rec.labels.npy").exists()  # no labels: no labels file, not a stale one

def test_init_from_the_cli(cli_run, tmp_path):
    """--init RUN: one line saying what was initialized; bad runs, mismatches and combinations are one error line."""
    res = invoke("run", "--data", SMALL_MNIST, "--encoder", "conv:channels=8,16,hidden=64", "--latent-dim", "2",
                 "--epochs", "1", "--no-progress", "--no-figures", "--init", cli_run[0], "--out", tmp_path / "ft")
    assert res.exit_code == 0, res.output
    # 6 encoder tensors (2 convolutions, 1 linear), 2 of the head, 8 of the decoder (2 linear, 2 transposed convolutions)
    assert f"initialized 16 of 16 tensors from {cli_run[0]}" in " ".join(res.stderr.split())
    assert_one_line_error(invoke("run", *TINY, "--init", tmp_path / "missing", "--out", tmp_path / "a"), "does not exist")
    assert_one_line_error(invoke("run", *TINY, "--latent-dim", "2", "--init", cli_run[0], "--out", tmp_path / "b"),
                          "encoder.net.0.weight has shape [8, 1, 4, 4] there but [32, 1, 4, 4] in this model")
    assert_one_line_error(invoke("run", "--resume", tmp_path / "ft", "--init", cli_run[0]), "only --epochs may change (got --init)")
    assert_one_line_error(invoke("run", *TINY, "--init", cli_run[0], "--pretrain", "layerwise", "--out", tmp_path / "c"),
                          "--init and --pretrain both set the starting weights")


@pytest.mark.parametrize("command", ["embed", "reconstruct", "score", "sample", "export"])
def test_an_output_that_cannot_be_a_file_is_one_line(cli_run, tmp_path, command):
    """--out naming a folder, or a path under a file, is refused with one line and nothing written."""
    suffix = {"embed": ".npy", "reconstruct": ".npy", "score": ".csv", "sample": ".png", "export": ".pt"}[command]
    folder = tmp_path / f"taken{suffix}"
    folder.mkdir()
    assert_one_line_error(invoke(command, cli_run[0], "--out", folder), "is a folder")
    assert list(folder.iterdir()) == []
    (tmp_path / "file").write_text("x")
    assert_one_line_error(invoke(command, cli_run[0], "--out", tmp_path / "file" / f"x{suffix}"), "is not a folder")



def test_plot_draws_the_figures_of_a_run_again(trained_run, tmp_path):
    """`vaekit plot RUN` writes every figure that applies (interpolation.png and, d <= 10, traversal.png
    among them) into the run; `--kind K --out F` one of them anywhere; a figure that does not apply, an
    unknown kind or --out with two kinds is one line."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for name in ("interpolation.png", "traversal.png"):
        (run / name).unlink(missing_ok=True)
    res = invoke("plot", run)
    assert res.exit_code == 0, res.output
    for name in ("interpolation.png", "traversal.png", "samples.png", "manifold.png", "loss.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG", name
    res = invoke("plot", run, "--kind", "traversal", "--out", tmp_path / "t.png")
    assert res.exit_code == 0 and (tmp_path / "t.png").exists(), res.output
    assert_one_line_error(invoke("plot", run, "--kind", "codes"), "codes.png does not apply to this run: it needs a regularizer")
    assert_one_line_error(invoke("plot", run, "--kind", "nope"), "unknown figure 'nope'; figures: reconstructions, samples")
    assert_one_line_error(invoke("plot", run, "--kind", "samples", "--kind", "loss", "--out", tmp_path / "x.png"),
                          "give exactly one --kind")
