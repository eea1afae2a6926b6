"""FP8 training ops: the backward GEMMs of an FP8 linear and of the MoE experts.

For y = x @ W^T with x [T, K] and W [N, K] (128 x 128 block scales), given dy [T, N]:
- dgrad, dx = dy @ W: dy quantized 1 x 128 along N (per_token_group_quant_fp8), W the forward's FP8
  weight as it is ([N, K], its block scales), fp8_gemm_dgrad;
- wgrad, dW = dy^T @ x: the contraction runs over tokens, so both operands are quantized 1 x 128
  along the token axis by transpose_quant_fp8 ([T, C] -> [C, T_pad] e4m3 + [C, T_pad / 128] scales),
  then fp8_gemm_wgrad (fp32 out, optional c added);
- the MoE experts: k_grouped_fp8_gemm_wgrad (each expert's tokens a contiguous, 128-aligned range
  of the token axis, one call for all experts) and grouped_fp8_gemm_dgrad_contiguous (the grouped
  GEMM's rows, each against its expert's weight);
- the SwiGLU between an MLP's stacked gate/up projection and its down projection:
  swiglu_backward_quant_fp8 turns the activation's gradient into both FP8 operands of the gate/up
  projection's backward (its dy = [dgate | dup], 1 x 128 along channels and along tokens) in one pass.

Kernels: the CPU kernel of each op is its reference (deepseek_ops.reference). CUDA kernels (the CUDA
build, csrc/):
- transpose_quant_fp8: one pass, bit-identical to the reference (csrc/sm90_fp8_transpose_quant.cu);
- swiglu_backward_quant_fp8: one pass over dact and h, bit-identical to the reference run on the GPU
  (csrc/sm90_fp8_swiglu_backward_quant.cu);
- fp8_gemm_dgrad and grouped_fp8_gemm_dgrad_contiguous: the NT FP8 GEMMs (fp8_gemm,
  grouped_fp8_gemm_contiguous) on W^T, which a byte-transpose kernel writes on every call
  (csrc/sm90_fp8_dgrad.cu, csrc/torch_train.cpp). Every shape these functions accept runs there;
- fp8_gemm_wgrad and k_grouped_fp8_gemm_wgrad: the FP8 GEMM's weight-gradient variants
  (csrc/sm90_fp8_gemm.cu, GemmType::kWgrad and kKGroupedWgrad: B scaled per row and K block, fp32
  output plus c; the k-grouped one runs every expert's tiles in one launch, each over its own K
  blocks).
On a device with no kernel registered for an op (a build without CUDA), the wrappers below run the
reference (plain torch, float64 on that device), the one place that choice is made (dispatch).
"""
from typing import Optional, Tuple

import torch

from deepseek_ops import reference
from deepseek_ops._checks import (FLOAT_DTYPES, FP8, aligned16, can_read_values, check_choice, check_cuda_arch,
                                  check_dim, check_multiple, check_same_device, check_shape, check_tensor)
from deepseek_ops.constants import FP8_GEMM_K_MULTIPLE, FP8_GEMM_N_MULTIPLE, GROUPED_GEMM_ALIGNMENT
from deepseek_ops.gemm import _check_out, _m_indices_from_offsets, _out_fake

_ops = torch.ops.deepseek_ops

_REFERENCES = {
    "transpose_quant_fp8": reference.transpose_quant_fp8,
    "swiglu_backward_quant_fp8": reference.swiglu_backward_quant_fp8,
    "fp8_gemm_wgrad": reference.fp8_gemm_wgrad,
    "k_grouped_fp8_gemm_wgrad": reference.k_grouped_fp8_gemm_wgrad,
    "fp8_gemm_wgrad_out": reference.fp8_gemm_wgrad_out,
    "k_grouped_fp8_gemm_wgrad_out": reference.k_grouped_fp8_gemm_wgrad_out,
    "fp8_gemm_dgrad": reference.fp8_gemm_dgrad,
    "grouped_fp8_gemm_dgrad_contiguous": reference.grouped_fp8_gemm_dgrad_contiguous,
}


@torch.compiler.assume_constant_result
def _has_kernel(name: str, device_type: str) -> bool:
    """Fixed once the extension is loaded; torch.compile takes the answer as a constant."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"deepseek_ops::{name}", device_type.upper())


def dispatch(name: str, device: torch.device, *args):
    """The op on CPU and wherever a kernel is registered for the device; the reference elsewhere."""
    if device.type != "cpu" and not _has_kernel(name, device.type):
        return _REFERENCES[name](*args)
    return getattr(_ops, name)(*args)


def _check_token_scaled(name: str, t: torch.Tensor, scales: torch.Tensor, scales_name: str):
    """An operand quantized 1 x 128 along its last (token) axis: [C, T] e4m3, scales fp32 [C, T/128]."""
    check_tensor(name, t, dtype=FP8, ndim=2)
    check_tensor(scales_name, scales, dtype=torch.float32, ndim=2)
    check_multiple(name, t.shape[1], 128, f"T ({name}.shape[1], tokens padded to 128)")
    check_shape(scales_name, scales, (t.shape[0], t.shape[1] // 128))


def transpose_quant_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [T, C] bf16/fp16/fp32 -> (x^T [C, T_pad] float8_e4m3fn, scales fp32 [C, T_pad / 128]).

    One scale per 1 x 128 group along the token axis, with per_token_group_quant_fp8's recipe
    (deepseek_ops.constants); T_pad = T rounded up to 128, the padding tokens are zero. This is the
    operand layout of fp8_gemm_wgrad: the weight gradient contracts over tokens.
    """
    check_tensor("x", x, dtype=FLOAT_DTYPES, ndim=2)
    check_cuda_arch(x, "transpose_quant_fp8")
    return dispatch("transpose_quant_fp8", x.device, x.contiguous())


def swiglu_backward_quant_fp8(dact: torch.Tensor, h: torch.Tensor, transposed: bool = True
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of act = (silu(gate.float()) * up.float()).to(h.dtype), quantized for the backward
    GEMMs of the projection that made h = [gate | up], in one pass over dact and h.

    dact: [M, K] gradient of act; h: [M, 2K] gate columns then up columns, K a multiple of 128, both
    bf16/fp16/fp32 of one dtype. With dh = [dgate | dup] [M, 2K] as autograd of that line gives it
    (fp32 math, rounded to h's dtype; never written to memory), returns
    - dh_fp8 [M, 2K] e4m3, dh_scales fp32 [M, 2K / 128]: per_token_group_quant_fp8(dh, 128), the dy
      of fp8_gemm_dgrad / grouped_fp8_gemm_dgrad_contiguous;
    - dh_t [2K, M_pad] e4m3, dh_t_scales fp32 [2K, M_pad / 128]: transpose_quant_fp8(dh), the dy^T of
      fp8_gemm_wgrad / k_grouped_fp8_gemm_wgrad; [2K, 0] each unless `transposed` (no weight gradient).
    """
    check_tensor("dact", dact, dtype=FLOAT_DTYPES, ndim=2)
    check_tensor("h", h, dtype=dact.dtype, ndim=2, device=dact.device)
    check_multiple("h", h.shape[1], 256, "2K (h.shape[1]: gate and up, K a multiple of 128)")
    check_shape("dact", dact, (h.shape[0], h.shape[1] // 2))
    check_cuda_arch(h, "swiglu_backward_quant_fp8")
    return dispatch("swiglu_backward_quant_fp8", h.device, aligned16(dact), aligned16(h), transposed)


def _byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """[first, last + 1) of the bytes a strided (non-negative strides) non-empty tensor covers."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check_wgrad_c_out(c: Optional[torch.Tensor], out: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
    """c and out of a weight-gradient op (their devices checked by the caller); returns c as the kernel
    reads it. out: contiguous, 16-byte aligned (written by TMA). c may be out itself, to accumulate in
    place (the kernel then adds into it at L2 and never reads it), or lie apart from it."""
    if out is not None:
        _check_out("out", out, shape, torch.float32, out.device)
    if c is None:
        return None
    check_tensor("c", c, dtype=torch.float32)
    check_shape("c", c, shape)
    if out is not None and not torch.compiler.is_compiling() and c.numel() > 0:
        if c.data_ptr() == out.data_ptr() and c.stride() == out.stride():
            return c  # out's memory: accumulate in place
        (c_lo, c_hi), (out_lo, out_hi) = _byte_span(c), _byte_span(out)
        if c_lo < out_hi and out_lo < c_hi:
            raise ValueError("argument 'c': overlaps 'out' without being it; pass c=out to accumulate in place, "
                             "or a c apart from out")
    return aligned16(c)  # a c apart from out: the kernel reads it densely


def fp8_gemm_wgrad(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                   c: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dW = (a * a_scales) @ (b * b_scales)^T (+ c), fp32 [N, K].

    a: [N, T] float8_e4m3fn, dy^T; b: [K, T] float8_e4m3fn, x^T, K a multiple of 16; both from
    transpose_quant_fp8 (scales fp32 [N, T/128] and [K, T/128], T a multiple of 128). c: optional
    fp32 [N, K], added (the gradient accumulated so far). out: optional fp32 [N, K] contiguous buffer
    for the result; c=out accumulates in place (as DeepGEMM's c=d), which the GPU kernel does without
    reading c (TMA reduce-add). Returns dW (`out` when given).
    """
    _check_token_scaled("a", a, a_scales, "a_scales")
    _check_token_scaled("b", b, b_scales, "b_scales")
    check_dim("b", b, 1, a.shape[1], "T, as a.shape[1]")
    check_multiple("b", b.shape[0], FP8_GEMM_N_MULTIPLE, "K (b.shape[0], the gradient's columns)")
    check_same_device(a=a, a_scales=a_scales, b=b, b_scales=b_scales, c=c, out=out)
    c = _check_wgrad_c_out(c, out, (a.shape[0], b.shape[0]))
    check_cuda_arch(a, "fp8_gemm_wgrad")
    if out is None:
        return dispatch("fp8_gemm_wgrad", a.device, a, a_scales, b, b_scales, c)
    dispatch("fp8_gemm_wgrad_out", a.device, a, a_scales, b, b_scales, c, out)
    return out


def check_group_offsets(group_offsets: torch.Tensor, num_rows: int, rows_name: str):
    check_tensor("group_offsets", group_offsets, dtype=(torch.int32, torch.int64), ndim=1)
    if group_offsets.shape[0] < 2:
        raise ValueError(f"argument 'group_offsets': expected [G + 1] offsets with G >= 1, got shape "
                         f"{tuple(group_offsets.shape)}")
    if can_read_values(group_offsets):
        offsets = group_offsets.tolist()
        if offsets[0] != 0 or offsets[-1] != num_rows or any(x > y for x, y in zip(offsets, offsets[1:])):
            raise ValueError(f"argument 'group_offsets': expected non-decreasing offsets from 0 to {num_rows} "
                             f"({rows_name}), got {offsets}")
        misaligned = [x for x in offsets if x % GROUPED_GEMM_ALIGNMENT]
        if misaligned:
            raise ValueError(f"argument 'group_offsets': every offset must be a multiple of "
                             f"{GROUPED_GEMM_ALIGNMENT}, got {misaligned}")


def k_grouped_fp8_gemm_wgrad(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                             group_offsets: torch.Tensor, c: Optional[torch.Tensor] = None,
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weight gradients of all MoE experts in one call: out[g] = fp8_gemm_wgrad over tokens
    [group_offsets[g], group_offsets[g+1]) (+ c[g]).

    a: [N, sum_T] e4m3 (dy^T), b: [K, sum_T] e4m3 (x^T), scaled 1 x 128 along tokens as for
    fp8_gemm_wgrad; group_offsets: int32/int64 [G + 1], from 0 to sum_T, each a multiple of
    GROUPED_GEMM_ALIGNMENT (an expert with no tokens is an empty range); K a multiple of 16. c:
    optional fp32 [G, N, K]; out: optional fp32 [G, N, K] buffer, c=out accumulating in place, as
    fp8_gemm_wgrad.
    Returns fp32 [G, N, K] (`out` when given).
    """
    _check_token_scaled("a", a, a_scales, "a_scales")
    _check_token_scaled("b", b, b_scales, "b_scales")
    check_dim("b", b, 1, a.shape[1], "sum_T, as a.shape[1]")
    check_multiple("b", b.shape[0], FP8_GEMM_N_MULTIPLE, "K (b.shape[0], the gradients' columns)")
    check_group_offsets(group_offsets, a.shape[1], "sum_T = a.shape[1]")
    check_same_device(a=a, a_scales=a_scales, b=b, b_scales=b_scales, group_offsets=group_offsets, c=c, out=out)
    c = _check_wgrad_c_out(c, out, (group_offsets.shape[0] - 1, a.shape[0], b.shape[0]))
    check_cuda_arch(a, "k_grouped_fp8_gemm_wgrad")
    if out is None:
        return dispatch("k_grouped_fp8_gemm_wgrad", a.device, a, a_scales, b, b_scales, group_offsets, c)
    dispatch("k_grouped_fp8_gemm_wgrad_out", a.device, a, a_scales, b, b_scales, group_offsets, c, out)
    return out


def _check_dgrad_operands(dy, dy_scales, w, w_scales, grouped: bool):
    check_tensor("dy", dy, dtype=FP8, ndim=2)
    check_tensor("dy_scales", dy_scales, dtype=torch.float32, ndim=2)
    check_tensor("w", w, dtype=FP8, ndim=3 if grouped else 2)
    check_tensor("w_scales", w_scales, dtype=torch.float32, ndim=w.dim())
    check_same_device(dy=dy, dy_scales=dy_scales, w=w, w_scales=w_scales)
    n, k = w.shape[-2], w.shape[-1]
    check_dim("dy", dy, 1, n, "N, as w.shape[-2]")
    check_multiple("dy", n, 128, "N (dy.shape[1], the contraction of dgrad, in 1 x 128 groups)")
    check_multiple("w", k, FP8_GEMM_K_MULTIPLE, "K (w.shape[-1])")
    check_shape("dy_scales", dy_scales, (dy.shape[0], n // 128))
    check_shape("w_scales", w_scales, (*w.shape[:-2], n // 128, k // 128))


def fp8_gemm_dgrad(dy: torch.Tensor, dy_scales: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """dx = (dy * dy_scales) @ (w * w_scales), [M, K] in out_dtype (bfloat16 or float32).

    dy: [M, N] float8_e4m3fn with scales fp32 [M, N/128] (per_token_group_quant_fp8 of the output
    gradient; N a multiple of 128); w: the forward's [N, K] float8_e4m3fn weight with its 128 x 128
    block scales [N/128, K/128], as it is (the CUDA kernel writes W^T for fp8_gemm on every call).
    """
    _check_dgrad_operands(dy, dy_scales, w, w_scales, grouped=False)
    check_choice("out_dtype", out_dtype, (torch.bfloat16, torch.float32))
    check_cuda_arch(dy, "fp8_gemm_dgrad")
    return dispatch("fp8_gemm_dgrad", dy.device, dy, dy_scales, w, w_scales, out_dtype)


def grouped_fp8_gemm_dgrad_contiguous(dy: torch.Tensor, dy_scales: torch.Tensor, w: torch.Tensor,
                                      w_scales: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
    """The input gradients of all MoE experts: rows [group_offsets[g], group_offsets[g+1]) of dy
    against expert g's weight, dx[r] = dy[r] @ w[g] (scaled), bf16 [sum_M, K].

    dy: [sum_M, N] e4m3, scales fp32 [sum_M, N/128]; w: [G, N, K] e4m3 with block scales
    [G, N/128, K/128]; group_offsets: int32/int64 [G + 1] from 0 to sum_M, multiples of
    GROUPED_GEMM_ALIGNMENT (the layout of grouped_fp8_gemm_contiguous's rows).
    """
    _check_dgrad_operands(dy, dy_scales, w, w_scales, grouped=True)
    check_dim("group_offsets", group_offsets, 0, w.shape[0] + 1, "G + 1, with G = w.shape[0]")
    check_group_offsets(group_offsets, dy.shape[0], "sum_M = dy.shape[0]")
    m_indices = _m_indices_from_offsets(group_offsets, w.shape[0], dy.shape[0], dy.device)
    check_cuda_arch(dy, "grouped_fp8_gemm_dgrad_contiguous")
    return dispatch("grouped_fp8_gemm_dgrad_contiguous", dy.device, dy, dy_scales, w, w_scales, m_indices)


# ---- fake kernels (shapes only) ----------------------------------------------------------------

def _transpose_quant_fake(x):
    t, c = x.shape
    t_pad = (t + 127) // 128 * 128
    return x.new_empty((c, t_pad), dtype=FP8), x.new_empty((c, t_pad // 128), dtype=torch.float32)


def _swiglu_backward_quant_fake(dact, h, transposed):
    torch._check(h.dim() == 2 and h.shape[1] % 256 == 0,
                 lambda: f"swiglu_backward_quant_fp8: h [M, 2K] with 2K a multiple of 256, got {h.shape}")
    torch._check(dact.shape == (h.shape[0], h.shape[1] // 2),
                 lambda: f"swiglu_backward_quant_fp8: dact {dact.shape} does not match h {h.shape}")
    m, k2 = h.shape
    t_pad = (m + 127) // 128 * 128 if transposed else 0
    return (h.new_empty((m, k2), dtype=FP8), h.new_empty((m, k2 // 128), dtype=torch.float32),
            h.new_empty((k2, t_pad), dtype=FP8), h.new_empty((k2, t_pad // 128), dtype=torch.float32))


def _wgrad_fake(a, a_scales, b, b_scales, c=None):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.float32)


def _k_grouped_wgrad_fake(a, a_scales, b, b_scales, group_offsets, c=None):
    return a.new_empty((group_offsets.shape[0] - 1, a.shape[0], b.shape[0]), dtype=torch.float32)


def _dgrad_fake(dy, dy_scales, w, w_scales, out_dtype):
    return dy.new_empty((dy.shape[0], w.shape[1]), dtype=out_dtype)


def _grouped_dgrad_fake(dy, dy_scales, w, w_scales, m_indices):
    return dy.new_empty((dy.shape[0], w.shape[2]), dtype=torch.bfloat16)


for _name, _fake in [("transpose_quant_fp8", _transpose_quant_fake),
                     ("swiglu_backward_quant_fp8", _swiglu_backward_quant_fake), ("fp8_gemm_wgrad", _wgrad_fake),
                     ("k_grouped_fp8_gemm_wgrad", _k_grouped_wgrad_fake), ("fp8_gemm_dgrad", _dgrad_fake),
                     ("grouped_fp8_gemm_dgrad_contiguous", _grouped_dgrad_fake),
                     ("fp8_gemm_wgrad_out", _out_fake), ("k_grouped_fp8_gemm_wgrad_out", _out_fake)]:
    torch.library.impl(f"deepseek_ops::{_name}", "CPU")(_REFERENCES[_name])
    torch.library.register_fake(f"deepseek_ops::{_name}")(_fake)
