"""Parity harness shared by tests/, `python -m deepseek_ops check` and the benchmarks."""
import functools

import torch

from deepseek_ops._extension import build_summary, cuda_kernels_built


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2*sum(x*y) / sum(x*x + y*y), in float64: 0 for equal tensors, scale-free (DeepGEMM's metric)."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    out, ref = out.double(), ref.double()
    scale = ref.abs().max() if ref.numel() else torch.tensor(0.0)
    if scale == 0:
        return float((out - ref).abs().max()) if out.numel() else 0.0
    return float((out - ref).abs().max() / scale)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fills an output buffer with NaN (or 0x7f bytes for types without NaN) before a kernel writes it."""
    if t.dtype.is_floating_point and t.element_size() >= 2:
        return t.fill_(float("nan"))
    t.view(torch.uint8).fill_(0x7F)  # e4m3 NaN; an implausible value for integer types
    return t


def assert_written(t: torch.Tensor, name: str = "output"):
    """Every element of a poisoned buffer was overwritten (no NaN left)."""
    if t.dtype.is_floating_point:
        bad = torch.isnan(t.float())
    else:
        bad = t.view(torch.uint8) == 0x7F
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} of {t.numel()} elements not written, first at {idx}")


def assert_bitwise_equal(out: torch.Tensor, ref: torch.Tensor, name: str = "output"):
    """Same shape, dtype and bits; prints the first mismatches."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    if out.numel() == 0:
        return
    # Fresh row-major copies: .contiguous() keeps odd strides on size-1 dims, which view() rejects.
    a = torch.empty(out.shape, dtype=out.dtype).copy_(out.detach()).view(torch.uint8)
    b = torch.empty(ref.shape, dtype=ref.dtype).copy_(ref.detach()).view(torch.uint8)
    mismatch = (a != b).reshape(*out.shape, out.element_size()).any(-1)
    if mismatch.any():
        idx = mismatch.nonzero()[:5].tolist()
        firsts = [(i, out[tuple(i)].float().item(), ref[tuple(i)].float().item()) for i in idx]
        raise AssertionError(f"{name}: {int(mismatch.sum())} of {out.numel()} elements differ; first "
                             f"(index, got, expected): {firsts}")


def opcheck_fp8_safe(op, args, mutated=()):
    """torch.library.opcheck; test_schema's no-mutation check is done by hand for fp8 inputs.

    NOTE: torch's SchemaCheckMode compares inputs with allclose, which has no fp8 kernel.
    """
    test_utils = ["test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    tensors = [(i, t) for i, t in enumerate(args) if isinstance(t, torch.Tensor) and i not in mutated]
    before = [t.clone() for _, t in tensors]
    op(*args)
    for (i, t), b in zip(tensors, before):
        assert_bitwise_equal(t, b, f"input {i} after the call")
    torch.library.opcheck(op, args, test_utils=test_utils)


@functools.lru_cache(maxsize=None)
def hopper_available() -> bool:
    """A Hopper (sm_90) GPU is visible and the extension has its CUDA kernels."""
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and cuda_kernels_built())


def skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if not cuda_kernels_built():
        return f"extension {build_summary()}"
    return f"the kernels need sm_90 (Hopper); this GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}"


_GEMM_LAYOUTS = {"dense": 0, "contiguous": 1, "masked": 2, "wgrad": 3, "k_grouped_wgrad": 4}


def fp8_gemm_tile_configs(layout: str, out_dtype: torch.dtype = torch.bfloat16):
    """(BLOCK_M, BLOCK_N, cluster size) of every compiled FP8 GEMM tile variant of a layout ("dense",
    "contiguous", "masked"; "wgrad", "k_grouped_wgrad": float32 output only) and output dtype, as the
    extension reports them (empty in a build without CUDA). DSO_FP8_GEMM_CONFIG forces one (the
    gemm_config fixture of tests/conftest.py)."""
    flat = torch.ops.deepseek_ops.fp8_gemm_tile_configs()
    type_id, fp32 = _GEMM_LAYOUTS[layout], int(out_dtype == torch.float32)
    return [tuple(flat[i + 2:i + 5]) for i in range(0, len(flat), 5) if flat[i] == type_id and flat[i + 1] == fp32]
