"""The training loop's speed-related properties, each checked against an independent reference.

No host read-back per step (counted), NaN/inf still caught at its exact step and before any checkpoint,
the fused Adam against torch's per-tensor Adam, channels-last convolutions against contiguous ones,
``--compile`` against the eager step.  Timings live in bench/ (bench_vs_plain.py), never here.
"""

import copy
import json

import plugin_for_tests
import pytest
import torch
from torch.nn import functional as F

import vaekit
from vaekit import running, training
from vaekit.checkpoint import flatten_optimizer, unflatten_optimizer
from vaekit.compiling import StepFunctions
from vaekit.config import RunConfig
from vaekit.errors import ConfigError, TrainingError
from vaekit.manager import PluginManager
from vaekit.plugins.decoders import ConvDecoder
from vaekit.plugins.encoders import ConvEncoder
from vaekit.plugins.layers import Contiguous, FewChannelConvTranspose2d
from vaekit.training import Trainer, adam

from conftest import SMALL_MNIST

# 300 training digits in batches of 10: 30 steps an epoch, more than running.SYNC_EVERY (20)
FAST = dict(data=SMALL_MNIST, encoder="mlp:hidden=64", latent_dim=4, batch_size=10, device="cpu")


@pytest.fixture(scope="module")
def test_pm():
    return PluginManager(extra_plugins=[plugin_for_tests], autoload=False)


def _trainer(tmp_path, **options) -> Trainer:
    trainer = Trainer(RunConfig.from_dict({**FAST, "out": str(tmp_path / "run"), **options}), quiet=True, figures=False)
    trainer.setup()
    return trainer


def test_an_epoch_reads_the_device_once_per_window_not_once_per_step(tmp_path, monkeypatch):
    """Every way a tensor's value reaches Python (item, tolist, bool, float, int) is counted during an
    epoch of 30 steps: the loop reads the running terms at step 20 and at the end, nothing else."""
    trainer = _trainer(tmp_path)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            reads.append((_name, self.dtype))
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    trainer._train_epoch(1, None)
    monkeypatch.undo()
    # seen: the epoch's 30 binarization seeds, drawn from the run's CPU generator with the permutation (a
    # host tensor: no device sync on a GPU), then the running terms at step 20 and at the end (the loop
    # before: 30 loss.item() + 60 term .item(): 90 reads, and a host draw per batch)
    assert trainer.binarize == "dynamic"
    assert reads == [("tolist", torch.int64), ("tolist", torch.float64), ("tolist", torch.float64)]
    assert running.SYNC_EVERY == 20 and trainer.step == 30


@pytest.mark.parametrize("options", [{}, {"prior": "none", "regularizers": ["adversarial:width=8,depth=1"]}])
def test_the_epochs_means_are_those_of_reading_every_step(tmp_path, monkeypatch, options):
    """Reading the running terms after every step (SYNC_EVERY = 1, what the loop did before) and every 20
    steps give the same train means bit for bit, the AAE discriminator's own figures included."""
    means = []
    for every in (1, 20):
        monkeypatch.setattr(training, "SYNC_EVERY", every)
        trainer = _trainer(tmp_path / str(every), **options)
        means.append([trainer._train_epoch(e, None)[0] for e in (1, 2)])
    assert means[0] == means[1]
    if options:
        assert {"adversarial_d_loss", "adversarial_d_acc", "adversarial"} <= set(means[0][0])


def test_a_nan_inside_a_window_is_named_at_its_step_and_never_checkpointed(tmp_path, test_pm):
    """NaN at step 47 (epoch 2, batch 17); a checkpoint is due at step 48: the read before it finds the
    NaN, so the last good checkpoint stays the end of epoch 1 and the message names step 47, not the
    step at which the window was read."""
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"loss became nan at step 47 \(epoch 2\).*last good checkpoint \(epoch 1\) is kept"):
        vaekit.train(epochs=3, out=str(out), likelihood="nan_after:step=47", checkpoint_every=48, pm=test_pm,
                     quiet=True, figures=False, **FAST)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    model = vaekit.load_run(out, pm=test_pm)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_runs_adam_is_fused_and_takes_torchs_adam_steps():
    """Three updates of the run's Adam against torch.optim.Adam(foreach=False), the reference
    implementation, from the same parameters and gradients."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = adam(params, 1e-2, torch.device("cpu")), torch.optim.Adam(ref, lr=1e-2, foreach=False)
    assert ours.param_groups[0]["fused"] is True
    for _ in range(3):
        for p, q in zip(params, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)  # seen: max |Δ| 6e-8


def test_a_checkpoint_of_the_per_tensor_adam_resumes_into_the_fused_one():
    """A checkpoint written before Adam was fused records fused=None: its state loads, the run stays fused."""
    torch.manual_seed(0)
    old_params = [torch.nn.Parameter(torch.randn(5, 3))]
    old = torch.optim.Adam(old_params, lr=1e-3)
    old_params[0].grad = torch.randn(5, 3)
    old.step()
    tensors, meta = {}, {}
    flatten_optimizer("optim.model", old, tensors, meta)
    assert json.loads(meta["optim.model"])["param_groups"][0]["fused"] is None
    new = adam([torch.nn.Parameter(old_params[0].detach().clone())], 1e-3, torch.device("cpu"))
    unflatten_optimizer("optim.model", new, tensors, meta)
    assert new.param_groups[0]["fused"] is True
    state = next(iter(new.state.values()))
    torch.testing.assert_close(state["exp_avg"], next(iter(old.state.values()))["exp_avg"], rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: ConvEncoder((1, 28, 28)), lambda: ConvDecoder(8, (1, 28, 28))])
def test_conv_plugins_hold_channels_last_kernels_and_compute_what_contiguous_ones_do(make):
    torch.manual_seed(0)
    module = make()
    kernels = [p for p in module.parameters() if p.dim() == 4]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert any(not p.is_contiguous() for p in kernels)  # a 1-channel kernel is both; the others are NHWC only
    reference = copy.deepcopy(module).to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in reference.parameters())
    x = torch.rand(6, 1, 28, 28) if isinstance(module, ConvEncoder) else torch.randn(6, 8)
    torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-5)  # seen: max |Δ| 1e-7
    # state_dict values are the same tensors whatever the strides; a loaded state keeps channels-last
    fresh = make()
    fresh.load_state_dict({k: v.contiguous() for k, v in module.state_dict().items()})
    torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fresh.parameters() if p.dim() == 4)


def test_the_conv_encoders_last_activation_sees_one_layout_both_ways():
    """layers.Contiguous: the activation before the flatten takes an NCHW copy of the channels-last map, so its
    input, output and gradient share one layout (mixed, its backward took 2.5 ms at [128, 32, 14, 14] against
    0.07 ms); the encoder computes what the same layers without the copy do."""
    torch.manual_seed(0)
    encoder = ConvEncoder((1, 28, 28))
    assert isinstance(encoder.net[3], Contiguous) and isinstance(encoder.net[4], torch.nn.Flatten)
    seen = {}

    def record(module, inputs, output):
        seen["input"] = inputs[0].is_contiguous()
        output.register_hook(lambda g: seen.__setitem__("grad", g.is_contiguous()))

    plain = copy.deepcopy(encoder)
    plain.net[3] = plain.net[3].module  # the same layers, the flatten copying after the activation
    encoder.net[3].module.register_forward_hook(record)
    x, g = torch.rand(6, 1, 28, 28), torch.randn(6, 256)
    out, ref = encoder(x), plain(x)
    out.backward(g)
    assert seen == {"input": True, "grad": True}
    ref.backward(g)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(encoder.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c_in,c_out,k,stride,pad", [(32, 1, 4, 2, 1), (8, 3, 4, 2, 1), (5, 2, 3, 1, 0), (4, 4, 5, 3, 2)])
def test_the_few_channel_transposed_convolution_is_torchs_in_value_and_gradient(c_in, c_out, k, stride, pad):
    """FewChannelConvTranspose2d (a matmul and a fold) against F.conv_transpose2d, channels-last input or not."""
    torch.manual_seed(0)
    layer = FewChannelConvTranspose2d(c_in, c_out, kernel_size=k, stride=stride, padding=pad)
    for x in (torch.randn(3, c_in, 7, 6), torch.randn(3, c_in, 7, 6).contiguous(memory_format=torch.channels_last)):
        x.requires_grad_()
        ours = layer(x)
        ref_x = x.detach().clone().requires_grad_()
        w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
        ref = F.conv_transpose2d(ref_x, w, b, stride=stride, padding=pad)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # seen: max |Δ| 5e-7
        g = torch.randn_like(ref)
        ours.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-4, atol=1e-4)
        layer.zero_grad()
    assert isinstance(ConvDecoder(8, (1, 28, 28)).net[-1], FewChannelConvTranspose2d)


class _BreakingObjective:
    """An objective whose forward has Python the compiler cannot capture in one graph (a print)."""

    def forward(self, model, x, c=None):
        h = torch.tanh(model(x))
        print("a graph break")
        return h * 2


def test_compile_falls_back_to_split_graphs_with_a_warning_and_computes_the_eager_values(capsys):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    eager = StepFunctions(_BreakingObjective(), model, "off")
    compiled = StepFunctions(_BreakingObjective(), model, "default")
    x = torch.randn(4, 3)
    assert compiled.timing(x) is not None and compiled.timing(x) is None  # the first step on a shape compiles
    record = compiled.forward(x, None)
    assert "cannot be compiled as one graph" in capsys.readouterr().err
    torch.testing.assert_close(record, eager.forward(x, None))


def test_compile_trains_to_the_eager_weights_and_reports_its_time(tmp_path, capsys):
    """Three epochs of the MLP VAE under a β warm-up (β changes every epoch: the loss stays eager, so
    nothing recompiles) with --compile default against the eager run, same seed: the same train losses
    and weights up to float rounding (the compiler reorders float sums), the compile time recorded once."""
    small = dict(data="digits", encoder="mlp:hidden=32", latent_dim=2, batch_size=700, epochs=3, seed=3,
                 objective="elbo:warmup=3", device="cpu", figures=False)  # 1,438 digits: batches of 700, 700, 38
    eager = vaekit.train(out=str(tmp_path / "eager"), quiet=True, **small)
    compiled = vaekit.train(out=str(tmp_path / "compiled"), compile="default", progress=False, **small)
    err = capsys.readouterr().err
    assert "torch.compile (default): the first step on batches of [700, 1, 8, 8] took" in err
    assert "[38, 1, 8, 8]" in err and err.count("torch.compile") == 2  # two shapes, no recompile
    assert [("compile_seconds" in m) for m in compiled.history] == [True, False, False]
    assert [m["beta"] for m in compiled.history] == [m["beta"] for m in eager.history] != [1.0] * 3
    for a, b in zip(eager.history, compiled.history):
        for key in ("train_loss", "train_recon", "train_kl", "test_elbo"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key  # seen: equal to 1e-7
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)  # seen: max |Δ| 1e-9 (inductor RNG: 1e-2)


def test_a_compiler_failure_is_one_line_that_says_how_to_train_without_it(tmp_path):
    """No working C++ compiler for inductor: ConfigError naming the cause and --compile off, no traceback."""
    import torch._dynamo
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    # inductor's own config patching (a monkeypatch of the config module leaves it broken for later tests);
    # no fx graph cache: a cached graph would need no compiler
    with inductor.patch({"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}), \
            pytest.raises(ConfigError, match=r"^torch\.compile \(default\) failed: InvalidCxxCompiler: .*; "
                                             r"train without it: --compile off$") as info:
        vaekit.train(data="digits", encoder="mlp:hidden=8", latent_dim=2, epochs=1, batch_size=719, device="cpu",
                     compile="default", out=str(tmp_path / "run"), quiet=True, figures=False)
    torch._dynamo.reset()
    assert "\n" not in str(info.value)


def test_a_conv_run_resumes_to_the_uninterrupted_weights_bit_for_bit(tmp_path):
    """Channels-last kernels with the fused Adam: the resumed moments must keep their parameter's layout
    (saved contiguous, the fused kernel walks raw memory); 2 epochs straight against 1 + resume to 2."""
    conv = dict(data="digits", encoder="conv:channels=4,8,hidden=16", latent_dim=2, batch_size=256, seed=1,
                device="cpu", quiet=True, figures=False)
    straight = vaekit.train(epochs=2, out=str(tmp_path / "straight"), **conv)
    vaekit.train(epochs=1, out=str(tmp_path / "split"), **conv)
    resumed = vaekit.resume(tmp_path / "split", epochs=2, quiet=True, figures=False)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name  # seen: equal; moments left contiguous: 1.6e-2 apart (review 15)
    assert [m["train_loss"] for m in resumed.history] == [m["train_loss"] for m in straight.history]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_epoch_never_synchronizes_between_the_reads(tmp_path):
    """On CUDA, torch's sync debug mode raises on any synchronizing call: only the window reads may sync."""
    trainer = _trainer(tmp_path, device="cuda", data="mnist:train_per_class=20,test_per_class=5", batch_size=20)
    trainer._train_epoch(1, None)  # warm-up: allocations, cuBLAS handles
    flush = running.RunningTerms.flush

    def allowed(self, failed):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return flush(self, failed)
        finally:
            torch.cuda.set_sync_debug_mode("error")
    running.RunningTerms.flush = allowed
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer._train_epoch(2, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        running.RunningTerms.flush = flush
