"""Types and argument checks shared by every ep backend."""
import dataclasses
from typing import NamedTuple, Optional, Tuple, Union

import torch

from deepseek_ops._checks import FP8, aligned16, can_read_values, check_dim, check_tensor, check_values_in_range

MAX_TOPK = 32  # the kernels keep a token's destinations in shared memory

XInput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class DispatchResult(NamedTuple):
    """What dispatch returns on each rank.

    recv_x: [num_rows, H] (bf16), or (x_fp8 [num_rows, H], scales fp32 [num_rows, H/128]) for FP8:
        one row per (token, local expert) pair, each local expert's rows contiguous and in (source
        rank, token, k) order, each group padded to the alignment: the grouped GEMM's contiguous
        layout. Padding rows hold unspecified values.
    recv_topk_idx: int32 [num_rows], the local expert of each row, -1 on padding rows (the grouped
        GEMM's m_indices).
    recv_topk_weights: fp32 [num_rows], the routing weight of each row's pair, 0 on padding rows.
    num_recv_tokens_per_expert: int32 [num_local_experts] (unpadded counts, on the device).
    handle: what combine needs to bring the rows home.
    """

    recv_x: XInput
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: torch.Tensor
    handle: object


@dataclasses.dataclass
class LocalHandle:
    """One GPU: row_of[t, k] is the recv row of token t's k-th pair (-1: no expert)."""

    row_of: torch.Tensor
    num_rows: int


def worst_case_rows(num_tokens: int, topk: int, num_local_experts: int, alignment: int) -> int:
    """Rows the contiguous layout can need: every pair plus (alignment - 1) padding per expert, rounded
    up to a multiple of alignment as every exact layout is (the grouped GEMM takes only such row counts)."""
    rows = num_tokens * topk + num_local_experts * (alignment - 1)
    return -(-rows // alignment) * alignment


def split_x(x: XInput) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"argument 'x': expected a tensor or a (x_fp8, x_scales) pair, got {len(x)} items")
        return x[0], x[1]
    return x, None


def check_dispatch_args(x: XInput, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor], num_experts: int,
                        *, hidden: Optional[int] = None, max_tokens: Optional[int] = None,
                        check_range: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validates dispatch's inputs; returns (x_data, x_scales or None), contiguous and 16-byte aligned."""
    x_data, x_scales = split_x(x)
    check_tensor("topk_idx", topk_idx, dtype=torch.int64, ndim=2)
    if x_scales is None:
        check_tensor("x", x_data, dtype=torch.bfloat16, ndim=2, device=topk_idx.device)
    else:
        check_tensor("x[0] (x_fp8)", x_data, dtype=FP8, ndim=2, device=topk_idx.device)
        check_tensor("x[1] (x_scales)", x_scales, dtype=torch.float32, ndim=2, device=topk_idx.device)
        if x_data.shape[1] % 128 != 0:
            raise ValueError(f"argument 'x[0] (x_fp8)': hidden must be a multiple of 128 for 1x128 scales, "
                             f"got {x_data.shape[1]}")
        check_dim("x[1] (x_scales)", x_scales, 0, x_data.shape[0], "tokens, as x_fp8")
        check_dim("x[1] (x_scales)", x_scales, 1, x_data.shape[1] // 128, "hidden / 128")
    num_tokens, topk = topk_idx.shape
    check_dim("x", x_data, 0, num_tokens, "tokens, as topk_idx")
    if x_data.shape[1] % 16 != 0:
        raise ValueError(f"argument 'x': hidden must be a multiple of 16, got {x_data.shape[1]}")
    if hidden is not None:
        check_dim("x", x_data, 1, hidden, "the Buffer's hidden size")
    if max_tokens is not None and num_tokens > max_tokens:
        raise ValueError(f"argument 'x': at most {max_tokens} tokens (the Buffer's max_tokens_per_rank), "
                         f"got {num_tokens}")
    if not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"argument 'topk_idx': expected 1 to {MAX_TOPK} experts per token, got {topk}")
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, dtype=torch.float32, ndim=2, device=topk_idx.device)
        check_dim("topk_weights", topk_weights, 0, num_tokens, "tokens, as topk_idx")
        check_dim("topk_weights", topk_weights, 1, topk, "topk, as topk_idx")
    if check_range and can_read_values(topk_idx, sync_ok=True):
        check_values_in_range("topk_idx", topk_idx, -1, num_experts, "an expert index or -1")
    return aligned16(x_data), (x_scales.contiguous() if x_scales is not None else None)


def check_combine_args(y: torch.Tensor, topk_weights: torch.Tensor, num_rows: int, row_of_shape, hidden=None):
    check_tensor("y", y, dtype=torch.bfloat16, ndim=2)
    check_dim("y", y, 0, num_rows, "rows, as dispatch's recv_x")
    if hidden is not None:
        check_dim("y", y, 1, hidden, "the Buffer's hidden size")
    if y.shape[1] % 8 != 0:
        raise ValueError(f"argument 'y': hidden must be a multiple of 8, got {y.shape[1]}")
    check_tensor("topk_weights", topk_weights, dtype=torch.float32, ndim=2, device=y.device)
    if tuple(topk_weights.shape) != tuple(row_of_shape):
        raise ValueError(f"argument 'topk_weights': expected shape {tuple(row_of_shape)} (the dispatched "
                         f"topk_idx), got {tuple(topk_weights.shape)}")
