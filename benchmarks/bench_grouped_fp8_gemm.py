"""Grouped FP8 GEMMs for MoE experts (contiguous and masked layouts), shapes of issue 4.

Peers, same inputs, same process:
  cublas_block        a Python loop of torch._scaled_mm (1x128 / 128x128 block scales), one call
                      per group (masked: on the valid rows only);
  deepseek_ops_dense  our dense fp8_gemm on the same total rows against one expert's weight: the
                      upper bound a grouped kernel can reach.
FLOPs count valid rows only: 2 * sum(rows) * N * K. Bytes = valid rows of A + every group's B +
valid rows of D + scales. Ours is checked per group against the float64 reference before timing.
"""
from typing import Callable, Dict, List

import pytest
import torch

from benchmarks.bench_fp8_gemm import CALC_DIFF_BOUND, cublas_block_fn, time_op
from benchmarks.report import OURS, Record, throughput
from benchmarks.timing import host_overhead_us
from deepseek_ops import reference
from deepseek_ops.testing import calc_diff

CONTIGUOUS_SHAPES = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168), (8, 4096, 7168, 2048)]
MASKED_SHAPES = [(1, 1024, 4096, 7168), (2, 512, 4096, 7168), (4, 256, 4096, 7168), (4, 256, 7168, 2048),
                 (32, 32, 7168, 2048)]


def grouped_bytes(num_groups: int, rows: int, n: int, k: int) -> int:
    total = num_groups * rows
    return total * k + num_groups * n * k + 2 * total * n + 4 * (total * (k // 128) +
                                                                 num_groups * -(-n // 128) * (k // 128))


def _weights(num_groups: int, n: int, k: int):
    import deepseek_ops

    b, b_scales = [], []
    for _ in range(num_groups):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        q, s = deepseek_ops.per_block_quant_fp8(w, 128)
        b.append(q)
        b_scales.append(s)
    return torch.stack(b), torch.stack(b_scales)


def _activations(rows: int, k: int):
    import deepseek_ops

    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    return deepseek_ops.per_token_group_quant_fp8(x, 128, column_major_scales=True)


def _check_groups(kernel: str, shape: dict, outs, refs):
    for g, (out, ref) in enumerate(zip(outs, refs)):
        diff = calc_diff(out, ref)
        if not diff < CALC_DIFF_BOUND:
            raise AssertionError(f"{kernel} {shape}: group {g} calc_diff {diff:.3g}; not timed")


def _measure(kernel: str, shape: dict, fns: Dict[str, Callable[[], object]], flops: float,
             bytes_moved: int) -> List[Record]:
    records = []
    for impl, fn in fns.items():
        try:
            fn()
        except RuntimeError as exc:
            print(f"{kernel} {shape}: {impl} unsupported ({str(exc).splitlines()[0][:120]})", flush=True)
            continue
        ms = time_op(fn)
        tflops, gbps = throughput(ms, flops=flops, bytes_moved=bytes_moved)
        records.append(Record(kernel, dict(shape), impl, ms, tflops, gbps, None))
        if impl == OURS:
            print(f"{kernel} {shape}: ours {ms * 1e3:.1f} us, {tflops:.0f} TFLOP/s, {gbps:.0f} GB/s; host "
                  f"overhead {host_overhead_us(fn):.1f} us per eager call", flush=True)
    return records


def measure_contiguous(num_groups: int, rows: int, n: int, k: int) -> List[Record]:
    import deepseek_ops

    assert rows % deepseek_ops.grouped_gemm_alignment() == 0
    a, a_scales = _activations(num_groups * rows, k)
    b, b_scales = _weights(num_groups, n, k)
    m_indices = torch.arange(num_groups, device="cuda", dtype=torch.int32).repeat_interleave(rows)
    shape = {"G": num_groups, "M": rows, "N": n, "K": k}
    sl = [slice(g * rows, (g + 1) * rows) for g in range(num_groups)]
    ours = lambda: deepseek_ops.grouped_fp8_gemm_contiguous(a, a_scales, b, b_scales, m_indices)
    out = ours()
    return _check_and_time("grouped_fp8_gemm_contiguous", shape, [out[s] for s in sl],
                           [(a[s], a_scales[s], b[g], b_scales[g]) for g, s in enumerate(sl)], ours,
                           lambda: deepseek_ops.fp8_gemm(a, a_scales, b[0], b_scales[0]))


def _check_and_time(kernel: str, shape: dict, out_groups, operands, ours, dense) -> List[Record]:
    """Checks each group's output against the float64 reference of its operands (a, a_scales, b,
    b_scales), then times ours, a cuBLAS block-scaled call per group and our dense GEMM of the same
    rows."""
    refs = [reference.fp8_gemm(*ops, torch.float64) for ops in operands]
    _check_groups(kernel, shape, out_groups, refs)
    del refs
    peers = [cublas_block_fn(*ops) for ops in operands]
    fns = {OURS: ours, "cublas_block": lambda: [f() for f in peers], "deepseek_ops_dense": dense}
    g, m, n, k = shape["G"], shape["M"], shape["N"], shape["K"]
    records = _measure(kernel, shape, fns, 2.0 * g * m * n * k, grouped_bytes(g, m, n, k))
    torch.cuda.empty_cache()
    return records


def measure_masked(num_groups: int, rows: int, n: int, k: int) -> List[Record]:
    import deepseek_ops

    a2, s2 = _activations(num_groups * rows, k)
    a = a2.view(num_groups, rows, k)
    a_scales = s2.view(num_groups, rows, k // 128)  # M-major over the flattened rows: the fast layout
    b, b_scales = _weights(num_groups, n, k)
    masked_m = torch.full((num_groups,), rows, device="cuda", dtype=torch.int32)
    shape = {"G": num_groups, "M": rows, "N": n, "K": k, "expected_m": rows}
    ours = lambda: deepseek_ops.grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, rows)
    out = ours()
    return _check_and_time("grouped_fp8_gemm_masked", shape, list(out),
                           [(a[g], a_scales[g], b[g], b_scales[g]) for g in range(num_groups)], ours,
                           lambda: deepseek_ops.fp8_gemm(a2, s2, b[0], b_scales[0]))


def run(quick: bool = False) -> List[Record]:
    records: List[Record] = []
    for shape in CONTIGUOUS_SHAPES[:1] if quick else CONTIGUOUS_SHAPES:
        records += measure_contiguous(*shape)
    for shape in MASKED_SHAPES[2:3] if quick else MASKED_SHAPES:
        records += measure_masked(*shape)
    return records


@pytest.mark.gpu
def test_grouped_fp8_gemm_contiguous(benchmark):
    import deepseek_ops

    g, rows, n, k = CONTIGUOUS_SHAPES[0]
    a, a_scales = _activations(g * rows, k)
    b, b_scales = _weights(g, n, k)
    m_indices = torch.arange(g, device="cuda", dtype=torch.int32).repeat_interleave(rows)

    def call():
        deepseek_ops.grouped_fp8_gemm_contiguous(a, a_scales, b, b_scales, m_indices)
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=30, warmup_rounds=3)


@pytest.mark.gpu
def test_grouped_fp8_gemm_masked(benchmark):
    import deepseek_ops

    g, rows, n, k = MASKED_SHAPES[2]
    a2, s2 = _activations(g * rows, k)
    b, b_scales = _weights(g, n, k)
    masked_m = torch.full((g,), rows, device="cuda", dtype=torch.int32)

    def call():
        deepseek_ops.grouped_fp8_gemm_masked(a2.view(g, rows, k), s2.view(g, rows, k // 128), b, b_scales,
                                             masked_m, rows)
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=30, warmup_rounds=3)
