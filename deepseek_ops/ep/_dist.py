"""Many ranks over torch.distributed: all_to_all_single (NCCL on GPUs, gloo on CPUs).

The backend for users beyond one node and the reference the fast paths are tested against. Every
call syncs with the host (the receive sizes are exchanged first). Rows travel once per (token,
destination rank) on the way out and once per (token, expert) pair on the way back, so combine
sums the expert outputs at home in k order: the result is bitwise the one-GPU combine's.
"""
import dataclasses
import datetime
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from deepseek_ops.ep import _ops
from deepseek_ops.ep._common import DispatchResult, check_combine_args, check_dispatch_args, worst_case_rows
from deepseek_ops.ep._local import exact_rows

_MESSAGE_BYTES = 512
_META_FIELDS = 6
_DTYPE_CODES = {torch.bfloat16: 1, torch.float8_e4m3fn: 2}


@dataclasses.dataclass
class DistHandle:
    """recv_row_of [R, topk]: the recv_x row of each received token's local pairs (-1: none);
    num_rows: rows of recv_x; pairs_from_rank[s] / pairs_to_rank[r]: (token, expert) pairs exchanged
    with each rank; pair_pos [T, topk]: where each of our pairs lands in combine's return buffer."""

    recv_row_of: torch.Tensor
    num_rows: int
    pairs_from_rank: List[int]
    pairs_to_rank: List[int]
    pair_pos: torch.Tensor


def _encode(message: Optional[str], meta: Sequence[int]) -> torch.Tensor:
    raw = (message or "").encode()[:_MESSAGE_BYTES]
    text = torch.zeros(_MESSAGE_BYTES, dtype=torch.int64)
    if raw:
        text[: len(raw)] = torch.tensor(list(raw), dtype=torch.int64)
    return torch.cat([torch.tensor([1 if message else 0, *meta], dtype=torch.int64), text])


def _decode(row: torch.Tensor) -> str:
    raw = bytes(int(b) for b in row[1 + _META_FIELDS:].tolist() if b != 0)
    return raw.decode(errors="replace")


def wait_with_deadline(work, step: str, rank: int, timeout: datetime.timedelta):
    """Waits for an async collective; a peer that died or never arrived raises TimeoutError naming the
    step and this rank."""
    try:
        finished = work.wait(timeout=timeout)
    except RuntimeError as exc:  # gloo raises on timeout or a dead peer
        raise TimeoutError(f"deepseek_ops.ep: rank {rank} stuck in '{step}' for more than "
                           f"{timeout.total_seconds():g} s (a peer died or never arrived): {exc}") from exc
    if finished is False:
        raise TimeoutError(f"deepseek_ops.ep: rank {rank} stuck in '{step}' for more than "
                           f"{timeout.total_seconds():g} s (a peer died or never arrived)")


def comm_device(group) -> torch.device:
    """Where the group's collectives take their tensors: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")


class DistBackend:
    def __init__(self, group, num_experts: int, hidden: int, max_tokens: int, alignment: int, timeout_s: float,
                 layout: Dict[str, int], setup_error: Optional[str]):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.comm_device = comm_device(group)
        self._agree_layout(setup_error, layout)
        self.num_experts, self.hidden, self.max_tokens = num_experts, hidden, max_tokens
        self.num_local_experts = num_experts // self.world_size
        self.alignment = alignment
        self.max_topk: Optional[int] = None  # a backend with fixed-size buffers sets its capacity

    # -- collectives with a deadline -------------------------------------------------------------
    def _wait(self, work, step: str):
        wait_with_deadline(work, step, self.rank, self.timeout)

    def _all_to_all(self, send: torch.Tensor, out_splits: List[int], in_splits: List[int], step: str) -> torch.Tensor:
        """Rows of `send` (any dtype, moved as bytes) split by in_splits; returns the received rows."""
        row_shape, dtype, device = send.shape[1:], send.dtype, send.device
        row_bytes = row_shape.numel() * send.element_size()
        send_bytes = send.contiguous().view(torch.uint8).reshape(send.shape[0], row_bytes).to(self.comm_device)
        recv_bytes = send_bytes.new_empty((sum(out_splits), row_bytes))
        work = dist.all_to_all_single(recv_bytes, send_bytes, out_splits, in_splits, group=self.group, async_op=True)
        self._wait(work, step)
        return recv_bytes.to(device).view(dtype).reshape(sum(out_splits), *row_shape)

    def _gather_checked(self, step: str, error: Optional[str], meta: Sequence[int]) -> List[tuple]:
        """Every rank learns every rank's argument error and metadata: a bad call fails on all ranks.
        Returns each rank's meta."""
        mine = _encode(error, meta).to(self.comm_device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._wait(dist.all_gather(gathered, mine, group=self.group, async_op=True), step)
        rows = [g.cpu() for g in gathered]
        failures = [(r, _decode(row)) for r, row in enumerate(rows) if int(row[0]) != 0]
        if failures:
            text = "; ".join(f"rank {r}: {msg}" for r, msg in failures)
            raise ValueError(f"deepseek_ops.ep.{step}: bad arguments on {len(failures)} rank(s): {text}")
        return [tuple(row[1:1 + _META_FIELDS].tolist()) for row in rows]

    def _agree(self, step: str, error: Optional[str], meta: Sequence[int]):
        metas = self._gather_checked(step, error, meta)
        if len(set(metas)) > 1:
            raise ValueError(f"deepseek_ops.ep.{step}: argument 'x': ranks disagree on (hidden, dtype, has_scales, "
                             f"topk, extra): {dict(enumerate(metas))}")

    def _agree_layout(self, error: Optional[str], layout: Dict[str, int]):
        """Every rank built its Buffer with the same arguments, before any memory is shared: each rank
        sizes its sends (and, over IPC, its writes into the peers' buffers) by its own."""
        values = [0] * _META_FIELDS if error is not None else [*layout.values(), 0]
        metas = self._gather_checked("Buffer", error, values)
        for i, name in enumerate(layout):
            by_rank = [meta[i] for meta in metas]
            if len(set(by_rank)) > 1:
                text = ", ".join(f"rank {r} has {v}" for r, v in enumerate(by_rank))
                raise ValueError(f"deepseek_ops.ep.Buffer: argument '{name}' must be the same on every rank: {text}")

    # -- dispatch / combine ----------------------------------------------------------------------
    def dispatch(self, x, topk_idx, topk_weights, exact: bool) -> DispatchResult:
        error, x_data, x_scales = None, None, None
        try:
            x_data, x_scales = check_dispatch_args(x, topk_idx, topk_weights, self.num_experts, hidden=self.hidden,
                                                   max_tokens=self.max_tokens)
            if self.max_topk is not None and topk_idx.shape[1] > self.max_topk:
                raise ValueError(f"argument 'topk_idx': at most {self.max_topk} experts per token (the Buffer's "
                                 f"max_topk), got {topk_idx.shape[1]}")
        except ValueError as exc:
            error = str(exc)
        meta = [0] * _META_FIELDS if error is not None else [
            x_data.shape[1], _DTYPE_CODES[x_data.dtype], int(x_scales is not None), topk_idx.shape[1], 0, 0]
        self._agree("dispatch", error, meta)
        weights = topk_weights.contiguous() if topk_weights is not None else None
        return self._dispatch(x_data, x_scales, topk_idx.contiguous(), weights, exact)

    def _dispatch(self, x_data, x_scales, topk_idx, topk_weights, exact: bool) -> DispatchResult:
        num_tokens, topk = topk_idx.shape
        w, epr = self.world_size, self.num_local_experts
        num_tokens_per_rank, _, is_token_in_rank = _ops.dispatch_layout(topk_idx, self.num_experts, w)
        # Rows leave in (destination rank, token) order; receivers see each source's tokens ascending.
        dest, token = is_token_in_rank.t().nonzero(as_tuple=True)
        idx_rows = topk_idx[token]  # [S, topk]
        local = idx_rows - (dest * epr).unsqueeze(1)
        local = torch.where((idx_rows >= 0) & (local >= 0) & (local < epr), local, -1)
        weights = topk_weights[token] if topk_weights is not None else (local >= 0).to(torch.float32)
        # int64 / fp32 / bf16 [S, n] viewed as uint8 [S, n * itemsize]: one byte row per sent token.
        parts = [x_data.view(torch.uint8)[token], local.contiguous().view(torch.uint8),
                 weights.contiguous().view(torch.uint8)]
        if x_scales is not None:
            parts.append(x_scales[token].contiguous().view(torch.uint8))
        payload = torch.cat(parts, dim=1)

        in_splits = num_tokens_per_rank.long().cpu()
        out_splits = self._all_to_all(in_splits.unsqueeze(1), [1] * w, [1] * w, "dispatch: count exchange")
        in_splits, out_splits = in_splits.tolist(), out_splits.reshape(-1).tolist()
        recv = self._all_to_all(payload, out_splits, in_splits, "dispatch: data exchange")

        x_bytes = x_data.shape[1] * x_data.element_size()
        offsets = [0, x_bytes, x_bytes + 8 * topk, x_bytes + 12 * topk, recv.shape[1]]
        # Fresh row-major copies: an empty slice's .contiguous() keeps strides that view() rejects.
        field = [recv.new_empty((recv.shape[0], b - a)).copy_(recv[:, a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
        recv_x = field[0].view(x_data.dtype)
        recv_local = field[1].view(torch.int64)
        recv_weights = field[2].view(torch.float32)
        recv_scales = field[3].view(torch.float32) if x_scales is not None else None

        num_recv = recv_x.shape[0]
        if exact:
            _, counts, _ = _ops.dispatch_layout(recv_local, epr, 1)
            num_rows = exact_rows(counts, self.alignment)
        else:
            num_rows = worst_case_rows(num_recv, topk, epr, self.alignment)
        recv_x, recv_scales, recv_w, m_indices, recv_row_of, counts = _ops.permute(
            recv_x, recv_scales, recv_weights, recv_local, epr, self.alignment, num_rows)

        # Pairs for combine's return trip: receivers send them in (source, token, k) order.
        pairs_per_row = (recv_row_of >= 0).sum(1)
        pairs_from_rank = [int(s.sum()) for s in torch.split(pairs_per_row, out_splits)]
        valid = topk_idx >= 0
        pair_dest = torch.where(valid, topk_idx // epr, w).reshape(-1)
        order = torch.sort(pair_dest, stable=True).indices
        num_valid = int(valid.sum())
        pair_pos = torch.full((num_tokens * topk,), -1, dtype=torch.int32, device=topk_idx.device)
        pair_pos[order[:num_valid]] = torch.arange(num_valid, dtype=torch.int32, device=topk_idx.device)
        pairs_to_rank = torch.bincount(pair_dest, minlength=w + 1)[:w].tolist()

        handle = DistHandle(recv_row_of, num_rows, pairs_from_rank, pairs_to_rank, pair_pos.reshape(num_tokens, topk))
        out_x = recv_x if x_scales is None else (recv_x, recv_scales)
        return DispatchResult(out_x, m_indices, recv_w, counts, handle)

    def combine(self, y: torch.Tensor, handle: DistHandle, topk_weights: torch.Tensor) -> torch.Tensor:
        error = None
        try:
            check_combine_args(y, topk_weights, handle.num_rows, handle.pair_pos.shape, hidden=self.hidden)
        except ValueError as exc:
            error = str(exc)
        self._agree("combine", error, [0] * _META_FIELDS)
        return self._combine(y.contiguous(), handle, topk_weights.contiguous())

    def _combine(self, y: torch.Tensor, handle: DistHandle, topk_weights: torch.Tensor) -> torch.Tensor:
        rows = handle.recv_row_of[handle.recv_row_of >= 0].long()  # (source, token, k) order
        back = self._all_to_all(y[rows], handle.pairs_to_rank, handle.pairs_from_rank, "combine: data exchange")
        return _ops.combine(back, handle.pair_pos, topk_weights)
