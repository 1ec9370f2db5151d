"""The benchmark scripts' own behaviour (their numbers are not tested: benchmarks live in bench/, not here)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ops(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "ops.py"), *args], capture_output=True, text=True,
                          timeout=300)


def test_ops_bench_puts_rates_beside_yardsticks_measured_in_the_same_run(tmp_path):
    out = tmp_path / "ops.json"
    run = _ops("--device", "cpu", "--ops", "scheduler_step,group_norm", "--quick", "--repeat", "1", "--rounds", "1",
               "--skip-reference", "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "# yardsticks (measured in this run): copy " in run.stdout and " GFLOP/s" in run.stdout
    data = json.loads(out.read_text())
    y = data["yardsticks"]
    assert y["copy_gbs"] > 0 and y["mm_gflops"] > 0 and y["spec_tflops"] is None and y["spec_gbs"] is None
    assert data["rows"] and all(r["yardstick"] == "copy" for r in data["rows"])
    for r in data["rows"]:  # the share is the row's own rate over the copy's
        assert abs(r["of_peak"] - r["bytes"] / r["kernels_ms"] / 1e6 / y["copy_gbs"]) < 1e-9 * r["of_peak"]
        assert f"{100 * r['of_peak']:.0f}% copy" in run.stdout


def test_ops_bench_names_an_unknown_op():
    run = _ops("--device", "cpu", "--ops", "group_norm+silu")
    assert run.returncode == 2
    assert ("--ops: unknown op(s) 'group_norm+silu'; choose from attention, group_norm, geglu, linear_add, conv3x3, "
            "scheduler_step") in run.stderr


def test_ops_bench_puts_flop_rates_beside_the_spec_sheet_where_it_knows_the_gpu():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import ops as bench_ops
    finally:
        sys.path.remove(str(ROOT / "bench"))
    case = dict(flops=2e12, bytes=None)  # 2 TFLOP in 4 ms: 500 TFLOP/s
    known = dict(copy_gbs=3000.0, mm_gflops=700e3, spec_tflops=989.4, spec_gbs=3350)
    frac, yard = bench_ops.of_peak(case, 4.0, known)
    assert yard == "spec" and abs(frac - 500 / 989.4) < 1e-12
    frac, yard = bench_ops.of_peak(case, 4.0, dict(known, spec_tflops=None))  # fp32, or a card it doesn't know
    assert yard == "mm" and abs(frac - 500e3 / 700e3) < 1e-12
    assert bench_ops.of_peak(dict(flops=None, bytes=None), 1.0, known) == (None, "")
    names = [key for key, _, _ in bench_ops.GPU_SPECS]
    # Most specific first: "H100 PCIe" must not be read as an SXM H100, nor an A100 80GB as a 40GB one.
    assert names.index("H100 PCIe") < names.index("H100") and names.index("H100 NVL") < names.index("H100")
    assert names.index("A100-SXM4-80GB") < names.index("A100") and names.index("A100 80GB PCIe") < names.index("A100")
