import os
import subprocess
import sys

import pytest

from sdcore import _ext


def sdcore(*args, check=False):
    return subprocess.run([sys.executable, "-m", "sdcore", *args], capture_output=True, text=True, check=check)


def test_info_lists_build_devices_and_backend():
    out = sdcore("info", check=True).stdout
    for fragment in ("torch", "cpu kernels   yes", "cuda kernels", "backend       kernels"):
        assert fragment in out, out


def test_info_names_the_cuda_attention_family():
    if not _ext.build_info()["cuda"]:
        pytest.skip("a CPU-only build has no CUDA attention to name")
    env = {**os.environ, "SDCORE_CUDA_ATTENTION": "sm90"}
    out = subprocess.run([sys.executable, "-m", "sdcore", "info"], capture_output=True, text=True, env=env,
                         check=True).stdout
    hopper = _ext.has_sm90_kernels()
    assert "cuda attn     sm90 (SDCORE_CUDA_ATTENTION" in out, out
    assert ("is in this build" if hopper else "not in this build") in out, out


def test_validate_passes_on_this_machine():
    run = sdcore("validate", "--quick")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["op", "shape", "dtype"]
    rows = [line for line in lines if line.endswith("PASS") or line.endswith("FAIL")]
    assert {r.split()[0] for r in rows} == {"attention", "group_norm", "geglu", "linear_add", "conv3x3",
                                            "scheduler_step"}
    assert all(r.endswith("PASS") for r in rows)
    assert lines[-1] == f"{len(rows)} passed, 0 failed"


@pytest.mark.parametrize("args,fragment", [
    (["validate", "--dtype", "fp64"], "unknown dtype 'fp64'"),
])
def test_validate_rejects_bad_arguments(args, fragment):
    run = sdcore(*args)
    assert run.returncode == 2 and fragment in run.stderr


def test_validate_cuda_without_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    run = sdcore("validate", "--device", "cuda")
    assert run.returncode == 2 and "torch sees no CUDA device" in run.stderr


def test_help_describes_commands():
    out = sdcore("--help", check=True).stdout
    assert "info" in out and "validate" in out
    out = sdcore("validate", "--help", check=True).stdout
    assert "--device" in out and "--dtype" in out and "1e-5" in out
