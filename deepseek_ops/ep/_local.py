"""One GPU (world size 1): dispatch is a permutation into the grouped GEMM's contiguous layout,
combine the weighted un-permutation. Fused kernels (csrc/sm90_ep_permute.cu); the graph-safe variant
never syncs with the host."""
from typing import Optional

import torch

from deepseek_ops.ep import _ops
from deepseek_ops.ep._common import DispatchResult, LocalHandle, worst_case_rows


def exact_rows(num_tokens_per_expert: torch.Tensor, alignment: int) -> int:
    """Rows of the padded contiguous layout (one host sync)."""
    return int(((num_tokens_per_expert.long() + alignment - 1) // alignment * alignment).sum())


def permute(x: torch.Tensor, x_scales: Optional[torch.Tensor], topk_idx: torch.Tensor,
            topk_weights: Optional[torch.Tensor], num_experts: int, alignment: int, exact: bool) -> DispatchResult:
    """Validated inputs -> DispatchResult. exact: one host sync to size the output exactly;
    otherwise the worst case (no sync, CUDA-graph safe), the rows past the groups are padding."""
    num_tokens, topk = topk_idx.shape
    if exact:
        _, num_tokens_per_expert, _ = _ops.dispatch_layout(topk_idx, num_experts, 1)
        num_rows = exact_rows(num_tokens_per_expert, alignment)
    else:
        num_rows = worst_case_rows(num_tokens, topk, num_experts, alignment)
    recv_x, recv_scales, recv_weights, m_indices, row_of, counts = _ops.permute(
        x, x_scales, topk_weights, topk_idx, num_experts, alignment, num_rows)
    if topk_weights is None:
        recv_weights = torch.where(m_indices >= 0, 1.0, 0.0).to(torch.float32)
    return DispatchResult(recv_x if x_scales is None else (recv_x, recv_scales), m_indices, recv_weights, counts,
                          LocalHandle(row_of, num_rows))


def combine(y: torch.Tensor, handle: LocalHandle, topk_weights: torch.Tensor) -> torch.Tensor:
    return _ops.combine(y, handle.row_of, topk_weights)
