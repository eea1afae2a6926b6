"""FP8 GEMMs with DeepSeek-V3 fine-grained scaling: dense (fp8_gemm, fp8_linear) and grouped for MoE.

Scaling: `a` (activations) has one fp32 scale per row per 128 K elements, `b` (weights) one per
128 x 128 block; the product is d = (a * a_scales) @ (b * b_scales)^T, accumulated in fp32 with
the scales applied every 128 K (csrc/sm90_fp8_gemm.cu).

Scale layout of `a_scales` (the M-major layout): element (row, k_block) of the [M, K/128] scales
sits at k_block * ld + row, with ld >= M a multiple of 4, i.e. strides (1, ld): each K block's
scales are one M-contiguous, 16-byte aligned run, which the kernels read with TMA.
per_token_group_quant_fp8(..., column_major_scales=True) returns exactly this (ld = align(M, 4));
deepseek_ops.reference.column_major_scales builds it. Any other layout is accepted and costs one
extra transposing copy per call (grouped masked GEMM: the [G, M_max, K/128] scales flattened to
G * M_max rows).
"""
from typing import Optional

import torch

from deepseek_ops import reference
from deepseek_ops._checks import (FLOAT_DTYPES, FP8, aligned16, can_read_values, check_aligned16, check_choice,
                                  check_contiguous, check_cuda_arch, check_dim, check_multiple, check_same_device,
                                  check_shape, check_tensor, check_values_in_range, starts_aligned16)
from deepseek_ops._registry import register_op
from deepseek_ops.constants import FP8_GEMM_K_MULTIPLE, FP8_GEMM_N_MULTIPLE, GROUPED_GEMM_ALIGNMENT

_ops = torch.ops.deepseek_ops

_BF16, _FP32 = torch.bfloat16, torch.float32
_OUT_DTYPES = (_BF16, _FP32)


def _check_k_major(name: str, t: torch.Tensor):
    """TMA reads rows of K contiguous bytes; row starts and the base must be 16-byte aligned."""
    k = t.shape[-1]
    if k > 1 and t.stride(-1) != 1:
        raise ValueError(f"argument '{name}': expected K-major (stride 1 along the last dim), got strides "
                         f"{tuple(t.stride())}")
    if t.shape[-2] > 1 and (t.stride(-2) % 16 != 0 or t.stride(-2) < k):
        raise ValueError(f"argument '{name}': expected a row stride that is a multiple of 16 elements and >= K, "
                         f"got strides {tuple(t.stride())}")
    check_aligned16(name, t, "slice rows/columns at multiples of 16")


def _check_operands(a, a_scales, b, b_scales, *, a_ndim: int, grouped_b: bool, b_names=("b", "b_scales")):
    """The FP8 operands of every GEMM; returns (N, K). a: [(G,) M, K]; b: [(G,) N, K].

    b_names: the caller's names of b and b_scales (fp8_linear's weight and weight_scale).
    """
    b_name, b_scales_name = b_names
    check_tensor("a", a, dtype=FP8, ndim=a_ndim)
    check_tensor(b_name, b, dtype=FP8, ndim=3 if grouped_b else 2)
    check_tensor("a_scales", a_scales, dtype=torch.float32, ndim=a.dim())
    check_tensor(b_scales_name, b_scales, dtype=torch.float32, ndim=b.dim())
    check_same_device(**{"a": a, "a_scales": a_scales, b_name: b, b_scales_name: b_scales})
    n, k = b.shape[-2], a.shape[-1]
    if k <= 0:
        raise ValueError(f"argument 'a': K (a.shape[-1]) must be a positive multiple of {FP8_GEMM_K_MULTIPLE}, "
                         f"got {k}")
    check_multiple("a", k, FP8_GEMM_K_MULTIPLE, "K (a.shape[-1])")
    check_dim(b_name, b, -1, k, "K, as a.shape[-1]")
    check_multiple(b_name, n, FP8_GEMM_N_MULTIPLE, f"N ({b_name}.shape[-2])")
    check_shape("a_scales", a_scales, (*a.shape[:-1], k // 128))
    check_shape(b_scales_name, b_scales, (*b.shape[:-2], -(-n // 128), k // 128))
    _check_k_major("a", a)
    _check_k_major(b_name, b)
    return n, k


def _check_out(name: str, out: torch.Tensor, shape, dtype, device):
    """A buffer the kernel writes (or, for c, reads) in place: contiguous, 16-byte aligned."""
    check_tensor(name, out, dtype=dtype, device=device)
    check_shape(name, out, shape)
    check_contiguous(name, out)
    check_aligned16(name, out)


def _fp8_gemm_ok(a, a_scales, b, b_scales, out_dtype, out) -> bool:
    """True only if _check_fp8_gemm(..., c=None) would pass; False proves nothing (the caller then runs
    the checks, which raise the message).

    The eager path of every decode step: the checks themselves cost several microseconds of host time,
    as much as a small GEMM's kernel; this reads each tensor attribute once. Stricter than the checks
    where that is cheaper (K-major: stride 1 and a row stride >= K, a multiple of 16, whatever M and N).
    Eager only: it reads data_ptr().
    """
    if not (isinstance(a, torch.Tensor) and isinstance(a_scales, torch.Tensor) and isinstance(b, torch.Tensor)
            and isinstance(b_scales, torch.Tensor)):
        return False
    if (a.dtype is not FP8 or b.dtype is not FP8 or a_scales.dtype is not _FP32 or b_scales.dtype is not _FP32
            or (out_dtype is not _BF16 and out_dtype is not _FP32)):
        return False
    device = a.device
    if b.device != device or a_scales.device != device or b_scales.device != device:
        return False
    a_shape, b_shape = a.shape, b.shape
    if len(a_shape) != 2 or len(b_shape) != 2:
        return False
    m, k = a_shape
    n, b_k = b_shape
    if b_k != k or k <= 0 or k % FP8_GEMM_K_MULTIPLE or n % FP8_GEMM_N_MULTIPLE:
        return False
    if a_scales.shape != (m, k // 128) or b_scales.shape != ((n + 127) // 128, k // 128):
        return False
    a_stride, b_stride = a.stride(), b.stride()
    if (a_stride[1] != 1 or a_stride[0] % 16 or a_stride[0] < k or b_stride[1] != 1 or b_stride[0] % 16
            or b_stride[0] < k or not starts_aligned16(a) or not starts_aligned16(b)):
        return False
    return out is None or (isinstance(out, torch.Tensor) and out.dtype is out_dtype and out.device == device
                           and out.shape == (m, n) and out.is_contiguous() and starts_aligned16(out))


def _check_fp8_gemm(a, a_scales, b, b_scales, out_dtype, out, c):
    """Every argument of fp8_gemm; a ValueError naming the first bad one."""
    n, _ = _check_operands(a, a_scales, b, b_scales, a_ndim=2, grouped_b=False)
    m = a.shape[0]
    check_choice("out_dtype", out_dtype, _OUT_DTYPES)
    if c is not None:
        if out_dtype != torch.float32:
            raise ValueError(f"argument 'c': accumulating into c needs out_dtype=torch.float32, got {out_dtype}")
        _check_out("c", c, (m, n), torch.float32, a.device)
    if out is not None:
        _check_out("out", out, (m, n), out_dtype, a.device)


def fp8_gemm(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None,
             c: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d = (a * a_scales) @ (b * b_scales)^T (+ c).

    a: [M, K] float8_e4m3fn, K-major, K a multiple of 128, any M >= 0.
    a_scales: fp32 [M, K/128] (fastest in the M-major layout of the module docstring; any other
        layout is copied into it first).
    b: [N, K] float8_e4m3fn, K-major, N a multiple of 16. b_scales: fp32 [ceil(N/128), K/128].
    out_dtype: bfloat16 or float32. c: optional fp32 [M, N] added to the product (float32 output
        only; it may be `out` itself, to accumulate in place). out: optional [M, N] contiguous buffer.
    Returns d [M, N] (`out` when given).
    Where few tiles would leave SMs idle (small M, long K; bf16 output, no c) the GPU kernel splits K
    and takes an fp32 [splits, M, N] workspace from the caching allocator on the current stream; the
    splits are summed in a fixed order, so the result is the same bits on every call.
    """
    if c is not None or torch.compiler.is_compiling() or not _fp8_gemm_ok(a, a_scales, b, b_scales, out_dtype, out):
        _check_fp8_gemm(a, a_scales, b, b_scales, out_dtype, out, c)
    check_cuda_arch(a, "fp8_gemm")
    if out is None:
        return _ops.fp8_gemm(a, a_scales, b, b_scales, out_dtype, c)
    _ops.fp8_gemm_out(a, a_scales, b, b_scales, c, out)
    return out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None, master_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ (weight * weight_scale)^T (+ bias), x quantized to FP8 per 1 x 128 token group first.

    x: [..., K] bf16/fp16/fp32, K a multiple of 128. weight: [N, K] float8_e4m3fn with weight_scale
    fp32 [ceil(N/128), K/128] (a DeepSeek-V3 checkpoint's weight and weight_scale_inv). bias:
    optional [N] bf16/fp16/fp32. Returns [..., N] in x's dtype (computed in fp32 for fp32 x, bf16
    otherwise).

    Differentiable (deepseek_ops.linear_autograd) with respect to x, bias and master_weight: an
    optional float [N, K] weight that weight, weight_scale quantize (per_block_quant_fp8), which
    receives dW. Backward needs N a multiple of 128.
    """
    check_tensor("x", x, dtype=FLOAT_DTYPES)
    check_tensor("weight", weight, dtype=FP8, ndim=2, device=x.device)
    check_dim("x", x, -1, weight.shape[1], "K, as weight.shape[1]")
    check_multiple("x", x.shape[-1], 128, "K (x.shape[-1])")
    if bias is not None:
        check_tensor("bias", bias, dtype=FLOAT_DTYPES, ndim=1, device=x.device)
        check_dim("bias", bias, 0, weight.shape[0], "N, as weight.shape[0]")
    if master_weight is not None:
        check_master_weight(master_weight, weight)
    k = x.shape[-1]
    x2d = x if x.dim() == 2 else x.reshape(-1, k)
    train = torch.is_grad_enabled() and (x.requires_grad or needs_weight_grad(master_weight))
    check_cuda_arch(x, "fp8_linear")
    if train:  # the same forward as an autograd op that saves x for the weight gradient
        check_multiple("weight", weight.shape[0], 128,
                       "N (weight.shape[0]: dy is quantized per 1 x 128 along N for the backward)")
        check_tensor("weight_scale", weight_scale, dtype=torch.float32, ndim=2, device=x.device)
        check_shape("weight_scale", weight_scale, (weight.shape[0] // 128, k // 128))
        _check_k_major("weight", weight)
        y, _, _ = _ops.fp8_linear_fwd(aligned16(x2d), weight, weight_scale, master_weight,
                                      needs_weight_grad(master_weight))
    else:
        # per_token_group_quant_fp8(x2d, 128, column_major_scales=True) without its checks: those of x above
        # cover them.
        x_fp8, x_scales = _ops.per_token_group_quant_fp8(aligned16(x2d), 128, False, True)
        out_dtype = _FP32 if x.dtype is _FP32 else _BF16
        if torch.compiler.is_compiling() or not _fp8_gemm_ok(x_fp8, x_scales, weight, weight_scale, out_dtype, None):
            _check_operands(x_fp8, x_scales, weight, weight_scale, a_ndim=2, grouped_b=False,
                            b_names=("weight", "weight_scale"))
        y = _ops.fp8_gemm(x_fp8, x_scales, weight, weight_scale, out_dtype, None)
    if bias is not None:
        y = y + bias.to(y.dtype)
    if y.dtype is not x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def needs_weight_grad(master_weight: Optional[torch.Tensor]) -> bool:
    """Whether the backward computes dW: a master weight that wants a gradient, grad mode on."""
    return master_weight is not None and master_weight.requires_grad and torch.is_grad_enabled()


def check_master_weight(master_weight: torch.Tensor, weight: torch.Tensor):
    """The float weight that `weight` quantizes: its shape, on its device."""
    check_tensor("master_weight", master_weight, dtype=FLOAT_DTYPES, device=weight.device)
    check_shape("master_weight", master_weight, weight.shape)
    check_multiple("master_weight", weight.shape[-2], 128,
                   "N (the output gradient is quantized per 1 x 128 along N for the backward)")


def _check_grouped_b(b):
    if b.shape[0] == 0:
        raise ValueError(f"argument 'b': expected at least one group, got shape {tuple(b.shape)}")
    if b.shape[0] > 1 and b.stride(0) != b.shape[1] * b.stride(1):
        raise ValueError(f"argument 'b': expected groups stored back to back (stride(0) = N * stride(1)), got "
                         f"strides {tuple(b.stride())}")


def grouped_fp8_gemm_contiguous(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                                m_indices: Optional[torch.Tensor] = None, *,
                                group_offsets: Optional[torch.Tensor] = None,
                                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MoE experts in one launch, rows of each expert contiguous: d[r] = a[r] @ b[g(r)]^T (scaled).

    a: [sum_M, K] float8_e4m3fn, each group's rows starting at a multiple of GROUPED_GEMM_ALIGNMENT
        (pad groups to it); a_scales fp32 [sum_M, K/128] (M-major fastest, as for fp8_gemm).
    b: [G, N, K] float8_e4m3fn; b_scales fp32 [G, ceil(N/128), K/128].
    Exactly one of
      m_indices: int32 [sum_M], the group of each row, -1 for padding rows;
      group_offsets: int32/int64 [G + 1], rows [group_offsets[g], group_offsets[g+1]) are group g,
        each offset a multiple of the alignment (converted to m_indices on the device; with offsets
        there are no padding rows: a group's tail rows up to the next offset are computed as part of it).
    Output bf16 [sum_M, N]. Padding rows (-1) are never written: they keep out's values, and are
    unspecified in a freshly allocated output. Values in m_indices on the GPU are the caller's
    contract, checked on the CPU: each 128-row block holds one group's rows, then padding. On the
    GPU a row is written only if its index equals that of its block's first row, and a block whose
    first index is outside [0, G) is skipped, so bad indices never cause out-of-bounds accesses.
    """
    n, k = _check_operands(a, a_scales, b, b_scales, a_ndim=2, grouped_b=True)
    _check_grouped_b(b)
    num_groups, sum_m = b.shape[0], a.shape[0]
    check_multiple("a", sum_m, GROUPED_GEMM_ALIGNMENT, "sum_M (a.shape[0], groups padded to GROUPED_GEMM_ALIGNMENT)")
    if (m_indices is None) == (group_offsets is None):
        raise ValueError("arguments 'm_indices' and 'group_offsets': expected exactly one of them, got "
                         f"{'both' if m_indices is not None else 'neither'}")
    if group_offsets is not None:
        m_indices = _m_indices_from_offsets(group_offsets, num_groups, sum_m, a.device)
    check_tensor("m_indices", m_indices, dtype=torch.int32, ndim=1, device=a.device)
    check_shape("m_indices", m_indices, (sum_m,))
    if can_read_values(m_indices):
        _check_m_indices_values(m_indices, num_groups)
    if out is not None:
        _check_out("out", out, (sum_m, n), torch.bfloat16, a.device)
    check_cuda_arch(a, "grouped_fp8_gemm_contiguous")
    if out is None:
        return _ops.grouped_fp8_gemm_contiguous(a, a_scales, b, b_scales, m_indices)
    _ops.grouped_fp8_gemm_contiguous_out(a, a_scales, b, b_scales, m_indices, out)
    return out


def _check_m_indices_values(m_indices: torch.Tensor, num_groups: int):
    check_values_in_range("m_indices", m_indices, -1, num_groups, "G = b.shape[0]")
    blocks = m_indices.reshape(-1, GROUPED_GEMM_ALIGNMENT)
    first = blocks[:, :1]
    # Within a 128-row block: one group, optionally followed by padding (-1).
    bad = ((blocks != first) & (blocks != -1)).any(dim=1)
    if bad.any():
        block = int(bad.nonzero()[0])
        raise ValueError(f"argument 'm_indices': rows {block * GROUPED_GEMM_ALIGNMENT}.."
                         f"{(block + 1) * GROUPED_GEMM_ALIGNMENT - 1} mix groups; each group must start at a "
                         f"multiple of {GROUPED_GEMM_ALIGNMENT} rows")


def _m_indices_from_offsets(group_offsets, num_groups: int, sum_m: int, device) -> torch.Tensor:
    check_tensor("group_offsets", group_offsets, dtype=(torch.int32, torch.int64), ndim=1)
    check_shape("group_offsets", group_offsets, (num_groups + 1,))
    if can_read_values(group_offsets):
        offsets = group_offsets.tolist()
        if offsets[0] != 0 or offsets[-1] > sum_m or any(x > y for x, y in zip(offsets, offsets[1:])):
            raise ValueError(f"argument 'group_offsets': expected non-decreasing offsets from 0 to at most "
                             f"{sum_m} (a.shape[0]), got {offsets}")
        misaligned = [x for x in offsets[:-1] if x % GROUPED_GEMM_ALIGNMENT]
        if misaligned:
            raise ValueError(f"argument 'group_offsets': every group must start at a multiple of "
                             f"{GROUPED_GEMM_ALIGNMENT}, got offsets {misaligned}")
    offsets = group_offsets.to(device=device, dtype=torch.int64)
    rows = torch.arange(sum_m, device=device)
    # Row r belongs to the last group whose start is <= r; rows past the last offset get G (skipped).
    idx = torch.searchsorted(offsets[1:], rows, right=True)
    return idx.to(torch.int32)


def grouped_fp8_gemm_masked(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                            masked_m: torch.Tensor, expected_m: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MoE experts for decode, a fixed-capacity slot per group: d[g, :masked_m[g]] = a[g] @ b[g]^T (scaled).

    a: [G, M_max, K] float8_e4m3fn, contiguous; a_scales fp32 [G, M_max, K/128] (fastest:
        per_token_group_quant_fp8(a.view(G * M_max, K), column_major_scales=True)[1].view(G, M_max, -1)).
    b: [G, N, K] float8_e4m3fn; b_scales fp32 [G, ceil(N/128), K/128].
    masked_m: int32 [G] on a's device, valid rows of each group; read by the kernel (no host sync,
        CUDA-graph safe). On the GPU a value above M_max is the caller's error and is clamped.
    expected_m: typical masked_m, a hint for tile selection only.
    Output bf16 [G, M_max, N]; rows at or past masked_m[g] are never written (they keep out's values
    and are unspecified in a freshly allocated output).
    """
    n, k = _check_operands(a, a_scales, b, b_scales, a_ndim=3, grouped_b=True)
    _check_grouped_b(b)
    num_groups, m_max = a.shape[0], a.shape[1]
    check_dim("b", b, 0, num_groups, "G, as a.shape[0]")
    check_tensor("masked_m", masked_m, dtype=torch.int32, ndim=1, device=a.device)
    check_shape("masked_m", masked_m, (num_groups,))
    if not isinstance(expected_m, int) or expected_m < 0:
        raise ValueError(f"argument 'expected_m': expected a non-negative int, got {expected_m!r}")
    check_contiguous("a", a, "[G, M_max, K] groups back to back")
    if can_read_values(masked_m):
        check_values_in_range("masked_m", masked_m, 0, m_max, "M_max = a.shape[1]", high_inclusive=True)
    if out is not None:
        _check_out("out", out, (num_groups, m_max, n), torch.bfloat16, a.device)
    check_cuda_arch(a, "grouped_fp8_gemm_masked")
    if out is None:
        return _ops.grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, expected_m)
    _ops.grouped_fp8_gemm_masked_out(a, a_scales, b, b_scales, masked_m, expected_m, out)
    return out


# ---- fake kernels (shapes only) ----------------------------------------------------------------

def _fp8_gemm_fake(a, a_scales, b, b_scales, out_dtype, c=None):
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: f"fp8_gemm: a, b must be 2-D, got {a.shape}, {b.shape}")
    torch._check(a.shape[1] == b.shape[1], lambda: f"fp8_gemm: K of a {a.shape} and b {b.shape} differ")
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def _out_fake(*args):
    return None


def _grouped_contiguous_fake(a, a_scales, b, b_scales, m_indices):
    torch._check(a.dim() == 2 and b.dim() == 3, lambda: f"grouped_fp8_gemm_contiguous: a [M, K], b [G, N, K], got "
                                                        f"{a.shape}, {b.shape}")
    torch._check(a.shape[1] == b.shape[2],
                 lambda: f"grouped_fp8_gemm_contiguous: K of a {a.shape} and b {b.shape} differ")
    torch._check(m_indices.shape == (a.shape[0],),
                 lambda: "grouped_fp8_gemm_contiguous: m_indices needs one entry per row of a")
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16)


def _grouped_masked_fake(a, a_scales, b, b_scales, masked_m, expected_m):
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: f"grouped_fp8_gemm_masked: a [G, M, K], b [G, N, K], got "
                                                        f"{a.shape}, {b.shape}")
    torch._check(a.shape[0] == b.shape[0] and a.shape[2] == b.shape[2],
                 lambda: f"grouped_fp8_gemm_masked: G and K of a {a.shape} and b {b.shape} differ")
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]), dtype=torch.bfloat16)


register_op("fp8_gemm", reference.fp8_gemm, _fp8_gemm_fake)
register_op("fp8_gemm_out", reference.fp8_gemm_out, _out_fake)
register_op("grouped_fp8_gemm_contiguous", reference.grouped_fp8_gemm_contiguous, _grouped_contiguous_fake)
register_op("grouped_fp8_gemm_contiguous_out", reference.grouped_fp8_gemm_contiguous_out, _out_fake)
register_op("grouped_fp8_gemm_masked", reference.grouped_fp8_gemm_masked, _grouped_masked_fake)
register_op("grouped_fp8_gemm_masked_out", reference.grouped_fp8_gemm_masked_out, _out_fake)
