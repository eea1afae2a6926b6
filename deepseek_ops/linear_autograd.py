"""Autograd of the FP8 linears: fp8_linear and the MoE experts' grouped linear, for training.

Master weights: training keeps an fp32 `master_weight` [N, K] (the optimizer's parameter) and
quantizes it once per step, weight, weight_scale = per_block_quant_fp8(master_weight). The forward
runs on that FP8 weight; the backward returns dW, the gradient of the loss with respect to the
quantized weight, as the gradient of master_weight (fp32). master_weight's values are never read:
it is where dW goes. Without it the weight is frozen and only dx is computed.

What the forward saves for the backward: the FP8 weight with its scales (already in memory) and x
quantized for the weight gradient, x^T e4m3 [K, T_pad] with 1 x 128 token-axis scales (half the
bytes of a bf16 x): only when master_weight needs a gradient.

Backward (deepseek_ops.train_ops): dx = fp8_gemm_dgrad(per_token_group_quant_fp8(dy), weight);
dW = fp8_gemm_wgrad(transpose_quant_fp8(dy), x^T); the grouped variants for the experts.

grouped_fp8_linear_swiglu is the experts' gate/up projection with the SwiGLU after it, as one
autograd node: it saves h = [gate | up] (bf16) instead of the fp32 operands of the activation's
autograd, and its backward gets both FP8 operands of the projection's dy = [dgate | dup] from one
pass over dact and h (train_ops.swiglu_backward_quant_fp8), bit for bit what the grouped linear's
backward would quantize from autograd's dy.
"""
from typing import Optional, Tuple

import torch

from deepseek_ops import train_ops
from deepseek_ops._checks import FLOAT_DTYPES, FP8, check_multiple, check_shape, check_tensor
from deepseek_ops.gemm import _m_indices_from_offsets, check_master_weight, needs_weight_grad

_ops = torch.ops.deepseek_ops


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype == torch.float32 else torch.bfloat16


def _saved_x_t(x: torch.Tensor, save: bool):
    """transpose_quant_fp8(x), or empty [K, 0] tensors when the weight gets no gradient."""
    if not save:
        k = x.shape[1]
        return x.new_empty((k, 0), dtype=FP8), x.new_empty((k, 0), dtype=torch.float32)
    return train_ops.transpose_quant_fp8(x)


@torch.library.custom_op("deepseek_ops::fp8_linear_fwd", mutates_args=())
def fp8_linear_fwd(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   master_weight: Optional[torch.Tensor], save_x_t: bool) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """x [T, K] -> (y [T, N] fp32 for fp32 x else bf16, x^T e4m3 [K, T_pad], its scales
    [K, T_pad/128]) ([K, 0] each unless save_x_t). Arguments are validated by deepseek_ops.fp8_linear."""
    x_fp8, x_scales = _ops.per_token_group_quant_fp8(x, 128, False, True)
    y = _ops.fp8_gemm(x_fp8, x_scales, weight, weight_scale, _out_dtype(x), None)
    x_t, x_t_scales = _saved_x_t(x, save_x_t)
    return y, x_t, x_t_scales


@fp8_linear_fwd.register_fake
def _fp8_linear_fwd_fake(x, weight, weight_scale, master_weight, save_x_t):
    t, k = x.shape
    t_pad = (t + 127) // 128 * 128 if save_x_t else 0
    return (x.new_empty((t, weight.shape[0]), dtype=_out_dtype(x)), x.new_empty((k, t_pad), dtype=FP8),
            x.new_empty((k, t_pad // 128), dtype=torch.float32))


def _fp8_linear_setup(ctx, inputs, output):
    x, weight, weight_scale, master_weight, _ = inputs
    _, x_t, x_t_scales = output
    ctx.mark_non_differentiable(x_t, x_t_scales)
    ctx.save_for_backward(weight, weight_scale, x_t, x_t_scales)
    ctx.x_dtype = x.dtype
    ctx.master_dtype = master_weight.dtype if master_weight is not None else None


def _dgrad(dy: torch.Tensor, weight, weight_scale, dtype) -> torch.Tensor:
    dy_fp8, dy_scales = _ops.per_token_group_quant_fp8(dy.contiguous(), 128, False, False)
    return train_ops.fp8_gemm_dgrad(dy_fp8, dy_scales, weight, weight_scale, torch.float32).to(dtype)


def _fp8_linear_backward(ctx, dy, _dx_t, _dx_t_scales):
    weight, weight_scale, x_t, x_t_scales = ctx.saved_tensors
    dx = d_master = None
    if ctx.needs_input_grad[0]:
        dx = _dgrad(dy, weight, weight_scale, ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        dy_t, dy_t_scales = train_ops.transpose_quant_fp8(dy.contiguous())
        d_master = train_ops.fp8_gemm_wgrad(dy_t, dy_t_scales, x_t, x_t_scales).to(ctx.master_dtype)
    return dx, None, None, d_master, None


fp8_linear_fwd.register_autograd(_fp8_linear_backward, setup_context=_fp8_linear_setup)


def _grouped_forward(x, weight, weight_scale, group_offsets, save_x_t: bool):
    x_fp8, x_scales = _ops.per_token_group_quant_fp8(x, 128, False, True)
    m_indices = _m_indices_from_offsets(group_offsets, weight.shape[0], x.shape[0], x.device)
    y = _ops.grouped_fp8_gemm_contiguous(x_fp8, x_scales, weight, weight_scale, m_indices)
    x_t, x_t_scales = _saved_x_t(x, save_x_t)
    return y, x_t, x_t_scales


@torch.library.custom_op("deepseek_ops::grouped_fp8_linear_fwd", mutates_args=())
def grouped_fp8_linear_fwd(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           group_offsets: torch.Tensor, master_weight: Optional[torch.Tensor],
                           save_x_t: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [sum_M, K] rows grouped by expert -> (y bf16 [sum_M, N], x^T e4m3 [K, sum_M], scales
    [K, sum_M/128]) ([K, 0] each unless save_x_t). Validated by grouped_fp8_linear."""
    return _grouped_forward(x, weight, weight_scale, group_offsets, save_x_t)


@grouped_fp8_linear_fwd.register_fake
def _grouped_fp8_linear_fwd_fake(x, weight, weight_scale, group_offsets, master_weight, save_x_t):
    m, k = x.shape
    m_t = m if save_x_t else 0
    return (x.new_empty((m, weight.shape[1]), dtype=torch.bfloat16), x.new_empty((k, m_t), dtype=FP8),
            x.new_empty((k, m_t // 128), dtype=torch.float32))


def _grouped_setup(ctx, inputs, output):
    x, weight, weight_scale, group_offsets, master_weight, _ = inputs
    _, x_t, x_t_scales = output
    ctx.mark_non_differentiable(x_t, x_t_scales)
    ctx.save_for_backward(weight, weight_scale, group_offsets, x_t, x_t_scales)
    ctx.x_dtype = x.dtype
    ctx.master_dtype = master_weight.dtype if master_weight is not None else None


def _grouped_dgrad(dy_fp8, dy_scales, weight, weight_scale, group_offsets, dtype) -> torch.Tensor:
    m_indices = _m_indices_from_offsets(group_offsets, weight.shape[0], dy_fp8.shape[0], dy_fp8.device)
    return train_ops.dispatch("grouped_fp8_gemm_dgrad_contiguous", dy_fp8.device, dy_fp8, dy_scales, weight,
                              weight_scale, m_indices).to(dtype)


def _grouped_wgrad(dy_t, dy_t_scales, x_t, x_t_scales, group_offsets, dtype) -> torch.Tensor:
    return train_ops.dispatch("k_grouped_fp8_gemm_wgrad", dy_t.device, dy_t, dy_t_scales, x_t, x_t_scales,
                              group_offsets, None).to(dtype)


def _grouped_backward(ctx, dy, _dx_t, _dx_t_scales):
    weight, weight_scale, group_offsets, x_t, x_t_scales = ctx.saved_tensors
    dx = d_master = None
    if ctx.needs_input_grad[0]:
        dy_fp8, dy_scales = _ops.per_token_group_quant_fp8(dy.contiguous(), 128, False, False)
        dx = _grouped_dgrad(dy_fp8, dy_scales, weight, weight_scale, group_offsets, ctx.x_dtype)
    if ctx.needs_input_grad[4]:
        dy_t, dy_t_scales = train_ops.transpose_quant_fp8(dy.contiguous())
        d_master = _grouped_wgrad(dy_t, dy_t_scales, x_t, x_t_scales, group_offsets, ctx.master_dtype)
    return dx, None, None, None, d_master, None


grouped_fp8_linear_fwd.register_autograd(_grouped_backward, setup_context=_grouped_setup)


@torch.library.custom_op("deepseek_ops::grouped_fp8_linear_swiglu_fwd", mutates_args=())
def grouped_fp8_linear_swiglu_fwd(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                                  group_offsets: torch.Tensor, master_weight: Optional[torch.Tensor],
                                  save_x_t: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [sum_M, K] -> (act bf16 [sum_M, N/2], h = [gate | up] bf16 [sum_M, N], x^T, its scales), act =
    (silu(gate.float()) * up.float()).to(bf16). Validated by grouped_fp8_linear_swiglu."""
    h, x_t, x_t_scales = _grouped_forward(x, weight, weight_scale, group_offsets, save_x_t)
    gate, up = h.chunk(2, dim=-1)  # [sum_M, N/2] each
    act = (torch.nn.functional.silu(gate.float()) * up.float()).to(h.dtype)
    return act, h, x_t, x_t_scales


@grouped_fp8_linear_swiglu_fwd.register_fake
def _grouped_fp8_linear_swiglu_fwd_fake(x, weight, weight_scale, group_offsets, master_weight, save_x_t):
    h, x_t, x_t_scales = _grouped_fp8_linear_fwd_fake(x, weight, weight_scale, group_offsets, master_weight, save_x_t)
    return h.new_empty((h.shape[0], h.shape[1] // 2)), h, x_t, x_t_scales


def _grouped_swiglu_setup(ctx, inputs, output):
    x, weight, weight_scale, group_offsets, master_weight, _ = inputs
    _, h, x_t, x_t_scales = output
    ctx.mark_non_differentiable(h, x_t, x_t_scales)
    ctx.save_for_backward(weight, weight_scale, group_offsets, x_t, x_t_scales, h)
    ctx.x_dtype = x.dtype
    ctx.master_dtype = master_weight.dtype if master_weight is not None else None


def _grouped_swiglu_backward(ctx, d_act, _dh, _dx_t, _dx_t_scales):
    weight, weight_scale, group_offsets, x_t, x_t_scales, h = ctx.saved_tensors
    dx = d_master = None
    dh_fp8, dh_scales, dh_t, dh_t_scales = train_ops.swiglu_backward_quant_fp8(d_act.contiguous(), h,
                                                                               ctx.needs_input_grad[4])
    if ctx.needs_input_grad[0]:
        dx = _grouped_dgrad(dh_fp8, dh_scales, weight, weight_scale, group_offsets, ctx.x_dtype)
    if ctx.needs_input_grad[4]:
        d_master = _grouped_wgrad(dh_t, dh_t_scales, x_t, x_t_scales, group_offsets, ctx.master_dtype)
    return dx, None, None, None, d_master, None


grouped_fp8_linear_swiglu_fwd.register_autograd(_grouped_swiglu_backward, setup_context=_grouped_swiglu_setup)


def _check_grouped_linear(x, weight, weight_scale, group_offsets, master_weight):
    check_tensor("x", x, dtype=FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, dtype=FP8, ndim=3, device=x.device)
    check_tensor("weight_scale", weight_scale, dtype=torch.float32, ndim=3, device=x.device)
    num_groups, n, k = weight.shape
    check_shape("x", x, (x.shape[0], k))
    check_multiple("x", k, 128, "K (x.shape[1])")
    check_multiple("weight", n, 128, "N (weight.shape[1]: dy is quantized per 1 x 128 along N for the backward)")
    check_shape("weight_scale", weight_scale, (num_groups, n // 128, k // 128))
    check_shape("group_offsets", group_offsets, (num_groups + 1,))
    train_ops.check_group_offsets(group_offsets, x.shape[0], "sum_M = x.shape[0]")
    if master_weight is not None:
        check_master_weight(master_weight, weight)


def grouped_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       group_offsets: torch.Tensor, master_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The MoE experts' linear, differentiable: rows [group_offsets[g], group_offsets[g+1]) of x
    through expert g, y[r] = x[r] @ (weight[g] * weight_scale[g])^T, bf16 [sum_M, N].

    x: [sum_M, K] bf16/fp16/fp32, K a multiple of 128, quantized per 1 x 128 group; weight [G, N, K]
    float8_e4m3fn with block scales [G, N/128, K/128] (per_block_quant_fp8 of each expert's master
    weight); group_offsets int32/int64 [G + 1] from 0 to sum_M, multiples of
    GROUPED_GEMM_ALIGNMENT. master_weight: optional float [G, N, K] that receives dW (module docstring).
    """
    _check_grouped_linear(x, weight, weight_scale, group_offsets, master_weight)
    y, _, _ = _ops.grouped_fp8_linear_fwd(x.contiguous(), weight, weight_scale, group_offsets, master_weight,
                                          needs_weight_grad(master_weight))
    return y


def grouped_fp8_linear_swiglu(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                              group_offsets: torch.Tensor, master_weight: Optional[torch.Tensor] = None
                              ) -> torch.Tensor:
    """The MoE experts' gate/up projection and SwiGLU, differentiable: h = grouped_fp8_linear(x, weight,
    ...) [sum_M, N] with weight [G, N, K] each expert's gate rows then up rows, N/2 a multiple of 128;
    returns act = (silu(gate.float()) * up.float()).to(bf16) [sum_M, N/2], gate, up = h.chunk(2, -1).

    The same values and gradients as those two lines (bit for bit on CPU), with the backward of the
    SwiGLU fused into the quantization of dy (module docstring). Arguments as grouped_fp8_linear.
    """
    _check_grouped_linear(x, weight, weight_scale, group_offsets, master_weight)
    check_multiple("weight", weight.shape[1], 256, "N (weight.shape[1]: gate and up rows, N/2 a multiple of 128)")
    act, _, _, _ = _ops.grouped_fp8_linear_swiglu_fwd(x.contiguous(), weight, weight_scale, group_offsets,
                                                      master_weight, needs_weight_grad(master_weight))
    return act
