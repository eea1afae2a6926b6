"""Benchmark report plumbing (CPU): JSON schema, file naming, tables, plot, module discovery."""
import datetime
import importlib
import inspect
import json
import sys
import types

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import peers, report
from benchmarks.peers import passes_check
from benchmarks.report import OURS, Record

CEILINGS = {"copy_gbps": 4000.0, "bf16_tflops": 700.0}


def sample_records():
    shape = {"M": 16384, "K": 7168}
    gemm = {"M": 4096, "N": 7168, "K": 16384}
    return [Record("per_token_group_quant_fp8", shape, OURS, 0.2, None, 3200.0, 0.0),
            Record("per_token_group_quant_fp8", shape, "torch", 1.0, None, 640.0, 0.0),
            Record("fp8_gemm", gemm, OURS, 1.0, 1400.0, 300.0, 1e-5),
            Record("fp8_gemm", gemm, "cublas_block", 1.4, 1000.0, 214.0, 1e-5)]


def test_json_schema(tmp_path):
    path = report.write_json(sample_records(), CEILINGS, tmp_path)
    data = json.loads(path.read_text())
    assert set(data) == {"gpu", "commit", "date", "torch", "cuda", "ceilings", "records"}
    assert data["ceilings"] == CEILINGS
    datetime.datetime.fromisoformat(data["date"])
    assert data["records"][0] == {"kernel": "per_token_group_quant_fp8", "shape": {"M": 16384, "K": 7168},
                                  "impl": "deepseek_ops", "median_ms": 0.2, "tflops": None, "gbps": 3200.0,
                                  "error": 0.0}
    assert path.name == f"{report.results_stem(data['gpu'], data['commit'], datetime.datetime.now())}.json"


def test_results_stem():
    when = datetime.datetime(2026, 3, 7)
    assert report.results_stem("NVIDIA H200", "abc1234", when) == "NVIDIA_H200-20260307-abc1234"


def test_throughput():
    assert report.throughput(2.0, flops=4e12, bytes_moved=8e9) == pytest.approx((2000.0, 4000.0))
    assert report.throughput(1.0) == (None, None)


def test_tables_speedup_and_ceiling_fractions():
    text = report.format_tables(sample_records(), CEILINGS)
    quant = text.split("== fp8_gemm ==")[0]
    header, _, row = quant.strip().splitlines()[1:4]
    cells = dict(zip([h.strip() for h in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["xtorch"] == "5.00"  # torch time / our time
    assert cells["%copy"] == "80.0"
    gemm_row = text.split("== fp8_gemm ==")[1].strip().splitlines()[2]
    gemm_header = text.split("== fp8_gemm ==")[1].strip().splitlines()[0]
    gemm = dict(zip([h.strip() for h in gemm_header.split("|")], [c.strip() for c in gemm_row.split("|")]))
    assert gemm["xcublas_block"] == "1.40"
    assert gemm["%mm"] == "200.0"
    assert gemm["%peak"] == f"{100 * 1400 / report.FP8_PEAK_TFLOPS:.1f}"


def test_roofline_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the roofline plot")
    path = report.plot_roofline(sample_records(), CEILINGS, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_modules_discovered_and_failures_reported():
    assert "bench_quant" in bench_main.bench_modules()
    assert bench_main._selected(["bench_quant", "bench_x"], ["quant"]) == ["bench_quant"]
    records, failures = bench_main.run_modules(["bench_no_such_module"], quick=True)
    assert records == [] and [name for name, _ in failures] == ["bench_no_such_module"]


def test_every_bench_module_imports_without_a_gpu():
    # `python -m benchmarks` imports them on the GPU machine, where a broken import costs a run.
    for name in bench_main.bench_modules():
        module = importlib.import_module(f"benchmarks.{name}")
        assert "quick" in inspect.signature(module.run).parameters, name


def test_json_at_a_given_path_with_the_header_of_another_machine(tmp_path):
    path = report.write_json(sample_records(), {}, path=tmp_path / "sub" / "x.json", gpu="NVIDIA H200",
                             commit="abc1234")
    data = json.loads(path.read_text())
    assert (data["gpu"], data["commit"], data["ceilings"]) == ("NVIDIA H200", "abc1234", {})
    assert len(data["records"]) == len(sample_records())


def test_peer_failing_the_reference_check_is_skipped_and_ours_raises(capsys):
    assert passes_check("shape", "deepgemm", 1e-7, 1e-5, "deepseek_ops")
    assert not passes_check("shape", "deepgemm", 0.5, 1e-5, "deepseek_ops")
    assert not passes_check("shape", "flashmla", float("nan"), 1e-5, "deepseek_ops")
    assert "flashmla calc_diff nan" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="deepseek_ops calc_diff 0.5"):
        passes_check("shape", "deepseek_ops", 0.5, 1e-5, "deepseek_ops")


def test_deepgemm_without_its_kernels_is_skipped_with_the_cause(monkeypatch, capsys):
    # deep_gemm's __init__ swallows an ImportError of its kernels and imports without them: the peer must
    # then be skipped (None and one line naming the cause), not fail at its first call.
    package = types.ModuleType("deep_gemm")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "deep_gemm", package)
    monkeypatch.setitem(sys.modules, "deep_gemm._C", types.ModuleType("deep_gemm._C"))
    peers._import.cache_clear()
    try:
        assert peers._import("deep_gemm") is None
        assert "peer deep_gemm not importable (cannot import name 'fp8_gemm_nt'" in capsys.readouterr().out
        sys.modules["deep_gemm._C"].fp8_gemm_nt = lambda *args: None
        peers._import.cache_clear()
        assert peers._import("deep_gemm") is package
    finally:
        peers._import.cache_clear()
