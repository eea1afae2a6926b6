"""FP8 quantization: per_token_group_quant_fp8, silu_mul_quant_fp8, per_block_quant_fp8 and
swiglu_backward_quant_fp8 against PyTorch (transpose_quant_fp8, measured with these helpers on the
training shapes: benchmarks/bench_train.py).

Peers: `torch` is the reference implementation (deepseek_ops.reference) run eagerly on the GPU
tensors, `torch_compile` the same function through torch.compile; for transpose_quant_fp8 and
swiglu_backward_quant_fp8 also `copy`, a device-to-device copy of the same number of bytes (half read,
half written: its time is that shape's copy-bandwidth floor, so x<copy> is our fraction of copy
bandwidth); for swiglu_backward_quant_fp8 also `unfused`, what the training step ran before it: the
SwiGLU backward in PyTorch (dh in bf16), then our per_token_group_quant_fp8 and transpose_quant_fp8 of
dh. Bytes = input read + e4m3 values written + fp32 scales written; GB/s is reported against the copy
probe of the same run.
Ops under ~50 us are timed by graph replay over copies of the input (operands from DRAM).
"""
import functools
from typing import Callable, Dict, List, Tuple

import pytest
import torch

from benchmarks.report import OURS, Record, throughput
from benchmarks.timing import SHORT_OP_MS, host_overhead_us, input_copies, pytest_benchmark, time_op
import deepseek_ops
from deepseek_ops import reference

TOKEN_GROUP_SHAPES = [(16384, 7168), (4096, 7168), (128, 7168)]  # (M, K): prefill, chunk, decode batch
BLOCK_SHAPES = [(7168, 16384)]  # (N, K): one DeepSeek-V3 weight
# (M, K) of silu_mul_quant_fp8 (input [M, 2K]): a 4096-token prefill's routed-expert rows (4096 x top-8),
# expert intermediate size 2048.
SILU_MUL_SHAPES = [(32768, 2048)]
# (M, K) of swiglu_backward_quant_fp8 (dact [M, K], h [M, 2K]): the routed-expert rows of a 4096-token
# step (4096 x top-8), expert intermediate size 2048.
SWIGLU_BACKWARD_SHAPES = [(32768, 2048)]
GROUP = 128
COPY = "copy"  # the same-bytes copy peer of the memory-bound ops (no output to compare)


def token_group_bytes(m: int, k: int, in_bytes: int = 2, group: int = GROUP) -> int:
    return in_bytes * m * k + m * k + 4 * m * (k // group)


def silu_mul_bytes(m: int, k: int, in_bytes: int = 2, group: int = GROUP) -> int:
    return in_bytes * m * 2 * k + m * k + 4 * m * (k // group)


def block_bytes(n: int, k: int, in_bytes: int = 2, block: int = 128) -> int:
    return in_bytes * n * k + n * k + 4 * (-(-n // block)) * (-(-k // block))


def transpose_quant_bytes(t: int, c: int, in_bytes: int = 2) -> int:
    t_pad = -(-t // 128) * 128
    return in_bytes * t * c + c * t_pad + 4 * c * (t_pad // 128)


def swiglu_backward_bytes(m: int, k: int, in_bytes: int = 2) -> int:
    """dact and h read; dh quantized both ways (1 x 128 along channels and along tokens) written."""
    return in_bytes * 3 * m * k + token_group_bytes(m, 2 * k, in_bytes=0) + transpose_quant_bytes(m, 2 * k, 0)


def _mismatch(out: Tuple[torch.Tensor, torch.Tensor], ref: Tuple[torch.Tensor, torch.Tensor]) -> float:
    """Fraction of values or scales whose bits differ from the reference (0.0: bitwise equal)."""
    worst = 0.0
    for o, r in zip(out, ref):
        if o.shape != r.shape or o.dtype != r.dtype:
            return 1.0
        a = o.contiguous().view(torch.uint8).reshape(o.numel(), -1)
        b = r.contiguous().view(torch.uint8).reshape(r.numel(), -1)
        worst = max(worst, float((a != b).any(-1).double().mean()) if o.numel() else 0.0)
    return worst


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    """torch.compile of a reference function, made once (the impls of every input copy share it)."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def token_group_impls(x: torch.Tensor) -> Dict[str, Callable[[], Tuple[torch.Tensor, torch.Tensor]]]:
    compiled = _compiled(reference.per_token_group_quant_fp8)
    return {OURS: lambda: deepseek_ops.per_token_group_quant_fp8(x, GROUP),
            "torch": lambda: reference.per_token_group_quant_fp8(x, GROUP, False, False),
            "torch_compile": lambda: compiled(x, GROUP, False, False)}


def silu_mul_impls(h: torch.Tensor) -> Dict[str, Callable[[], Tuple[torch.Tensor, torch.Tensor]]]:
    compiled = _compiled(reference.silu_mul_quant_fp8)
    return {OURS: lambda: deepseek_ops.silu_mul_quant_fp8(h),
            "torch": lambda: reference.silu_mul_quant_fp8(h, False, False),
            "torch_compile": lambda: compiled(h, False, False)}


def block_impls(w: torch.Tensor) -> Dict[str, Callable[[], Tuple[torch.Tensor, torch.Tensor]]]:
    compiled = _compiled(reference.per_block_quant_fp8)
    return {OURS: lambda: deepseek_ops.per_block_quant_fp8(w, 128),
            "torch": lambda: reference.per_block_quant_fp8(w, 128, False),
            "torch_compile": lambda: compiled(w, 128, False)}


def transpose_quant_impls(x: torch.Tensor) -> Dict[str, Callable]:
    compiled = _compiled(reference.transpose_quant_fp8)
    half = transpose_quant_bytes(*x.shape, x.element_size()) // 2
    src = torch.empty(half, dtype=torch.uint8, device=x.device)
    dst = torch.empty_like(src)
    return {OURS: lambda: deepseek_ops.transpose_quant_fp8(x),
            "torch": lambda: reference.transpose_quant_fp8(x),
            "torch_compile": lambda: compiled(x),
            COPY: lambda: dst.copy_(src)}


def _swiglu_operands(x: torch.Tensor, m: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """dact [M, K] and h [M, 2K], stored one after the other in the flat x (so they rotate as one input)."""
    return x[:m * k].view(m, k), x[m * k:].view(m, 2 * k)


def swiglu_backward_impls(x: torch.Tensor, m: int, k: int) -> Dict[str, Callable]:
    dact, h = _swiglu_operands(x, m, k)
    compiled = _compiled(reference.swiglu_backward_quant_fp8)
    half = swiglu_backward_bytes(m, k, x.element_size()) // 2
    src = torch.empty(half, dtype=torch.uint8, device=x.device)
    dst = torch.empty_like(src)

    def unfused():
        dh = reference.swiglu_backward(dact, h)
        return (*deepseek_ops.per_token_group_quant_fp8(dh, GROUP), *deepseek_ops.transpose_quant_fp8(dh))

    return {OURS: lambda: deepseek_ops.swiglu_backward_quant_fp8(dact, h),
            "torch": lambda: reference.swiglu_backward_quant_fp8(dact, h, True),
            "torch_compile": lambda: compiled(dact, h, True),
            "unfused": unfused,
            COPY: lambda: dst.copy_(src)}


def measure_bitwise(kernel: str, shape: dict, make_impls: Callable[[torch.Tensor], dict], x: torch.Tensor, ref,
                    bytes_moved: int) -> List[Record]:
    """Checks ours bitwise against the reference (raises if not), then times every impl (short ones
    over copies of x)."""
    records = []
    impls_per_copy = [make_impls(c["x"]) for c in input_copies({"x": x})]
    for impl, fn in impls_per_copy[0].items():
        error = None if impl == COPY else _mismatch(fn(), ref)
        if impl == OURS and error != 0.0:
            raise AssertionError(f"{kernel} {shape}: deepseek_ops differs from the reference in "
                                 f"{error:.3%} of elements; not timed")
        ms = time_op(*[impls[impl] for impls in impls_per_copy])
        _, gbps = throughput(ms, bytes_moved=bytes_moved)
        records.append(Record(kernel, dict(shape), impl, ms, None, gbps, error))
        if impl == OURS and ms < SHORT_OP_MS:
            print(f"{kernel} {shape}: host overhead {host_overhead_us(fn):.1f} us per eager call", flush=True)
    return records


def run(quick: bool = False, device: str = "cuda") -> List[Record]:
    records: List[Record] = []
    for m, k in TOKEN_GROUP_SHAPES[:1] if quick else TOKEN_GROUP_SHAPES:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        ref = reference.per_token_group_quant_fp8(x, GROUP, False, False)
        records += measure_bitwise("per_token_group_quant_fp8", {"M": m, "K": k}, token_group_impls, x, ref,
                                   token_group_bytes(m, k))
        del x, ref
    for m, k in SILU_MUL_SHAPES:
        h = torch.randn(m, 2 * k, device=device, dtype=torch.bfloat16)
        ref = reference.silu_mul_quant_fp8(h, False, False)
        records += measure_bitwise("silu_mul_quant_fp8", {"M": m, "K": k}, silu_mul_impls, h, ref,
                                   silu_mul_bytes(m, k))
        del h, ref
    for n, k in BLOCK_SHAPES:
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        ref = reference.per_block_quant_fp8(w, 128, False)
        records += measure_bitwise("per_block_quant_fp8", {"M": n, "K": k}, block_impls, w, ref, block_bytes(n, k))
        del w, ref
    for m, k in SWIGLU_BACKWARD_SHAPES:
        x = torch.randn(3 * m * k, device=device, dtype=torch.bfloat16)
        ref = reference.swiglu_backward_quant_fp8(*_swiglu_operands(x, m, k), True)
        records += measure_bitwise("swiglu_backward_quant_fp8", {"M": m, "K": k},
                                   functools.partial(swiglu_backward_impls, m=m, k=k), x, ref,
                                   swiglu_backward_bytes(m, k))
        del x, ref
    if device == "cuda":
        torch.cuda.empty_cache()
    return records


# pytest-benchmark entries (`pytest benchmarks/ --benchmark-only`); GB/s goes into extra_info.


def _pytest_bench(benchmark, impl_fn, ref, bytes_moved: int):
    out = impl_fn()
    assert _mismatch(out, ref) == 0.0, "deepseek_ops differs from the reference; not timed"
    ms = pytest_benchmark(benchmark, impl_fn)
    benchmark.extra_info["gbps"] = throughput(ms, bytes_moved=bytes_moved)[1]


@pytest.mark.gpu
def test_per_token_group_quant_fp8(benchmark):
    m, k = TOKEN_GROUP_SHAPES[0]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    _pytest_bench(benchmark, lambda: deepseek_ops.per_token_group_quant_fp8(x, GROUP),
                  reference.per_token_group_quant_fp8(x, GROUP, False, False), token_group_bytes(m, k))


@pytest.mark.gpu
def test_per_block_quant_fp8(benchmark):
    n, k = BLOCK_SHAPES[0]
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    _pytest_bench(benchmark, lambda: deepseek_ops.per_block_quant_fp8(w, 128),
                  reference.per_block_quant_fp8(w, 128, False), block_bytes(n, k))
