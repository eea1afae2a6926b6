"""`python -m deepseek_ops info|check` and `python -m benchmarks` on this machine."""
import subprocess
import sys

import pytest
import torch

import deepseek_ops
from deepseek_ops import _selftest
from deepseek_ops.testing import hopper_available


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_every_op():
    out = run_module("deepseek_ops", "info")
    assert out.returncode == 0, out.stderr
    for op in ("per_token_group_quant_fp8", "per_block_quant_fp8", "dequant_fp8_block"):
        assert op in out.stdout
    assert "torch " + torch.__version__ in out.stdout


def test_check_passes_here():
    out = run_module("deepseek_ops", "check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout
    for op in _selftest.CHECKS:
        assert op in out.stdout


def test_check_table_names_each_metric_and_bound():
    out = run_module("deepseek_ops", "check")
    assert "metric [unit], bound" in out.stdout
    for op, metrics in _selftest.METRICS.items():
        assert metrics["cpu"] in out.stdout, op
    assert "mla_decode" in _selftest.CHECKS


def _corrupt(monkeypatch, name, corrupt):
    original = getattr(deepseek_ops, name)

    def wrong(*args, **kwargs):
        result = original(*args, **kwargs)
        corrupt(result, args, kwargs)
        return result

    monkeypatch.setattr(deepseek_ops, name, wrong)


def test_gemm_checks_catch_a_reference_shared_bug(monkeypatch):
    """The same 1% error in the dense and the grouped GEMMs (a bug in the reference they share) fails the
    grouped checks: their expected values come from a float64 dequantize-and-matmul of their own."""
    for name in ("fp8_gemm", "grouped_fp8_gemm_contiguous", "grouped_fp8_gemm_masked"):
        _corrupt(monkeypatch, name, lambda result, args, kwargs: kwargs.get("out", result).mul_(1.01))
    for name in ("fp8_gemm", "grouped_fp8_gemm_contiguous", "grouped_fp8_gemm_masked"):
        _, passed = _selftest.CHECKS[name](torch.device("cpu"))
        assert not passed, name


def test_masked_gemm_check_catches_rows_written_past_masked_m(monkeypatch):
    def write_past(result, args, kwargs):
        out, masked_m = kwargs.get("out", result), args[4]
        if not out.is_meta:
            out[0, int(masked_m[0]):] = 1.0  # group 0's rows past its count

    _corrupt(monkeypatch, "grouped_fp8_gemm_masked", write_past)
    _, passed = _selftest.CHECKS["grouped_fp8_gemm_masked"](torch.device("cpu"))
    assert not passed


def test_mla_decode_check_catches_a_wrong_output(monkeypatch):
    _corrupt(monkeypatch, "mla_decode", lambda result, args, kwargs: result[0][:, :, 0].mul_(1.05))
    _, passed = _selftest.CHECKS["mla_decode"](torch.device("cpu"))
    assert not passed


def test_failing_check_is_reported():
    @_selftest.register_check("__test_failing_op", "made up [1], < 0")
    def failing(device):
        return 1.0, False

    @_selftest.register_check("__test_raising_op", "made up [1], < 0")
    def raising(device):
        raise RuntimeError("kernel exploded")

    try:
        rows = _selftest.run_checks(["cpu"], only=["__test_failing_op", "__test_raising_op"])
    finally:
        for name in ("__test_failing_op", "__test_raising_op"):
            del _selftest.CHECKS[name], _selftest.METRICS[name]
    assert [(r[0], r[3]) for r in rows] == [("__test_failing_op", False), ("__test_raising_op", False)]
    assert "kernel exploded" in rows[1][4]


def test_benchmarks_without_gpu_runs_the_self_test():
    if hopper_available():
        pytest.skip("on a Hopper GPU `python -m benchmarks` is the full benchmark run, not a test")
    out = run_module("benchmarks")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No benchmark run" in out.stdout and "checks passed" in out.stdout
