"""The CPU kernels are compiled three times (AVX-512, AVX2 + FMA, baseline x86-64) and the best build the CPU
runs is picked when the library loads; SDCORE_CPU_CAPABILITY caps the pick. A machine only ever runs its best
build, so without this file the two lower builds would never be tested on an AVX-512 machine (and the
baseline build on no CI machine at all). Each build runs in its own process on the same inputs, and every
output is checked against float64 math done here."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdcore import _ext

pytestmark = pytest.mark.skipif(_ext.load_error() is not None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="the CPU builds are x86-64 only (and need the compiled extension)")

CAPABILITIES = ("avx512", "avx2", "default")
RANK = {name: i for i, name in enumerate(reversed(CAPABILITIES))}

# The special values SiLU must map as the reference does: NaN stays NaN, -inf gives NaN (-inf * 0), far
# negatives give -0, +inf stays inf; the rest straddle the kernels' clamps at -87.3 and -80.
SPECIAL = [float("-inf"), float("nan"), -1e30, -1e19, -88.0, -87.0, -80.5, -79.5, -50.0, -1.0, -1e-30, 0.0,
           1e-30, 1.0, 50.0, 88.5, 1e19, 1e30, float("inf")]

# GroupNorm shapes: channels_last channel counts below, at and past the 64-channel register tile, groups
# of 1..25 channels, and odd spatial sizes; attention with head dims off the vector width and odd lengths.
GN_CASES = [((2, 96, 7, 9), 32), ((1, 40, 5, 3), 8), ((2, 200, 3, 3), 8), ((1, 64, 4, 4), 32), ((3, 130, 2, 5), 2)]
ATTN_CASES = [(2, 3, 37, 29, 40, False), (1, 2, 77, 77, 64, True), (1, 1, 65, 130, 80, False), (1, 1, 9, 33, 17, False)]


def _inputs():
    g = torch.Generator().manual_seed(0)
    gn = []
    for shape, groups in GN_CASES:
        x = torch.randn(shape, generator=g) * 3 + torch.randn(shape[1], 1, 1, generator=g)
        gn.append((x, groups, torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)))
    # A large common offset: the shifted sums must keep the variance of 1e4 + N(0, 1).
    x = torch.randn(2, 64, 5, 5, generator=g) + 1e4
    gn.append((x, 8, torch.ones(64), torch.zeros(64)))
    attn = [tuple(torch.randn(b, h, n if i == 0 else m, d, generator=g) for i in range(3)) + (causal,)
            for b, h, n, m, d, causal in ATTN_CASES]
    return gn, attn


def _run(out: Path):
    """Child process: every op on the inputs, with the build SDCORE_CPU_CAPABILITY allows."""
    from sdcore import ops

    gn, attn = _inputs()
    results = {"capability": _ext.build_info()["cpu_capability"], "gn": [], "attn": []}
    for x, groups, w, b in gn:
        for channels_last in (False, True):
            xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            results["gn"].append([ops.group_norm(xi, groups, w, b, 1e-5, silu=s) for s in (False, True)])
    # weight 0 and bias = each special value: the output is silu(bias) everywhere.
    bias = torch.tensor(SPECIAL)
    x = torch.randn(1, len(SPECIAL), 3, 5)
    results["silu"] = [ops.group_norm(x.contiguous(memory_format=f), len(SPECIAL), torch.zeros(len(SPECIAL)), bias,
                                      1e-5, silu=True) for f in (torch.contiguous_format, torch.channels_last)]
    # A dense sweep the same way: every build's SiLU (its own exp, table and reciprocal) against float64.
    sweep = _silu_sweep()
    results["silu_sweep"] = [ops.group_norm(torch.zeros(1, len(sweep), 1, 3).contiguous(memory_format=f), len(sweep),
                                            torch.zeros(len(sweep)), sweep, 1e-5, silu=True)
                             for f in (torch.contiguous_format, torch.channels_last)]
    for q, k, v, causal in attn:
        results["attn"].append(ops.attention(q, k, v, causal=causal))
    results["geglu"] = [torch.ops.sdcore.geglu(h, b) for h, b in _geglu_inputs()]
    results["conv3x3"] = [torch.ops.sdcore.conv3x3(*c) for c in _conv3x3_inputs()]
    torch.save(results, out)


def _conv3x3_inputs():
    """Winograd convolutions whose filter transforms take every path of every build: input channels off the
    16-filter vector and past the 64-filter block; U streamed (with and without whole-line stores, which need
    channels in 16s) and fused (few tiles)."""
    g = torch.Generator().manual_seed(2)
    shapes = [(1, 5, 3, 7, 9), (2, 80, 24, 6, 10), (1, 37, 20, 40, 40), (1, 96, 32, 34, 34)]
    return [(torch.randn(b, c, h, w, generator=g), torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5,
             torch.randn(co, generator=g)) for b, c, co, h, w in shapes]


def _silu_sweep():
    """20001 points over [-90, 90] (both clamps, -80 and 87.3, inside), and 1000 around -80."""
    return torch.cat([torch.linspace(-90, 90, 20001), torch.linspace(-80.01, -79.99, 1000)])


def _geglu_inputs():
    """GEGLU rows of widths off and on the vector widths, the gate's special values among them."""
    g = torch.Generator().manual_seed(1)
    cases = [(torch.randn(5, 2 * f, generator=g) * 3, torch.randn(2 * f, generator=g)) for f in (1, 7, 16, 37, 80)]
    special = torch.tensor(SPECIAL)
    cases.append((torch.cat([torch.randn(1, len(SPECIAL), generator=g), special[None]], dim=1), None))
    return cases


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{capability: results} for every build this CPU runs (a build the CPU lacks reports a lower one)."""
    root = Path(__file__).resolve().parents[1]
    found = {}
    for cap in CAPABILITIES:
        path = tmp_path_factory.mktemp(cap) / "out.pt"
        env = {**os.environ, "SDCORE_CPU_CAPABILITY": cap, "PYTHONPATH": str(root)}
        code = f"import sys; sys.path.insert(0, {str(root / 'tests')!r}); import test_cpu_capabilities as t; " \
               f"t._run(__import__('pathlib').Path({str(path)!r}))"
        subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=root, timeout=300)
        found[cap] = torch.load(path)
    return found


def _gn_reference(x, groups, w, b, silu):
    y = F.group_norm(x.double(), groups, w.double(), b.double(), 1e-5)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_build_is_picked_and_capped(outputs, cap):
    got = outputs[cap]["capability"]
    assert got in CAPABILITIES
    # The cap is an upper bound: a build above it never runs, and the CPU may only lack the higher ones.
    assert RANK[got] <= RANK[cap]
    if got != cap:
        pytest.skip(f"this CPU has no {cap}: SDCORE_CPU_CAPABILITY={cap} ran the {got} build (checked below)")


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_group_norm_every_build(outputs, cap):
    gn, _ = _inputs()
    got = iter(outputs[cap]["gn"])
    for x, groups, w, b in gn:
        for channels_last in (False, True):
            plain, silu = next(got)
            assert plain.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            for y, s in ((plain, False), (silu, True)):
                ref = _gn_reference(x, groups, w, b, s)
                torch.testing.assert_close(y.double(), ref, rtol=2e-5, atol=2e-5,
                                           msg=lambda m: f"{cap} {tuple(x.shape)} g{groups} cl={channels_last} "
                                                         f"silu={s}: {m}")


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_silu_special_values_every_build(outputs, cap):
    bias = torch.tensor(SPECIAL, dtype=torch.float64)
    expected = F.silu(bias).view(1, -1, 1, 1).expand(1, len(SPECIAL), 3, 5)
    for y in outputs[cap]["silu"]:
        # atol: below -80 the kernels return -0 for silu(y) = y * e^y, which is under 1.4e-33 there.
        torch.testing.assert_close(y.double(), expected, rtol=2e-6, atol=1e-30, equal_nan=True,
                                   msg=lambda m: f"{cap}: {m}")
        # The sign survives too (-0 for the far negatives), so a later multiply keeps it.
        keep = ~torch.isnan(expected)
        assert torch.equal(torch.signbit(y.double())[keep], torch.signbit(expected)[keep]), (cap, y[0, :, 0, 0])


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_silu_sweep_every_build(outputs, cap):
    sweep = _silu_sweep().double()
    expected = F.silu(sweep).view(1, -1, 1, 1).expand(1, len(sweep), 1, 3)
    for y in outputs[cap]["silu_sweep"]:
        # Every build is within 2.0e-7 (under 3 ulp; measured), so a wrong table entry or polynomial term, or a
        # skipped Newton step, fails rtol 5e-7. atol: the -0 below -80, as above.
        torch.testing.assert_close(y.double(), expected, rtol=5e-7, atol=1e-30, msg=lambda m: f"{cap}: {m}")


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_attention_every_build(outputs, cap):
    _, attn = _inputs()
    for (q, k, v, causal), y in zip(attn, outputs[cap]["attn"]):
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{cap} q{tuple(q.shape)} k{tuple(k.shape)} causal={causal}: {m}")


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_geglu_every_build(outputs, cap):
    for (h, b), y in zip(_geglu_inputs(), outputs[cap]["geglu"]):
        value, gate = (h.double() + (0 if b is None else b.double())).chunk(2, dim=-1)
        ref = value * F.gelu(gate)
        # atol: 1e-6 of the largest output (the project's float32 rule is 1e-5): products of ~10 with gates
        # near -4, where GELU's erf approximation is 4e-7 off, are off by a few 1e-6 in absolute terms.
        atol = 1e-6 * float(ref[ref.isfinite()].abs().max())
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{cap} h{tuple(h.shape)}: {m}")


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_conv3x3_every_build(outputs, cap):
    baseline = outputs["default"]["conv3x3"]
    for (x, w, b), y, y_default in zip(_conv3x3_inputs(), outputs[cap]["conv3x3"], baseline, strict=True):
        ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{cap} {tuple(x.shape)}: {m}")
        # The transforms are the same float and double operations in the same order in every build (the AVX-512
        # filter transform is written by hand), and MKL does the GEMMs: the builds agree bit for bit.
        assert torch.equal(y, y_default), f"{cap} {tuple(x.shape)}: differs from the default build"


def test_info_names_the_build():
    info = _ext.build_info()
    assert info["cpu_capability"] in CAPABILITIES
    out = subprocess.run([sys.executable, "-m", "sdcore", "info"], capture_output=True, text=True, check=True,
                         env={**os.environ, "SDCORE_CPU_CAPABILITY": "default"}).stdout
    assert "cpu kernels   yes, default build" in out, out


def test_bad_capability_is_named():
    code = "import torch, sdcore; from sdcore import ops; ops.group_norm(torch.randn(1, 4, 2, 2), 2)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "SDCORE_CPU_CAPABILITY": "sse9"})
    assert proc.returncode != 0
    assert "SDCORE_CPU_CAPABILITY=sse9 is not one of default, avx2, avx512" in proc.stderr, proc.stderr[-2000:]
