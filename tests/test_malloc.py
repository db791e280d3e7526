"""vaekit.malloc: freed activations stay in glibc's heap, so a training step does not fault its pages in
again (checked by the process's own minor-fault count), and the user's own allocator settings win."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

# training steps of two convolutions (the conv main job's first layers, a batch of 128: activations of
# 1.6-3.2 MB), minor page faults counted over the last 8 of 12 steps
STEPS = """
import resource, torch
import vaekit.malloc
print(vaekit.malloc.keep_freed_memory())
torch.manual_seed(0)
conv1, conv2 = torch.nn.Conv2d(1, 32, 4, 2, 1), torch.nn.Conv2d(32, 64, 4, 2, 1)
x = torch.rand(128, 1, 28, 28)
for i in range(12):
    if i == 4:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    conv2(conv1(x).relu()).relu().sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
"""


def _faults_per_step(**env):
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, check=True,
                         env={**os.environ, "VAEKIT_MALLOC": "", **env}).stdout.split()
    return out[0] == "True", float(out[1])


def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = _faults_per_step()
    assert applied and faults < 400  # seen: 49
    applied, faults = _faults_per_step(VAEKIT_MALLOC="default")  # glibc's defaults: the pages come back each step
    assert not applied and faults > 1000  # seen: 3,905


def test_the_users_own_malloc_settings_are_left_alone():
    applied, faults = _faults_per_step(MALLOC_TRIM_THRESHOLD_="0")
    assert not applied and faults > 1000  # the user's trim threshold of 0 is in force: every free returns


def test_training_on_the_cpu_applies_it(tmp_path):
    code = ("import vaekit, vaekit.malloc; "
            "vaekit.train(data='digits', encoder='mlp:hidden=16', decoder='mlp:hidden=16', latent_dim=2, epochs=1, "
            f"device='cpu', out={str(tmp_path / 'run')!r}, quiet=True, figures=False); "
            "print(vaekit.malloc._state)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "VAEKIT_MALLOC": ""}).stdout
    assert "'applied': True" in out


def test_an_unknown_choice_is_one_readable_error(tmp_path):
    """VAEKIT_MALLOC=off is not silently ignored: `vaekit run` stops with one line naming the two choices."""
    env = {**os.environ, "VAEKIT_MALLOC": "off"}
    out = subprocess.run([sys.executable, "-m", "vaekit", "run", "--data", "digits", "--encoder", "mlp:hidden=8",
                          "--decoder", "mlp:hidden=8", "--latent-dim", "2", "--epochs", "1", "--device", "cpu",
                          "--out", str(tmp_path / "run"), "-q"], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "VAEKIT_MALLOC must be 'default'" in out.stderr and "'off'" in out.stderr
