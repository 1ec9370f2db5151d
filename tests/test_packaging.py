"""Packaging: the sdist holds everything the build needs; it installs (no build isolation, CPU-only) into a
fresh venv and runs from outside the source tree; the wheel pip built from it installs into a second fresh
venv and runs; a wheel build that can't import torch stops with one line; a torch other than the one the
extension was built with gets one clear error, and the library is never loaded.

The fresh venvs see this environment's packages (torch, numpy, transformers, ...) through a .pth file, so
nothing is downloaded; sdcore itself comes only from the sdist or the wheel.

Compiling the extension (CPU-only) takes about 3 minutes of CPU time, too long to repeat on every run. So
pip builds the sdist unpacked in build/test-packaging/src rather than in a new temporary directory, and that
directory keeps the object files of the previous run (build/temp.*, where ninja tracks each object's sources,
headers and compile command): each run gets exactly the current sdist's files (an unchanged file keeps its
time stamp), a new venv A (always at build/test-packaging/venv-a: the compile commands name its include
directory) and a new Python package, and ninja recompiles only what changed, as `make` does. The first run
compiles everything; a different torch, Python, compiler or SDCORE_TEST_REBUILD=1 starts from scratch.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from sdcore import _ext

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import sdcore_backend  # noqa: E402

HIDE_TORCH = "import sys; sys.modules['torch'] = None; "  # `import torch` raises ImportError after this
CACHE = ROOT / "build" / "test-packaging"
BUILD_TIMEOUT = 1800


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", SDCORE_CUDA="0")
    env.pop("SDCORE_BACKEND", None)
    # torch's build finds `ninja` on PATH: this interpreter's bin directory, where pip put it.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _run(args, cwd, timeout=300, **env):
    return subprocess.run([str(a) for a in args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _check(done):
    assert done.returncode == 0, f"{done.args}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _make_venv(path: Path) -> Path:
    """A new venv whose interpreter also sees this environment's site-packages (appended to sys.path by a
    .pth file, so its own site-packages comes first and their .pth files, editable installs of sdcore
    included, are not run)."""
    _check(subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], capture_output=True,
                          text=True))
    python = path / "bin" / "python"
    site = _check(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=path)).stdout.strip()
    outer = [p for p in sys.path
             if p.rstrip("/").endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    Path(site, "_sdcore_test_outer_site.pth").write_text("\n".join(outer) + "\n")
    return python


def _pip_install(python: Path, *args):
    # --ignore-installed: this environment's own sdcore (seen through the .pth) is neither uninstalled nor
    # taken as already satisfying the requirement.
    return _check(_run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", *args],
                       cwd=python.parent, timeout=BUILD_TIMEOUT))


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist, built as `python -m build --sdist` builds it (the backend's hook), with torch hidden: an
    sdist must build where torch is not installed, e.g. in build's isolated environment."""
    out = tmp_path_factory.mktemp("sdist")
    code = HIDE_TORCH + f"sys.path.insert(0, 'tools'); import sdcore_backend as b; print(b.build_sdist({str(out)!r}))"
    name = _check(_run([sys.executable, "-c", code], cwd=ROOT)).stdout.strip().splitlines()[-1]
    return out / name


def _sdist_names(sdist: Path) -> set:
    with tarfile.open(sdist) as tar:
        return {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}


def test_sdist_holds_everything_the_build_and_the_tests_need(sdist):
    names = _sdist_names(sdist)
    needed = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CHANGELOG.md", "CMakeLists.txt"}
    for pattern in ("tools/*.py", "csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.h", "csrc/**/*.cuh",
                    "sdcore/data/*", "sdcore/**/*.py", "sdcore/serve/static/*",
                    "tests/**/*.py", "tests/**/*.cu", "tests/**/*.cpp", "tests/**/*.h", "tests/**/*.cuh"):
        needed |= {p.relative_to(ROOT).as_posix() for p in ROOT.glob(pattern) if "__pycache__" not in p.parts}
    needed.discard("sdcore/_build_config.json")
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    # The build outputs of an in-place build never travel: the sdist is compiled where it is installed.
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc")) or n.endswith("_build_config.json")]


def _toolchain() -> str:
    """What the objects kept between runs depend on besides the sources, which ninja tracks itself."""
    cxx = os.environ.get("CXX", "c++")
    try:
        compiler = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    except OSError:
        compiler = "none"
    parts = (torch.__version__, torch.__file__, str(torch.version.cuda), sys.version, platform.platform(),
             version("pip"), version("setuptools"), cxx, compiler, os.environ.get("CFLAGS", ""),
             os.environ.get("CXXFLAGS", ""), os.environ.get("LDFLAGS", ""))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _unpack(sdist: Path, src: Path):
    """Make ``src`` hold exactly the sdist's files, leaving unchanged ones (and their time stamps) alone; keep
    the objects in src/build/temp.*, drop the Python files earlier builds copied to src/build/lib.*."""
    stamp = src.parent / "toolchain"
    if os.environ.get("SDCORE_TEST_REBUILD") == "1" or not stamp.is_file() or stamp.read_text() != _toolchain():
        shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if m.isfile()}
        for name, member in members.items():
            data, path = tar.extractfile(member).read(), src / name
            if not (path.is_file() and path.read_bytes() == data):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    for path in list(src.rglob("*")):
        name = path.relative_to(src).as_posix()
        if path.is_file() and name not in members and not name.startswith("build/temp."):
            path.unlink()
    stamp.write_text(_toolchain())


def _wheel_building() -> str | None:
    """None if setuptools can build wheels here, else what to install: setuptools before 70.1 needs `wheel`."""
    major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    if (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None:
        return None
    return f"setuptools {version('setuptools')} builds wheels only with the `wheel` package: pip install wheel"


@pytest.fixture(scope="module")
def installed(sdist, tmp_path_factory):
    """venv A with sdcore installed from the sdist (`pip install --no-build-isolation`, CPU-only), and a wheel
    `pip wheel --no-build-isolation` built from the same sdist."""
    missing = _wheel_building()
    assert missing is None, missing
    tmp = tmp_path_factory.mktemp("install")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one test run at a time builds in src
        # A new venv, always at the same path: the compile commands name its include directory.
        shutil.rmtree(CACHE / "venv-a", ignore_errors=True)
        venv_a = _make_venv(CACHE / "venv-a")
        src = CACHE / "src"
        _unpack(sdist, src)
        _pip_install(venv_a, "--no-build-isolation", "--no-cache-dir", src)
        _check(_run([venv_a, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                     "--no-cache-dir", "-w", tmp / "wheels", src], cwd=tmp, timeout=BUILD_TIMEOUT))
    wheels = sorted((tmp / "wheels").glob("sdcore-*.whl"))
    assert len(wheels) == 1, wheels
    return venv_a, wheels[0]


RUNS = textwrap.dedent("""
    import importlib.metadata, json, sys
    import torch
    import sdcore
    from sdcore import _ext, ops
    assert sdcore.__file__.startswith(sys.prefix), (sdcore.__file__, sys.prefix)
    assert _ext.load_error() is None, _ext.load_error()
    q = torch.randn(1, 2, 33, 40)
    out = ops.attention(q, q, q)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), q.double(), q.double())
    assert (out.double() - ref).abs().max() < 1e-5, "wrong attention"
    print(json.dumps({"file": sdcore.__file__, "version": sdcore.__version__,
                      "metadata": importlib.metadata.version("sdcore"), "info": _ext.build_info()}))
""")


def _runs_from_outside(python: Path, cwd: Path) -> dict:
    """`sdcore info` and an op, from a directory with no sdcore source in it."""
    venv = python.parent.parent
    info = _check(_run([venv / "bin" / "sdcore", "info"], cwd=cwd)).stdout
    assert "extension     loaded" in info, info
    result = json.loads(_check(_run([python, "-c", RUNS], cwd=cwd)).stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(venv.resolve()), result["file"]
    assert result["version"] == result["metadata"], "sdcore.__version__ is not the package metadata's version"
    assert f"sdcore        {result['version']}" in info
    assert result["info"]["built_with_torch"] == torch.__version__
    assert result["info"]["built_with_cuda"] is None and not result["info"]["cuda"], "asked for a CPU-only build"
    return result


def test_sdist_installs_into_a_fresh_venv_and_runs(installed, tmp_path):
    venv_a, _ = installed
    result = _runs_from_outside(venv_a, tmp_path)
    record = json.loads(Path(result["file"]).with_name("_build_config.json").read_text())
    assert record["torch"] == torch.__version__ and record["cuda"] is None


def test_its_wheel_installs_into_a_second_fresh_venv_and_runs(installed, tmp_path):
    _, wheel = installed
    assert not wheel.name.endswith("-none-any.whl"), f"{wheel.name}: a compiled extension needs a platform wheel"
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("sdcore/_build_config.json", "sdcore/_version.py", "sdcore/data/bpe_simple_vocab_16e6.txt.gz",
                   "sdcore/serve/app.py", "sdcore/serve/static/index.html", "sdcore/serve/static/app.js",
                   "sdcore/serve/static/style.css"):
        assert needed in names, f"{needed} not in {wheel.name}"
    assert [n for n in names if n.startswith("sdcore/_C") and n.endswith(".so")], f"no extension in {wheel.name}"
    venv_b = _make_venv(tmp_path / "venv-b")
    _pip_install(venv_b, wheel)
    (tmp_path / "elsewhere").mkdir()
    _runs_from_outside(venv_b, tmp_path / "elsewhere")


def test_a_wheel_build_without_torch_stops_with_one_line(tmp_path):
    # As under pip's build isolation: the first hook of a wheel build can't import torch.
    hook = HIDE_TORCH + "sys.path.insert(0, 'tools'); import sdcore_backend as b; b.get_requires_for_build_wheel()"
    setup = HIDE_TORCH + "import runpy; sys.argv = ['setup.py', 'bdist_wheel']; runpy.run_path('setup.py')"
    for code in (hook, setup):
        done = _run([sys.executable, "-c", code], cwd=ROOT)
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.strip() == sdcore_backend.NO_TORCH, done.stderr
    assert "pip install --no-build-isolation" in sdcore_backend.NO_TORCH


def _copy_package(dest: Path, record: dict) -> Path:
    """This checkout's sdcore package (with its compiled library, when there is one) in a directory that is
    not a source checkout, with a build record of our choosing."""
    shutil.copytree(ROOT / "sdcore", dest / "sdcore",
                    ignore=shutil.ignore_patterns("__pycache__", "_build_config.json"))
    (dest / "sdcore" / "_build_config.json").write_text(json.dumps(record))
    return dest


def test_another_torch_gets_one_clear_error_not_an_undefined_symbol(tmp_path):
    where = _copy_package(tmp_path, {"torch": "2.3.0+fake", "cuda": "11.8", "cuda_archs": "8.0"})
    code = ("import sys, sdcore; from sdcore import _ext, cli; print(_ext.load_error()); "
            "print('LOADED' if 'sdcore._C' in sys.modules else 'NOT LOADED'); "
            "print(_ext.build_info()['built_with_torch'], _ext.build_info()['built_with_cuda']); cli.main(['info'])")
    done = _check(_run([sys.executable, "-W", "default", "-c", code], cwd=where))
    error, loaded, built, *info = done.stdout.strip().splitlines()
    now = f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'})"
    assert error.startswith("sdcore._C was built with torch 2.3.0+fake (CUDA 11.8) but " + now + " is installed")
    assert "pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps" in error
    assert loaded == "NOT LOADED" and built == "2.3.0+fake 11.8"
    assert done.stderr.count("RuntimeWarning") == 1 and "sdcore._C was built with torch 2.3.0+fake" in done.stderr
    assert "undefined symbol" not in done.stdout + done.stderr
    assert "extension     NOT LOADED: " + error in info


def test_the_recorded_versions_decide():
    cuda = torch.version.cuda
    assert _ext.version_mismatch(None) is None  # no record (an older build): load and see
    assert _ext.version_mismatch({"torch": torch.__version__, "cuda": None}) is None  # CPU-only build
    assert _ext.version_mismatch({"torch": torch.__version__, "cuda": cuda}) is None
    assert "built with torch 9.9.9 (CPU kernels only) but" in _ext.version_mismatch({"torch": "9.9.9", "cuda": None})
    assert "CUDA 99.9" in _ext.version_mismatch({"torch": torch.__version__, "cuda": "99.9"})
    if Path(_ext.__file__).resolve().parents[1] == ROOT:  # this source checkout, built in place
        assert "`make`" in _ext.rebuild_command()


def test_one_version():
    tomllib = pytest.importorskip("tomllib")
    import sdcore
    from sdcore import _version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sdcore._version.__version__"}
    assert "version=" not in (ROOT / "setup.py").read_text()
    assert sdcore.__version__ == _version.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog and f"## {sdcore.__version__}" in changelog
