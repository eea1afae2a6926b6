"""Grouped FP8 GEMMs for MoE experts (contiguous and masked layouts), on DeepSeek-V3's expert shapes.

Peers, same inputs, same process:
  cublas_block        a Python loop of torch._scaled_mm (1x128 / 128x128 block scales), one call
                      per group (masked: on the valid rows only);
  deepseek_ops_dense  our dense fp8_gemm on the same total rows against one expert's weight: the
                      upper bound a grouped kernel can reach;
  deepgemm            DeepGEMM's m_grouped_fp8_gemm_nt_{contiguous,masked}, when importable.
Every impl is timed in two rounds, the second in reversed order (timing.time_rounds).
FLOPs count valid rows only: 2 * sum(rows) * N * K. Bytes = valid rows of A + every group's B +
valid rows of D + scales. Ours and DeepGEMM are checked per group against the float64 reference
before timing.
Ops under ~50 us are timed by graph replay over copies of the inputs (operands from DRAM).
"""
import functools
from typing import Callable, Dict, List

import pytest
import torch

from benchmarks.bench_fp8_gemm import CALC_DIFF_BOUND, cublas_block_fn
from benchmarks.report import OURS, Record, throughput
from benchmarks.peers import deepgemm_contiguous_fn, deepgemm_masked_fn, passes_check
from benchmarks.timing import host_overhead_us, input_copies, pytest_benchmark, time_rounds
import deepseek_ops
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
    b, b_scales = [], []
    for _ in range(num_groups):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        q, s = deepseek_ops.per_block_quant_fp8(w, 128)
        b.append(q)
        b_scales.append(s)
    return torch.stack(b), torch.stack(b_scales)


def _activations(rows: int, k: int):
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    return deepseek_ops.per_token_group_quant_fp8(x, 128, column_major_scales=True)


# Inputs as a dict of tensors (so that input_copies can rotate them); each layout's impls() maps a
# dict to {impl: fn}: ours, a cuBLAS block-scaled call per group and our dense GEMM of the same rows.

def contiguous_impls(t: dict, num_groups: int, rows: int) -> Dict[str, Callable[[], object]]:
    sl = [slice(g * rows, (g + 1) * rows) for g in range(num_groups)]
    peers = [cublas_block_fn(t["a"][s], t["a_scales"][s], t["b"][g], t["b_scales"][g]) for g, s in enumerate(sl)]
    fns = {OURS: lambda: deepseek_ops.grouped_fp8_gemm_contiguous(t["a"], t["a_scales"], t["b"], t["b_scales"],
                                                                 t["m_indices"]),
           "deepgemm": deepgemm_contiguous_fn(t["a"], t["a_scales"], t["b"], t["b_scales"], t["m_indices"]),
           "cublas_block": lambda: [f() for f in peers],
           "deepseek_ops_dense": lambda: deepseek_ops.fp8_gemm(t["a"], t["a_scales"], t["b"][0], t["b_scales"][0])}
    return {impl: fn for impl, fn in fns.items() if fn is not None}


def masked_impls(t: dict, num_groups: int, rows: int) -> Dict[str, Callable[[], object]]:
    k = t["a"].shape[-1]
    a, a_scales = t["a"].view(num_groups, rows, k), t["a_scales"].view(num_groups, rows, k // 128)
    peers = [cublas_block_fn(a[g], a_scales[g], t["b"][g], t["b_scales"][g]) for g in range(num_groups)]
    fns = {OURS: lambda: deepseek_ops.grouped_fp8_gemm_masked(a, a_scales, t["b"], t["b_scales"], t["masked_m"],
                                                             rows),
           "deepgemm": deepgemm_masked_fn(a, a_scales, t["b"], t["b_scales"], t["masked_m"], rows),
           "cublas_block": lambda: [f() for f in peers],
           "deepseek_ops_dense": lambda: deepseek_ops.fp8_gemm(t["a"], t["a_scales"], t["b"][0], t["b_scales"][0])}
    return {impl: fn for impl, fn in fns.items() if fn is not None}


def _measure(kernel: str, shape: dict, inputs: dict, make_impls: Callable[[dict], Dict[str, Callable[[], object]]],
             split: Callable[[torch.Tensor], List[torch.Tensor]], operands) -> List[Record]:
    """Checks ours and DeepGEMM per group (split(output)) against the float64 reference of each group's
    operands (a, a_scales, b, b_scales), then times every impl; short ones over copies of the inputs."""
    refs = [reference.fp8_gemm(*ops, torch.float64) for ops in operands]
    impls_per_copy = [make_impls(c) for c in input_copies(inputs)]
    supported = []
    for impl, fn in impls_per_copy[0].items():
        try:
            out = fn()
        except Exception as exc:  # a peer's refusal
            if impl == OURS:
                raise
            print(f"{kernel} {shape}: {impl} unsupported ({str(exc).splitlines()[0][:120]})", flush=True)
            continue
        if impl in (OURS, "deepgemm"):
            diffs = [calc_diff(out_g, ref) for out_g, ref in zip(split(out), refs)]
            first_bad = next((g for g, diff in enumerate(diffs) if not diff < CALC_DIFF_BOUND), 0)
            if not passes_check(f"{kernel} {shape} group {first_bad}", impl, diffs[first_bad], CALC_DIFF_BOUND, OURS):
                continue
        supported.append(impl)
    del refs
    g, m, n, k = shape["G"], shape["M"], shape["N"], shape["K"]
    flops, bytes_moved = 2.0 * g * m * n * k, grouped_bytes(g, m, n, k)
    times = time_rounds(impls_per_copy, supported)
    records = []
    for impl, ms in times.items():
        tflops, gbps = throughput(ms, flops=flops, bytes_moved=bytes_moved)
        records.append(Record(kernel, dict(shape), impl, ms, tflops, gbps, None))
    ms = times[OURS]
    tflops, gbps = throughput(ms, flops=flops, bytes_moved=bytes_moved)
    peers = ", ".join(f"{p} {times[p] / ms:.2f}x" for p in ("deepgemm", "cublas_block") if p in times)
    print(f"{kernel} {shape}: ours {ms * 1e3:.1f} us ({peers}), {tflops:.0f} TFLOP/s, {gbps:.0f} GB/s; host "
          f"overhead {host_overhead_us(impls_per_copy[0][OURS]):.1f} us per eager call", flush=True)
    del impls_per_copy
    torch.cuda.empty_cache()
    return records


def measure_contiguous(num_groups: int, rows: int, n: int, k: int) -> List[Record]:
    assert rows % deepseek_ops.GROUPED_GEMM_ALIGNMENT == 0
    a, a_scales = _activations(num_groups * rows, k)
    b, b_scales = _weights(num_groups, n, k)
    m_indices = torch.arange(num_groups, device="cuda", dtype=torch.int32).repeat_interleave(rows)
    inputs = {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales, "m_indices": m_indices}
    shape = {"G": num_groups, "M": rows, "N": n, "K": k}
    make_impls = functools.partial(contiguous_impls, num_groups=num_groups, rows=rows)
    sl = [slice(g * rows, (g + 1) * rows) for g in range(num_groups)]
    return _measure("grouped_fp8_gemm_contiguous", shape, inputs, make_impls, lambda out: [out[s] for s in sl],
                    [(a[s], a_scales[s], b[g], b_scales[g]) for g, s in enumerate(sl)])


def measure_masked(num_groups: int, rows: int, n: int, k: int) -> List[Record]:
    # a and a_scales flattened to [G * rows, ...]: M-major scales over the flattened rows, the fast
    # layout; masked_impls views them per group.
    a, a_scales = _activations(num_groups * rows, k)
    b, b_scales = _weights(num_groups, n, k)
    masked_m = torch.full((num_groups,), rows, device="cuda", dtype=torch.int32)
    inputs = {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales, "masked_m": masked_m}
    shape = {"G": num_groups, "M": rows, "N": n, "K": k, "expected_m": rows}
    make_impls = functools.partial(masked_impls, num_groups=num_groups, rows=rows)
    sl = [slice(g * rows, (g + 1) * rows) for g in range(num_groups)]
    return _measure("grouped_fp8_gemm_masked", shape, inputs, make_impls, list,
                    [(a[s], a_scales[s], b[g], b_scales[g]) for g, s in enumerate(sl)])


def run(quick: bool = False) -> List[Record]:
    records: List[Record] = []
    for shape in CONTIGUOUS_SHAPES[:1] if quick else CONTIGUOUS_SHAPES:
        records += measure_contiguous(*shape)
    for shape in MASKED_SHAPES[2:3] if quick else MASKED_SHAPES:
        records += measure_masked(*shape)
    return records


@pytest.mark.gpu
def test_grouped_fp8_gemm_contiguous(benchmark):
    g, rows, n, k = CONTIGUOUS_SHAPES[0]
    a, a_scales = _activations(g * rows, k)
    b, b_scales = _weights(g, n, k)
    m_indices = torch.arange(g, device="cuda", dtype=torch.int32).repeat_interleave(rows)

    pytest_benchmark(benchmark, lambda: deepseek_ops.grouped_fp8_gemm_contiguous(a, a_scales, b, b_scales, m_indices))


@pytest.mark.gpu
def test_grouped_fp8_gemm_masked(benchmark):
    g, rows, n, k = MASKED_SHAPES[2]
    a2, s2 = _activations(g * rows, k)
    b, b_scales = _weights(g, n, k)
    masked_m = torch.full((g,), rows, device="cuda", dtype=torch.int32)

    pytest_benchmark(benchmark, lambda: deepseek_ops.grouped_fp8_gemm_masked(
        a2.view(g, rows, k), s2.view(g, rows, k // 128), b, b_scales, masked_m, rows))
