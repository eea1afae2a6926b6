"""FP8 quantization ops: 1 x group activation scaling and 128 x 128 weight-block scaling."""
from typing import Optional, Tuple

import torch

from deepseek_ops import reference
from deepseek_ops._checks import (FLOAT_DTYPES, FP8, aligned16, check_choice, check_cuda_arch, check_multiple,
                                  check_tensor)
from deepseek_ops._registry import register_op

_ops = torch.ops.deepseek_ops


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128, scale_fmt: Optional[str] = None,
                              column_major_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantizes each 1 x group_size group of `x` to e4m3 with its own fp32 scale.

    x: [M, K] bf16/fp16/fp32 (K a multiple of group_size; a non-contiguous x is copied first).
    Returns x_fp8 [M, K] float8_e4m3fn and scales fp32 [M, K / group_size], where
    scale = max(amax, FP8_SCALE_FLOOR) / FP8_MAX (the recipe in deepseek_ops.constants;
    scale_fmt="ue8m0": rounded up to a power of two) and x ~= x_fp8 * scale. With
    column_major_scales the scales are stored in the M-major layout fp8_gemm reads fastest
    (strides (1, align(M, 4)); deepseek_ops.gemm's docstring).
    """
    check_tensor("x", x, dtype=FLOAT_DTYPES, ndim=2)
    check_choice("group_size", group_size, (32, 64, 128))
    check_choice("scale_fmt", scale_fmt, (None, "ue8m0"))
    check_multiple("x", x.shape[1], group_size, "K (x.shape[1])")
    check_cuda_arch(x, "per_token_group_quant_fp8")
    return _ops.per_token_group_quant_fp8(aligned16(x), group_size, scale_fmt == "ue8m0", column_major_scales)


def silu_mul_quant_fp8(h: torch.Tensor, scale_fmt: Optional[str] = None,
                       column_major_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The SwiGLU activation of an MLP, quantized for its down projection, in one pass.

    h: [M, 2K] bf16/fp16/fp32, gate columns then up columns (the output of a stacked gate/up
    projection), K a multiple of 128. Returns (act_fp8 [M, K] float8_e4m3fn, scales fp32 [M, K / 128]):
    exactly per_token_group_quant_fp8(act, 128, scale_fmt, column_major_scales) of
    act = (silu(gate.float()) * up.float()).to(h.dtype), without act ever reaching memory.
    """
    check_tensor("h", h, dtype=FLOAT_DTYPES, ndim=2)
    check_choice("scale_fmt", scale_fmt, (None, "ue8m0"))
    check_multiple("h", h.shape[1], 256, "2K (h.shape[1]: gate and up, K a multiple of 128)")
    check_cuda_arch(h, "silu_mul_quant_fp8")
    return _ops.silu_mul_quant_fp8(aligned16(h), scale_fmt == "ue8m0", column_major_scales)


def per_block_quant_fp8(w: torch.Tensor, block_size: int = 128,
                        scale_fmt: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantizes each 128 x 128 block of a weight to e4m3 with its own fp32 scale.

    w: [N, K] bf16/fp16/fp32, K a multiple of 128, any N (the last block row may be partial).
    Returns w_fp8 [N, K] float8_e4m3fn and scales fp32 [ceil(N / 128), K / 128]: the
    DeepSeek-V3 checkpoint format, where `weight_scale_inv` is these scales (w ~= w_fp8 * scale).
    """
    check_tensor("w", w, dtype=FLOAT_DTYPES, ndim=2)
    check_choice("block_size", block_size, (128,))
    check_choice("scale_fmt", scale_fmt, (None, "ue8m0"))
    check_multiple("w", w.shape[1], block_size, "K (w.shape[1])")
    check_cuda_arch(w, "per_block_quant_fp8")
    return _ops.per_block_quant_fp8(aligned16(w), block_size, scale_fmt == "ue8m0")


def dequant_fp8_block(w: torch.Tensor, scales: torch.Tensor, block_size: int = 128,
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of per_block_quant_fp8: w_fp8 [N, K] * scales [ceil(N/128), K/128] -> out_dtype [N, K]."""
    check_tensor("w", w, dtype=FP8, ndim=2)
    check_tensor("scales", scales, dtype=torch.float32, ndim=2, device=w.device)
    check_choice("block_size", block_size, (128,))
    check_choice("out_dtype", out_dtype, FLOAT_DTYPES)
    n, k = w.shape
    check_multiple("w", k, block_size, "K (w.shape[1])")
    expected = (-(-n // block_size), k // block_size)
    if tuple(scales.shape) != expected:
        raise ValueError(f"argument 'scales': expected shape {expected} for w of shape {tuple(w.shape)}, "
                         f"got {tuple(scales.shape)}")
    check_cuda_arch(w, "dequant_fp8_block")
    return _ops.dequant_fp8_block(aligned16(w), scales.contiguous(), block_size, out_dtype)


def _per_token_group_quant_fake(x, group_size, ue8m0, column_major):
    torch._check(x.dim() == 2 and group_size > 0 and x.shape[1] % group_size == 0,
                 lambda: f"per_token_group_quant_fp8: x [M, K] with K a multiple of {group_size}, got {x.shape}")
    m, k = x.shape
    x_fp8 = x.new_empty((m, k), dtype=FP8)
    if column_major:
        m_pad = (m + 3) // 4 * 4
        return x_fp8, x.new_empty((k // group_size, m_pad), dtype=torch.float32).narrow(1, 0, m).t()
    return x_fp8, x.new_empty((m, k // group_size), dtype=torch.float32)


def _silu_mul_quant_fake(h, ue8m0, column_major):
    torch._check(h.dim() == 2 and h.shape[1] % 256 == 0,
                 lambda: f"silu_mul_quant_fp8: h [M, 2K] with 2K a multiple of 256, got {h.shape}")
    m, k2 = h.shape
    return _per_token_group_quant_fake(h.new_empty((m, k2 // 2)), 128, ue8m0, column_major)


def _per_block_quant_fake(w, block_size, ue8m0):
    torch._check(w.dim() == 2 and block_size > 0, lambda: f"per_block_quant_fp8: w [N, K], got {w.shape}")
    n, k = w.shape
    return (w.new_empty((n, k), dtype=FP8),
            w.new_empty(((n + block_size - 1) // block_size, (k + block_size - 1) // block_size), dtype=torch.float32))


def _dequant_fake(w, scales, block_size, out_dtype):
    torch._check(w.dim() == 2 and block_size > 0, lambda: f"dequant_fp8_block: w [N, K], got {w.shape}")
    torch._check(scales.shape == ((w.shape[0] + block_size - 1) // block_size, w.shape[1] // block_size),
                 lambda: f"dequant_fp8_block: scales {scales.shape} do not match w {w.shape}")
    return w.new_empty(w.shape, dtype=out_dtype)


register_op("per_token_group_quant_fp8", reference.per_token_group_quant_fp8, _per_token_group_quant_fake)
register_op("silu_mul_quant_fp8", reference.silu_mul_quant_fp8, _silu_mul_quant_fake)
register_op("per_block_quant_fp8", reference.per_block_quant_fp8, _per_block_quant_fake)
register_op("dequant_fp8_block", reference.dequant_fp8_block, _dequant_fake)
