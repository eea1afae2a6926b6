"""fp8_gemm (dense, DeepSeek-V3 scaling) against cuBLAS, on DeepSeek-V3's projection shapes.

Peers, same inputs, same process:
  cublas_block       torch._scaled_mm with 1x128 (a) / 128x128 (b) block scales (cuBLASLt); it
                     rejects some shapes (e.g. N not a multiple of 128): recorded as unsupported;
  cublas_tensorwise  torch._scaled_mm with one scale per tensor, fast accumulation: the upper
                     bound of scaled FP8 in cuBLAS (not the same math: no per-block scales);
  cublas_bf16        torch.matmul on the dequantized bf16 operands;
  deepgemm           DeepGEMM's fp8_gemm_nt (the same recipe), when importable (benchmarks/peers.py).
Every impl is timed in two rounds, the second in reversed order (timing.time_rounds).
TFLOP/s = 2MNK / t. Bytes = A + B + D (bf16) + both scale tensors. Each output is checked against
the float64 reference before timing (calc_diff < 1e-5 for ours, recorded as `error` for all).
Kernel time: CUDA events with an L2 flush, or under ~50 us CUDA-graph replay cycling through copies
of the inputs (together > 256 MiB, so no call finds its operands in L2; protocol: inputs rotated);
our host overhead per call is printed beside.
"""
from typing import Callable, Dict, List

import pytest
import torch

from benchmarks.report import OURS, Record, throughput
from benchmarks.peers import deepgemm_fp8_gemm_fn, passes_check
from benchmarks.timing import host_overhead_us, input_copies, pytest_benchmark, time_rounds
import deepseek_ops
from deepseek_ops import reference
from deepseek_ops.testing import calc_diff

NK_SHAPES = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
M_VALUES = [64, 128, 4096]
CALC_DIFF_BOUND = 1e-5


def gemm_bytes(m: int, n: int, k: int, out_bytes: int = 2) -> int:
    return m * k + n * k + out_bytes * m * n + 4 * (m * (k // 128) + -(-n // 128) * (k // 128))


def make_inputs(m: int, n: int, k: int) -> dict:
    """Quantized random activations and weights, as the model produces them (M-major a scales)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    a, a_scales = deepseek_ops.per_token_group_quant_fp8(x, 128, column_major_scales=True)
    b, b_scales = deepseek_ops.per_block_quant_fp8(w, 128)
    return {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales}


def cublas_block_fn(a, a_scales, b, b_scales) -> Callable[[], torch.Tensor]:
    """torch._scaled_mm, DeepSeek recipe: scale_a (M, K/128) outer-dim-major (strides (1, M)),
    mat2 = b^T (column-major), scale_b = b_scales^T (K/128, N/128)."""
    scale_a = a_scales.t().contiguous().t()  # stride (1, M) exactly: no M padding allowed
    scale_b = b_scales.t()
    return lambda: torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=torch.bfloat16)


def cublas_tensorwise_fn(a, b) -> Callable[[], torch.Tensor]:
    one = torch.ones((), device=a.device)
    return lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True)


def impls(inp: dict) -> Dict[str, Callable[[], torch.Tensor]]:
    a, a_scales, b, b_scales = inp["a"], inp["a_scales"], inp["b"], inp["b_scales"]
    n, k = b.shape
    a_bf16 = reference._dequant_fp8_a(a, a_scales).to(torch.bfloat16)
    b_bf16 = reference.dequant_fp8_block(b, b_scales, 128, torch.bfloat16)
    fns = {
        OURS: lambda: deepseek_ops.fp8_gemm(a, a_scales, b, b_scales),
        "deepgemm": deepgemm_fp8_gemm_fn(a, a_scales, b, b_scales),
        "cublas_block": cublas_block_fn(a, a_scales, b, b_scales),
        "cublas_tensorwise": cublas_tensorwise_fn(a, b),
        "cublas_bf16": lambda: torch.matmul(a_bf16, b_bf16.t()),
    }
    return {impl: fn for impl, fn in fns.items() if fn is not None}


def measure_shape(m: int, n: int, k: int) -> List[Record]:
    inp = make_inputs(m, n, k)
    ref = reference.fp8_gemm(inp["a"], inp["a_scales"], inp["b"], inp["b_scales"], torch.float64)
    shape = {"M": m, "N": n, "K": k}
    flops, bytes_moved = 2.0 * m * n * k, gemm_bytes(m, n, k)
    copies = [impls(c) for c in input_copies(inp)]
    errors = {}
    for impl, fn in copies[0].items():
        try:
            out = fn()
        except Exception as exc:  # a peer's refusal, e.g. cuBLASLt block scaling rejecting N % 128 != 0
            if impl == OURS:
                raise
            print(f"fp8_gemm {shape}: {impl} unsupported ({str(exc).splitlines()[0][:120]})", flush=True)
            continue
        error = calc_diff(out, ref)
        if impl in (OURS, "deepgemm") and not passes_check(f"fp8_gemm {shape}", impl, error, CALC_DIFF_BOUND, OURS):
            continue
        errors[impl] = error
    times = time_rounds(copies, list(errors))
    records = []
    for impl, ms in times.items():
        tflops, gbps = throughput(ms, flops=flops, bytes_moved=bytes_moved)
        records.append(Record("fp8_gemm", dict(shape), impl, ms, tflops, gbps, errors[impl]))
    ms = times[OURS]
    tflops, gbps = throughput(ms, flops=flops, bytes_moved=bytes_moved)
    floor_ms = max(bytes_moved / 4.8e12, flops / 1979e12) * 1e3
    peers = ", ".join(f"{p} {times[p] / ms:.2f}x" for p in ("deepgemm", "cublas_block") if p in times)
    print(f"fp8_gemm {shape}: ours {ms * 1e3:.1f} us ({peers}), {tflops:.0f} TFLOP/s ({tflops / 1979:.0%} of FP8 "
          f"peak), {gbps:.0f} GB/s, floor {floor_ms * 1e3:.1f} us; host overhead per eager call "
          f"{host_overhead_us(copies[0][OURS]):.1f} us"
          + (f" (cublas_block {host_overhead_us(copies[0]['cublas_block']):.1f} us)" if "cublas_block" in times
             else ""), flush=True)
    del inp, ref, copies
    torch.cuda.empty_cache()
    return records


def run(quick: bool = False) -> List[Record]:
    records: List[Record] = []
    ms = [64, 4096] if quick else M_VALUES
    shapes = NK_SHAPES[:2] if quick else NK_SHAPES
    for m in ms:
        for n, k in shapes:
            records += measure_shape(m, n, k)
    return records


# pytest-benchmark entries (`pytest benchmarks/ --benchmark-only`).

def _pytest_bench(benchmark, m: int, n: int, k: int):
    inp = make_inputs(m, n, k)
    fn = impls(inp)[OURS]
    ref = reference.fp8_gemm(inp["a"], inp["a_scales"], inp["b"], inp["b_scales"], torch.float64)
    assert calc_diff(fn(), ref) < CALC_DIFF_BOUND, "deepseek_ops differs from the reference; not timed"
    ms = pytest_benchmark(benchmark, fn)
    benchmark.extra_info["tflops"] = throughput(ms, flops=2.0 * m * n * k)[0]


@pytest.mark.gpu
def test_fp8_gemm(benchmark):
    _pytest_bench(benchmark, 4096, 7168, 16384)


@pytest.mark.gpu
def test_fp8_gemm_decode(benchmark):
    _pytest_bench(benchmark, 64, 7168, 16384)
