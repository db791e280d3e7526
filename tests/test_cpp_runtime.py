"""The C++ runtime as shipped: cpp_runtime/README.md's commands run as written, one-line errors from the
runner, the .pt2 opt-in, the installed CMake package used by an out-of-tree project, add_subdirectory
from a plain parent project, and installed binaries' RPATH."""

import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vaekit
from cpp_helpers import BUILD_TIMEOUT, ROOT, TORCH_CMAKE, TORCH_LIB
from cpp_helpers import bash as _bash, tool_env as _env, need_toolchain as _need_toolchain, readme_blocks as _readme_blocks
from vaekit.export import export_torchscript, load_exported

def _run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=BUILD_TIMEOUT, **kwargs)


def _one_error_line(res: subprocess.CompletedProcess, fragment: str) -> str:
    """Exit code 1 and exactly one line on stderr, `error: ...` containing `fragment`."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (res.returncode, res.stderr)
    assert fragment in lines[0], lines[0]
    return lines[0]


def _rpath(binary: Path) -> list[str]:
    """The RUNPATH (or RPATH) entries of an ELF binary, from readelf -d (or objdump -p)."""
    if shutil.which("readelf"):
        out = _run("readelf", "-d", binary).stdout
        found = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", out)
    elif shutil.which("objdump"):
        out = _run("objdump", "-p", binary).stdout
        found = re.findall(r"^\s*(?:RUNPATH|RPATH)\s+(\S*)\s*$", out, flags=re.M)
    else:
        pytest.skip("neither readelf nor objdump is installed")
    assert len(found) == 1, out
    return found[0].split(":")


@pytest.fixture(scope="module")
def model_pt(trained_run, tmp_path_factory):
    return export_torchscript(vaekit.load_run(trained_run), tmp_path_factory.mktemp("export") / "model.pt")


@pytest.fixture(scope="module")
def installed(readme_build, tmp_path_factory):
    """The README's install command, then its out-of-tree project (its CMakeLists.txt, the embedding example as
    main.cpp) configured and built as written; HOME is a temporary directory."""
    home = tmp_path_factory.mktemp("home")
    env = _env(HOME=str(home))
    section = "Use it from another CMake project"
    install, build = _readme_blocks("bash")[section]
    _bash(install, readme_build, env)
    project = tmp_path_factory.mktemp("your_app")
    (project / "CMakeLists.txt").write_text(_readme_blocks("cmake")[section][0])
    shutil.copy(ROOT / "cpp_runtime" / "examples" / "embed.cpp", project / "main.cpp")
    _bash(build, project, env)
    return SimpleNamespace(prefix=home / ".local" / "vaekit", project=project)


@pytest.mark.slow
def test_readme_runner_commands_work_as_written(readme_build):
    _bash(_readme_blocks("bash")["Runner"][0], readme_build)
    module = load_exported(readme_build / "model.pt")
    x = torch.load(readme_build / "x.pt")
    mu = torch.load(readme_build / "mu.pt")
    assert mu.shape == (8, module.latent_dim) and torch.load(readme_build / "mu.logvar.pt").shape == mu.shape
    assert (torch.load(readme_build / "x_mean.pt") - module.decode(mu)).abs().max() <= 1e-5
    assert (torch.load(readme_build / "x_rec.pt") - module.reconstruct(x)).abs().max() <= 1e-5
    assert torch.equal(torch.load(readme_build / "samples.pt"), module.sample(16, 0))


@pytest.mark.slow
def test_absurd_sample_counts_are_one_error_line(readme_build):
    runner, model = readme_build / "build" / "vaekit-runner", readme_build / "model.pt"
    # used to end in std::terminate (exit 134) with a TorchScript traceback
    res = _run(runner, model, "sample", "-n", 100_000_000_000, "--out", readme_build / "s.pt")
    _one_error_line(res, "100000000000 samples of shape [1, 28, 28] take")
    assert "more than this machine's memory" in res.stderr
    res = _run(runner, model, "sample", "-n", "99999999999999999999999", "--out", readme_build / "s.pt")
    _one_error_line(res, "-n is out of range")
    _one_error_line(_run(runner, model, "sample", "-n", 0, "--out", readme_build / "s.pt"), "at least 1")


@pytest.mark.slow
def test_a_checkpoint_or_run_dir_is_not_an_exported_model(readme_build, trained_run):
    runner = readme_build / "build" / "vaekit-runner"
    res = _run(runner, trained_run / "model.safetensors", "sample", "--out", readme_build / "s.pt")
    line = _one_error_line(res, "is a vaekit checkpoint (safetensors")
    assert "not an exported model: run `vaekit export RUN_DIR` first" in line and "corrupted" not in line
    res = _run(runner, trained_run, "sample", "--out", readme_build / "s.pt")
    _one_error_line(res, f"is a vaekit run directory, not an exported model: run `vaekit export {trained_run}` first")
    res = _run(runner, trained_run / "config.json", "sample", "--out", readme_build / "s.pt")
    assert "corrupted" not in _one_error_line(res, "not even a zip file")


@pytest.mark.slow
def test_a_pt2_package_runs_native_code_only_when_trusted(readme_build, tmp_path):
    # a crafted package: its "compiled model" is a shared library whose constructor leaves a file behind
    marker = tmp_path / "native-code-ran"
    (tmp_path / "evil.cpp").write_text(
        '#include <fstream>\n'
        f'__attribute__((constructor)) static void ran() {{ std::ofstream("{marker}") << "ran"; }}\n')
    res = _run("c++", "-shared", "-fPIC", tmp_path / "evil.cpp", "-o", tmp_path / "evil.so")
    assert res.returncode == 0, res.stderr
    package = tmp_path / "model.pt2"
    with zipfile.ZipFile(package, "w") as z:
        for name, text in (("archive_format", "pt2"), ("archive_version", "0"), ("byteorder", "little"),
                           (".data/version", "6\n")):
            z.writestr(f"model/{name}", text)
        for method in ("encode", "decode"):
            z.write(tmp_path / "evil.so", f"model/data/aotinductor/{method}/{method}.wrapper.so")
            z.writestr(f"model/data/aotinductor/{method}/{method}.wrapper_metadata.json", '{"AOTI_DEVICE_KEY": "cpu"}')
    runner = readme_build / "build" / "vaekit-runner"
    env = dict(os.environ, TMPDIR=str(tmp_path))  # where libtorch unpacks the package
    res = _run(runner, package, "sample", "--out", tmp_path / "s.pt", env=env)
    line = _one_error_line(res, "runs the native code inside it when it is loaded")
    assert "--trust-native-code" in line and not marker.exists()
    # what the refusal prevents: with the opt-in the package's code runs (and it is then no vaekit model)
    res = _run(runner, package, "sample", "--out", tmp_path / "s.pt", "--trust-native-code", env=env)
    _one_error_line(res, "is not a loadable AOTInductor package")
    assert marker.read_text() == "ran"


@pytest.mark.slow
def test_an_out_of_tree_project_uses_the_installed_package(installed, readme_build):
    cache = (installed.project / "build" / "CMakeCache.txt").read_text()
    assert f"vaekit_DIR:PATH={installed.prefix / 'lib' / 'cmake' / 'vaekit'}" in cache
    app = installed.project / "build" / "your_app"
    res = _run(app, readme_build / "model.pt")
    assert res.returncode == 0 and res.stdout == "codes [4, 2], samples [8, 1, 28, 28]\n", res.stdout + res.stderr
    # the package's Torch carries no link directories that do not exist (torch's MKL ones: /lib/intel64 ...)
    assert all(Path(entry).is_dir() for entry in _rpath(app)), _rpath(app)


@pytest.mark.slow
def test_installed_runner_finds_torch_only_and_the_prefix_can_move(installed, readme_build, tmp_path):
    runner = installed.prefix / "bin" / "vaekit-runner"
    assert [os.path.realpath(entry) for entry in _rpath(runner)] == [os.path.realpath(TORCH_LIB)]
    moved = tmp_path / "moved"
    shutil.copytree(installed.prefix, moved, symlinks=True)
    res = _run(moved / "bin" / "vaekit-runner", readme_build / "model.pt", "sample", "-n", 3,
               "--out", tmp_path / "s.pt")
    assert res.returncode == 0, res.stderr
    assert torch.load(tmp_path / "s.pt").shape == (3, 1, 28, 28)


@pytest.mark.slow
def test_a_relative_torch_rpath_for_a_bundled_libtorch(installed, readme_build, tmp_path):
    build = readme_build / "build"
    try:
        for cmd in (["cmake", "-S", readme_build / "cpp_runtime", "-B", build, "-DVAEKIT_TORCH_RPATH=$ORIGIN/../lib"],
                    ["cmake", "--build", build, "-j2"],
                    ["cmake", "--install", build, "--prefix", tmp_path / "bundle"]):
            res = _run(*cmd)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    finally:  # the module's build as it was
        for cmd in (["cmake", "-S", readme_build / "cpp_runtime", "-B", build, "-DVAEKIT_TORCH_RPATH="],
                    ["cmake", "--build", build, "-j2"]):
            _run(*cmd)
    for library in TORCH_LIB.iterdir():  # libtorch "shipped" inside the prefix
        (tmp_path / "bundle" / "lib" / library.name).symlink_to(library)
    shutil.move(tmp_path / "bundle", tmp_path / "moved")
    runner = tmp_path / "moved" / "bin" / "vaekit-runner"
    assert _rpath(runner) == ["$ORIGIN/../lib"]
    res = _run(runner, readme_build / "model.pt", "sample", "-n", 2, "--out", tmp_path / "s.pt")
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_a_plain_parent_project_can_add_subdirectory(model_pt, tmp_path_factory):
    _need_toolchain()
    parent = tmp_path_factory.mktemp("parent")
    (parent / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.21)\n"
        "project(parent LANGUAGES CXX)\n"
        f'add_subdirectory("{ROOT / "cpp_runtime"}" vaekit)\n'
        "add_executable(app main.cpp)\n"
        "target_link_libraries(app PRIVATE vaekit::runtime)\n")
    shutil.copy(ROOT / "cpp_runtime" / "examples" / "embed.cpp", parent / "main.cpp")
    for cmd in (["cmake", "-S", parent, "-B", parent / "build", f"-DCMAKE_PREFIX_PATH={TORCH_CMAKE}"],
                ["cmake", "--build", parent / "build", "-j2"]):
        res = _run(*cmd)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = _run(parent / "build" / "app", model_pt)
    assert res.returncode == 0 and "samples [8, 1, 28, 28]" in res.stdout, res.stdout + res.stderr
    # for a parent project only the library is built
    assert not any((parent / "build" / "vaekit" / name).exists()
                   for name in ("vaekit-runner", "vaekit-bench", "vaekit-runtime-tests", "vaekit-embed-example"))


@pytest.mark.slow
def test_the_runner_encodes_ksparse_codes(readme_build, tmp_path):
    """A k-sparse AE's exported encode applies its top-k: the C++ runner's codes are the model's features, α·k = 10
    non-zeros; its reconstruct decodes the k = 5 code the decoder reads."""
    run = vaekit.train(data="mnist:train_per_class=10,test_per_class=2", encoder="mlp:hidden=64", prior="none",
                       latent_dim=32, epochs=1, regularizers=["ksparse:k=5,alpha=2"], out=str(tmp_path / "run"),
                       quiet=True, figures=False)
    model = vaekit.load_run(run.run_dir).eval()
    path = export_torchscript(model, tmp_path / "ksparse.pt")
    x = vaekit.load_data("mnist:train_per_class=10,test_per_class=2").test_x
    torch.save(x, tmp_path / "x.pt")
    for command, out in (("encode", "codes.pt"), ("reconstruct", "recon.pt")):
        res = _run(readme_build / "build" / "vaekit-runner", path, command, "--in", tmp_path / "x.pt",
                   "--out", tmp_path / out)
        assert res.returncode == 0, res.stderr
    codes = torch.load(tmp_path / "codes.pt")
    assert int((codes != 0).sum(1).max()) <= 10  # α·k = 10 of 32 units
    with torch.no_grad():
        assert (codes - model.embed(x)).abs().max() <= 1e-5
        top = model.prior.mean(model.encode(x)).topk(5, dim=-1)
        k_code = torch.zeros_like(codes).scatter(-1, top.indices, top.values)
        assert (torch.load(tmp_path / "recon.pt") - model.decode_mean(k_code)).abs().max() <= 1e-5


@pytest.mark.slow
def test_a_conditional_archive_runs_in_cpp_as_in_python(readme_build, tmp_path):
    """A CVAE (--condition label) archive: the C++ runner's sample --label, encode/reconstruct --labels equal the
    Python model's; ctest's conditional checks pass on it; labels are refused by an unconditional model and
    required by a conditional one, each with one line."""
    run = vaekit.train(data="digits", encoder="mlp:hidden=32", latent_dim=4, epochs=1, condition="label",
                       out=str(tmp_path / "run"), quiet=True, figures=False)
    model = vaekit.load_run(run.run_dir).eval()
    path = export_torchscript(model, tmp_path / "cvae.pt")
    x, c = torch.rand(6, 1, 8, 8), torch.tensor([0, 3, 9, 3, 5, 1])
    torch.save(x, tmp_path / "x.pt")
    torch.save(c, tmp_path / "c.pt")
    runner = readme_build / "build" / "vaekit-runner"
    for args in (("sample", "-n", 5, "--seed", 2, "--label", 7), ("encode", "--in", tmp_path / "x.pt", "--labels", tmp_path / "c.pt"),
                 ("reconstruct", "--in", tmp_path / "x.pt", "--labels", tmp_path / "c.pt")):
        res = _run(runner, path, *args, "--out", tmp_path / f"{args[0]}.pt")
        assert res.returncode == 0, res.stderr
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "sample.pt"), model.sample(5, torch.Generator().manual_seed(2), label=7))
        assert (torch.load(tmp_path / "encode.pt") - model.embed(x, c)).abs().max() <= 1e-5
        assert (torch.load(tmp_path / "reconstruct.pt") - model.reconstruct(x, c)).abs().max() <= 1e-5
    _one_error_line(_run(runner, path, "sample", "--out", tmp_path / "s.pt"), "pass the labels")
    _one_error_line(_run(runner, path, "sample", "--label", 10, "--out", tmp_path / "s.pt"), "label 10 is out of range")
    _one_error_line(_run(runner, readme_build / "model.pt", "sample", "--label", 1, "--out", tmp_path / "s.pt"),
                    "not conditional")
    env = dict(os.environ, VAEKIT_TEST_MODEL=str(path))
    res = subprocess.run(["ctest", "--test-dir", str(readme_build / "build"), "--output-on-failure"], capture_output=True,
                         text=True, timeout=BUILD_TIMEOUT, env=env)
    assert res.returncode == 0 and "FAIL" not in res.stdout, res.stdout[-3000:]
