"""Finding the CUDA toolkit the way setup.py needs it, with no environment variable set: the nvcc on PATH
may be a wrapper script (so torch's own guess of CUDA_HOME is wrong), and torch's CUDA headers include
headers (cusparse.h, ...) that pip's nvidia-* wheels ship. Used by setup.py and the build tests."""
import glob
import os
import re
import shutil
import sys
import sysconfig


def _is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and (
        glob.glob(os.path.join(path, "lib64", "libcudart.so*"))
        or glob.glob(os.path.join(path, "lib", "libcudart.so*"))
        or glob.glob(os.path.join(path, "targets", "*", "lib", "libcudart.so*"))
    )


def _nvcc_behind(path, depth=0):
    """Follow symlinks and `exec /real/nvcc` wrapper scripts to the real nvcc binary."""
    path = os.path.realpath(path)
    if depth > 4 or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"#!"):
        return path
    for match in re.finditer(rb"(/[^\s\"'$;]+/nvcc)\b", head):
        target = match.group(1).decode()
        if os.path.realpath(target) != path and os.path.isfile(target):
            return _nvcc_behind(target, depth + 1)
    return None


def find_cuda_home():
    """The toolkit root: $CUDA_HOME if valid, else the root behind the nvcc on PATH, else /usr/local/cuda*."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = _nvcc_behind(nvcc)
        if real:
            candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit_root(c):
            return os.path.realpath(c)
    return None


def extra_cuda_include_dirs():
    """pip's nvidia-* wheels ship headers (cusparse.h, cublas_v2.h, ...) that torch's CUDA headers include
    but a bare toolkit may lack."""
    dirs = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        if base and os.path.isdir(base):
            dirs += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    seen, out = set(), []
    for d in dirs:
        if d not in seen and os.path.isfile(os.path.join(d, "cusparse.h")):
            seen.add(d)
            out.append(d)
    return out
