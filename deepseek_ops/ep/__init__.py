"""Expert parallelism: dispatch tokens to their top-k experts and combine the outputs, one API on
three tiers.

- One GPU (world size 1, `group=None`): dispatch permutes the tokens into the per-expert
  contiguous layout the grouped GEMM consumes (groups padded to its alignment, m_indices -1 on
  padding rows); combine is the weighted un-permutation with fp32 accumulation. Fused kernels; with
  `exact=False` no host sync (a worst-case sized output), usable inside CUDA graphs.
- One node, several GPUs or processes (`backend="ipc"`): our kernels write rows straight into the
  peers' symmetric buffers (CUDA IPC), release/acquire counters, bounded waits (deepseek_ops/ep/_ipc.py).
- Many ranks (`backend="torch"`): torch.distributed all_to_all_single (NCCL on GPUs, gloo on CPUs);
  the reference of the fast paths.

Routing: topk_idx int64 [T, topk], -1 = no expert; experts are contiguous per rank (rank r owns
experts [r * E/R, (r + 1) * E/R)). FP8 dispatch takes (x_fp8 [T, H] e4m3, scales fp32 [T, H/128])
and carries the scales with the rows. combine(y) returns, per token, sum_k w[t, k] * y[row of (t, k)]
accumulated in fp32 in k order, in bf16: the same bits on every tier.

    buffer = ep.Buffer(group, max_tokens_per_rank=4096, hidden=7168, num_experts=256)
    recv_x, m_indices, recv_w, counts, handle = buffer.dispatch((x_fp8, scales), topk_idx, topk_weights)
    y = grouped_gemm(recv_x, m_indices, ...)            # [rows, H] bf16, rows in recv_x's order
    out = buffer.combine(y, handle, topk_weights)        # [T, H] bf16
"""
import datetime
import math
from typing import Optional, Tuple

import torch

from deepseek_ops._checks import aligned16, check_tensor
from deepseek_ops.constants import GROUPED_GEMM_ALIGNMENT
from deepseek_ops.ep import _local, _ops
from deepseek_ops.ep._common import (MAX_TOPK, DispatchResult, LocalHandle, XInput, check_combine_args,
                                     check_dispatch_args)
from deepseek_ops.ep._dist import DistBackend, comm_device, wait_with_deadline
from deepseek_ops.ep._ipc import IpcBackend

__all__ = ["Buffer", "DispatchResult", "combine", "dispatch", "get_dispatch_layout", "group_max_tokens"]

DEFAULT_TIMEOUT_S = 100.0
MAX_EXPERTS = 4096
BACKENDS = ("auto", "local", "ipc", "torch")


def _check_experts(num_experts: int, num_ranks: int):
    if num_experts <= 0:
        raise ValueError(f"argument 'num_experts': expected a positive count, got {num_experts}")
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"argument 'num_experts': at most {MAX_EXPERTS} (the kernels count per expert in "
                         f"shared memory), got {num_experts}")
    if num_ranks <= 0 or num_experts % num_ranks != 0:
        raise ValueError(f"argument 'num_experts': must be a multiple of the number of ranks {num_ranks} (experts "
                         f"are split evenly, contiguous per rank), got {num_experts}")


def _buffer_args_error(layout: dict, world_size: int, backend: str) -> Optional[str]:
    """The first bad Buffer argument's message, or None."""
    for name, value in layout.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return f"argument '{name}': expected a positive integer, got {value!r}"
    if layout["max_topk"] > MAX_TOPK:
        return f"argument 'max_topk': at most {MAX_TOPK} experts per token, got {layout['max_topk']}"
    if backend == "ipc" and layout["hidden"] % 16 != 0:
        return f"argument 'hidden': backend 'ipc' needs a multiple of 16, got {layout['hidden']}"
    try:
        _check_experts(layout["num_experts"], world_size)
    except ValueError as exc:
        return str(exc)
    return None


def group_max_tokens(group, num_tokens: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """The largest num_tokens of the group's ranks (collective: every rank calls it). For sizing a
    Buffer, whose construction every rank must join with the same max_tokens_per_rank: a rank that
    alone found its Buffer too small and re-created it would wait for peers that never come. A peer
    that dies or never arrives raises TimeoutError after timeout_s."""
    if group is None or torch.distributed.get_world_size(group) == 1:
        return num_tokens
    count = torch.tensor([num_tokens], dtype=torch.int64, device=comm_device(group))
    work = torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=group, async_op=True)
    wait_with_deadline(work, "group_max_tokens", torch.distributed.get_rank(group),
                       datetime.timedelta(seconds=timeout_s))
    return int(count.item())


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int,
                        num_ranks: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_idx int64 [T, topk] (-1: no expert) -> (num_tokens_per_rank int32 [num_ranks],
    num_tokens_per_expert int32 [num_experts], is_token_in_rank bool [T, num_ranks]).

    A token counts once per rank however many of its experts that rank owns; per expert, every
    (token, k) pair counts. No host sync on CUDA.
    """
    check_tensor("topk_idx", topk_idx, dtype=torch.int64, ndim=2)
    _check_experts(num_experts, num_ranks)
    return _ops.dispatch_layout(topk_idx.contiguous(), num_experts, num_ranks)


def dispatch(x: XInput, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor] = None, *, num_experts: int,
             alignment: Optional[int] = None, exact: bool = True) -> DispatchResult:
    """One GPU: permutes x (bf16 [T, H], or (x_fp8, scales)) into the grouped GEMM's contiguous layout.

    Returns DispatchResult(recv_x, recv_topk_idx = m_indices, recv_topk_weights,
    num_recv_tokens_per_expert, handle) (see DispatchResult). alignment: rows per group multiple
    (default: the grouped GEMM's). exact=True syncs once to size recv_x exactly; exact=False sizes it
    for the worst case (T*topk + num_experts*(alignment-1) rows, rounded up to a multiple of
    alignment; the tail is padding) and never syncs: the variant for CUDA graphs and decode. It
    never reads topk_idx on the host, so out-of-range experts are not reported there: they are
    skipped like -1 (never a write past the buffer).
    """
    _check_experts(num_experts, 1)
    alignment = GROUPED_GEMM_ALIGNMENT if alignment is None else alignment
    if alignment <= 0:
        raise ValueError(f"argument 'alignment': expected a positive row count, got {alignment}")
    x_data, x_scales = check_dispatch_args(x, topk_idx, topk_weights, num_experts, check_range=exact)
    weights = topk_weights.contiguous() if topk_weights is not None else None
    return _local.permute(x_data, x_scales, topk_idx.contiguous(), weights, num_experts, alignment, exact)


def combine(y: torch.Tensor, handle: LocalHandle, topk_weights: torch.Tensor) -> torch.Tensor:
    """One GPU: out[t] = sum over k of topk_weights[t, k] * y[row of (t, k)], fp32 accumulation, bf16 [T, H].

    y: bf16 [rows, H], the rows of dispatch's recv_x (padding rows are never read).
    """
    if not isinstance(handle, LocalHandle):
        raise ValueError(f"argument 'handle': expected the handle of deepseek_ops.ep.dispatch, got "
                         f"{type(handle).__name__}")
    check_combine_args(y, topk_weights, handle.num_rows, handle.row_of.shape)
    return _local.combine(aligned16(y), handle, topk_weights.contiguous())


class Buffer:
    """The communication state of one rank: dispatch / combine for a fixed group and shape.

    group: a torch.distributed process group, or None for one process on one GPU.
    max_tokens_per_rank, hidden, num_experts: the largest T, H and total E any call will use
    (num_experts a multiple of the group size). backend: "local" (one rank), "ipc" (CUDA IPC
    within one node; the group only carries handles and argument checks, gloo is enough), "torch"
    (torch.distributed all_to_all), or "auto" (local for one rank, else torch). max_topk: the
    largest topk of any call (sizes the ipc buffers).
    timeout_s: a peer that dies or never arrives makes the others raise TimeoutError naming the
    stuck step after this long (gloo; NCCL uses the process group's own timeout). A killed peer:
    over gloo the survivors' next collective raises at once (the connection closes) or after
    timeout_s; over CUDA IPC the device waits give up after timeout_s and the error names the step
    and the rank waited for; with NCCL, what a dead peer does is up to NCCL's own error handling
    (its watchdog may abort the survivors).
    Backend "torch" syncs with the host once per dispatch (receive sizes; exact=False only changes
    the padding of recv_x there). Backend "ipc" with exact=True syncs once per dispatch and once per
    combine (its timeout flag), after a host agreement on the arguments; with exact=False it neither
    syncs nor talks to the group (recv_x sized for the worst case: set max_tokens_per_rank to the
    decode batch), so dispatch and combine can be captured in a CUDA graph; a timed-out peer then
    surfaces at check(). One GPU: exact=False is the no-sync, graph-safe variant.
    Every rank must build its Buffer with the same max_tokens_per_rank, hidden, num_experts, max_topk
    and alignment: construction exchanges them over the group (before any memory is shared) and
    raises the same ValueError on every rank, naming the argument and each rank's value, if they
    differ or one rank's are invalid.
    Too many tokens (more than max_tokens_per_rank) on one rank: with exact=True (both backends) and
    with backend "torch", a ValueError on every rank (the host agreement carries it). Backend "ipc"
    with exact=False: a ValueError on that rank only, before any of its kernels run (nothing is
    written anywhere); its peers' device waits time out, surfacing as TimeoutError at check() or at
    their next exact call, and the Buffer must then be re-created.
    close() releases the buffer; with backend "ipc" it is collective (every rank calls it). Garbage
    collection without close() leaks an ipc buffer until the process exits rather than free memory
    a peer may still map.
    """

    def __init__(self, group=None, max_tokens_per_rank: int = 4096, hidden: int = 7168, num_experts: int = 256, *,
                 backend: str = "auto", alignment: Optional[int] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_topk: int = 8):
        if backend not in BACKENDS:
            raise ValueError(f"argument 'backend': expected one of {BACKENDS}, got {backend!r}")
        world_size = 1 if group is None else torch.distributed.get_world_size(group)
        alignment = GROUPED_GEMM_ALIGNMENT if alignment is None else alignment
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not 0 < timeout_s < math.inf:
            raise ValueError(f"argument 'timeout_s': expected a positive, finite number of seconds, got {timeout_s!r}")
        if backend == "auto":
            backend = "local" if world_size == 1 else "torch"
        if backend == "local" and world_size != 1:
            raise ValueError(f"argument 'backend': 'local' needs a group of one rank, got {world_size} ranks")
        if backend == "ipc" and group is None:
            raise ValueError("argument 'group': backend 'ipc' needs a torch.distributed group")
        layout = dict(max_tokens_per_rank=max_tokens_per_rank, hidden=hidden, num_experts=num_experts,
                      max_topk=max_topk, alignment=alignment)
        # With peers, a bad argument is reported to every rank by the backend's agreement (nobody is left
        # waiting for this rank); alone, it raises here.
        error = _buffer_args_error(layout, world_size, backend)
        if error is not None and backend == "local":
            raise ValueError(error)
        self.group, self.world_size = group, world_size
        self.rank = 0 if group is None else torch.distributed.get_rank(group)
        self.max_tokens_per_rank, self.hidden, self.num_experts = max_tokens_per_rank, hidden, num_experts
        self.num_local_experts = num_experts // world_size if error is None else 0
        self.alignment, self.max_topk = alignment, max_topk
        self.timeout_s = timeout_s
        self.backend = backend
        self._impl = None
        if backend == "torch":
            self._impl = DistBackend(group, num_experts, hidden, max_tokens_per_rank, alignment, timeout_s,
                                     layout, error)
        elif backend == "ipc":
            self._impl = IpcBackend(group, num_experts, hidden, max_tokens_per_rank, alignment, timeout_s,
                                    max_topk, layout, error)
        self.closed = False

    def _check_open(self):
        if self.closed:
            raise RuntimeError("deepseek_ops.ep.Buffer: used after close()")

    def get_dispatch_layout(self, topk_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(num_tokens_per_rank [world_size], num_tokens_per_expert [num_experts], is_token_in_rank [T, world_size])."""
        return get_dispatch_layout(topk_idx, self.num_experts, self.world_size)

    def dispatch(self, x: XInput, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor] = None, *,
                 exact: bool = True) -> DispatchResult:
        """Sends every token to the ranks of its experts; see DispatchResult. topk_idx holds global expert
        indices; the result's recv_topk_idx local ones (rank r's expert e is local e - r * E/R)."""
        self._check_open()
        if self._impl is None:
            x_data, x_scales = check_dispatch_args(x, topk_idx, topk_weights, self.num_experts, hidden=self.hidden,
                                                   max_tokens=self.max_tokens_per_rank, check_range=exact)
            weights = topk_weights.contiguous() if topk_weights is not None else None
            return _local.permute(x_data, x_scales, topk_idx.contiguous(), weights, self.num_experts, self.alignment,
                                  exact)
        return self._impl.dispatch(x, topk_idx, topk_weights, exact)

    def combine(self, y: torch.Tensor, handle, topk_weights: torch.Tensor) -> torch.Tensor:
        """Brings every expert output home: bf16 [T, H], sum_k topk_weights[t, k] * y[row of (t, k)]."""
        self._check_open()
        if self._impl is None:
            return combine(y, handle, topk_weights)
        return self._impl.combine(y, handle, topk_weights)

    def check(self):
        """Raises TimeoutError if a device wait of an unsynced (exact=False) ipc round timed out (one
        host sync); nothing to check for the other backends."""
        self._check_open()
        if hasattr(self._impl, "check"):
            self._impl.check()

    def close(self):
        """Releases the communication state (idempotent). Backend "ipc": collective, every rank calls it
        (see IpcBackend.close: its buffer is freed only once every peer has unmapped it)."""
        impl, self._impl = getattr(self, "_impl", None), None
        if impl is not None and hasattr(impl, "close"):
            impl.close()
        self.closed = True

    def __del__(self):
        # Garbage collection runs at different times on different ranks, so it cannot coordinate with
        # the peers: an unclosed ipc buffer is leaked until the process exits, never freed under a peer.
        impl, self._impl = getattr(self, "_impl", None), None
        try:
            if impl is not None and hasattr(impl, "release_unclosed"):
                impl.release_unclosed()
        except Exception:  # noqa: BLE001 - a destructor at interpreter exit must not raise
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
