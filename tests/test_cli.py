"""`python -m deepseek_ops info|check` and `python -m benchmarks` on this machine."""
import subprocess
import sys

import pytest
import torch

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


def test_failing_check_is_reported():
    @_selftest.register_check("__test_failing_op")
    def failing(device):
        return 1.0, False

    @_selftest.register_check("__test_raising_op")
    def raising(device):
        raise RuntimeError("kernel exploded")

    try:
        rows = _selftest.run_checks(["cpu"], only=["__test_failing_op", "__test_raising_op"])
    finally:
        del _selftest.CHECKS["__test_failing_op"], _selftest.CHECKS["__test_raising_op"]
    assert [(r[0], r[3]) for r in rows] == [("__test_failing_op", False), ("__test_raising_op", False)]
    assert "kernel exploded" in rows[1][4]


def test_benchmarks_without_gpu_runs_the_self_test():
    if hopper_available():
        pytest.skip("on a Hopper GPU `python -m benchmarks` is the full benchmark run, not a test")
    out = run_module("benchmarks")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No benchmark run" in out.stdout and "checks passed" in out.stdout
