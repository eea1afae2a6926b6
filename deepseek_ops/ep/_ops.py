"""The ep torch ops (schemas in csrc/registration.cpp): typed callers, fake kernels, registration.

These callers do no validation: the public functions of deepseek_ops.ep validate once, then call here.
"""
from typing import Optional, Tuple

import torch

from deepseek_ops import reference
from deepseek_ops._registry import register_op

_ops = torch.ops.deepseek_ops


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int,
                    num_ranks: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ops.ep_dispatch_layout(topk_idx, num_experts, num_ranks)


def permute(x: torch.Tensor, x_scales: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor],
            topk_idx: torch.Tensor, num_experts: int, alignment: int, num_rows: int):
    """-> (recv_x, recv_scales, recv_weights, m_indices, row_of, num_tokens_per_expert)."""
    return _ops.ep_permute(x, x_scales, topk_weights, topk_idx, num_experts, alignment, num_rows)


def combine(y: torch.Tensor, row_of: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    return _ops.ep_combine(y, row_of, topk_weights)


def _dispatch_layout_fake(topk_idx, num_experts, num_ranks):
    torch._check(topk_idx.dim() == 2 and num_experts > 0 and num_ranks > 0,
                 lambda: f"ep_dispatch_layout: topk_idx [T, topk] and positive counts, got {topk_idx.shape}")
    num_tokens = topk_idx.shape[0]
    return (topk_idx.new_empty((num_ranks,), dtype=torch.int32), topk_idx.new_empty((num_experts,), dtype=torch.int32),
            topk_idx.new_empty((num_tokens, num_ranks), dtype=torch.bool))


def _permute_fake(x, x_scales, topk_weights, topk_idx, num_experts, alignment, num_rows):
    torch._check(x.dim() == 2 and topk_idx.dim() == 2 and x.shape[0] == topk_idx.shape[0],
                 lambda: f"ep_permute: x [T, H] and topk_idx [T, topk], got {x.shape}, {topk_idx.shape}")
    torch._check(num_rows >= 0 and alignment > 0 and num_experts > 0,
                 lambda: f"ep_permute: num_rows >= 0, alignment and num_experts > 0, got {num_rows}, {alignment}, "
                         f"{num_experts}")
    num_groups = x_scales.shape[1] if x_scales is not None else 0
    return (x.new_empty((num_rows, x.shape[1])),
            x.new_empty((num_rows, num_groups), dtype=torch.float32),
            x.new_empty((num_rows if topk_weights is not None else 0,), dtype=torch.float32),
            x.new_empty((num_rows,), dtype=torch.int32),
            x.new_empty(tuple(topk_idx.shape), dtype=torch.int32),
            x.new_empty((num_experts,), dtype=torch.int32))


def _combine_fake(y, row_of, topk_weights):
    torch._check(y.dim() == 2 and row_of.dim() == 2 and topk_weights.shape == row_of.shape,
                 lambda: f"ep_combine: y [rows, H], row_of and topk_weights [T, topk], got {y.shape}, {row_of.shape}, "
                         f"{topk_weights.shape}")
    return y.new_empty((row_of.shape[0], y.shape[1]))


register_op("ep_dispatch_layout", reference.ep_dispatch_layout, _dispatch_layout_fake)
register_op("ep_permute", reference.ep_permute, _permute_fake)
register_op("ep_combine", reference.ep_combine, _combine_fake)
