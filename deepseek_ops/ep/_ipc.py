"""One node, several GPUs (or several processes sharing one GPU): our own kernels over CUDA IPC.

Every rank allocates one symmetric buffer (the same layout everywhere: the Buffer arguments are
compared across ranks before anything is allocated), exchanges its cudaIpcGetMemHandle through the
torch.distributed group (gloo is enough: the control plane carries only handles, argument checks
and nothing else), and opens its peers' buffers. Dispatch: a device
barrier, then each rank writes its rows straight into the receive fields of its destination ranks
(csrc/sm90_ep_ipc_exchange.cu) and raises their arrival counters with system-scope release adds;
receivers acquire the counters and permute the received rows into the grouped GEMM's layout (the
one-GPU kernel).
Combine: each expert output row is written into its home rank's combine field at (token, k), and
the home rank sums them in k order (the one-GPU combine kernel): bitwise the other tiers' result.

Receive fields have room for max_tokens_per_rank rows from every source, so a round never
overflows. Every device wait is bounded (timeout_s): a dead or absent peer makes the waiting kernel
record the step and return; the host raises TimeoutError naming it. With exact=True, dispatch syncs
once (to size recv_x and read that flag) and so does its combine (the flag), after a host agreement
on the arguments (bad input raises on every rank). With exact=False neither syncs nor talks to the
group: recv_x has the worst case's rows (every received token's pairs, each local expert's group
padded), the arguments are checked on this rank only, and the kernels count their rounds on the
device, so a CUDA graph of dispatch and combine replays correctly (decode). A timed-out wait then
surfaces at Buffer.check() (one sync) or at the next exact call.
"""
import dataclasses
import warnings
from typing import Dict, List, Optional

import torch

from deepseek_ops._checks import aligned16
from deepseek_ops.ep import _ops
from deepseek_ops.ep._common import DispatchResult, check_combine_args, check_dispatch_args, worst_case_rows
from deepseek_ops.ep._dist import DistBackend
from deepseek_ops.ep._local import exact_rows

_ipc = torch.ops.deepseek_ops
# A timed-out device wait leaves step + NUM_STEP_CODES * (the rank it waited for) in the error flag
# (ep_ipc_error_code, csrc/sm90_ep_ipc_exchange.h).
STEPS = {1: "dispatch: barrier", 2: "dispatch: receive", 3: "combine: barrier", 4: "combine: receive"}
NUM_STEP_CODES = 16
_ALIGN = 256
# Buffers whose peers could not confirm they unmapped them: kept alive (never freed) until the process exits.
_LEAKED: List[torch.Tensor] = []


class IpcLayout:
    """Byte offsets of the fields of every rank's symmetric buffer, in EpIpcLayout's order."""

    FIELDS = ("barrier", "arrive", "combine_arrive", "counts", "rounds", "x", "scales", "idx", "weights", "src",
              "combine")
    NUM_ROUNDS = 3  # kEpIpcNumRounds (csrc/sm90_ep_ipc_exchange.h): barrier, dispatch and combine rounds

    def __init__(self, world_size: int, max_tokens: int, hidden: int, max_topk: int):
        rows = world_size * max_tokens
        sizes = {"barrier": 4 * world_size, "arrive": 4 * world_size, "combine_arrive": 4 * world_size,
                 "counts": 4 * world_size, "rounds": 4 * self.NUM_ROUNDS, "x": rows * hidden * 2,
                 "scales": rows * (hidden // 128) * 4, "idx": rows * max_topk * 8, "weights": rows * max_topk * 4,
                 "src": rows * 8,
                 "combine": max_tokens * max_topk * hidden * 2}
        self.offsets: Dict[str, int] = {}
        offset = 0
        for name in self.FIELDS:
            self.offsets[name] = offset
            offset = (offset + sizes[name] + _ALIGN - 1) // _ALIGN * _ALIGN
        self.num_bytes = offset

    def as_list(self) -> List[int]:
        return [self.offsets[name] for name in self.FIELDS]

    def view(self, buffer: torch.Tensor, name: str, dtype: torch.dtype, shape) -> torch.Tensor:
        num_bytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        start = self.offsets[name]
        return buffer[start:start + num_bytes].view(dtype).view(shape)


@dataclasses.dataclass
class IpcHandle:
    """recv_row_of [W * max_tokens, topk]: recv_x row of each received (row, k) (-1: none);
    recv_counts [W] int32 on the device; pair_home [T, topk]: (t * topk + k) where the pair has an expert.
    synced: from an exact dispatch (its combine agrees on the arguments and reads the timeout flag)."""

    recv_row_of: torch.Tensor
    recv_counts: torch.Tensor
    num_rows: int
    pair_home: torch.Tensor
    pair_pos: torch.Tensor  # = pair_home; the name combine's argument check reads
    synced: bool


class IpcBackend(DistBackend):
    def __init__(self, group, num_experts: int, hidden: int, max_tokens: int, alignment: int, timeout_s: float,
                 max_topk: int, layout: Dict[str, int], setup_error: Optional[str]):
        # The argument agreement (DistBackend) comes first: ranks with different layouts would write
        # past, or into the wrong field of, each other's buffers.
        super().__init__(group, num_experts, hidden, max_tokens, alignment, timeout_s, layout, setup_error)
        if not torch.cuda.is_available():
            raise RuntimeError("deepseek_ops.ep: backend 'ipc' needs a CUDA GPU")
        self.max_topk = max_topk
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout_ns = int(timeout_s * 1e9)
        self.layout = IpcLayout(self.world_size, max_tokens, hidden, max_topk)
        like = torch.empty(0, device=self.device)
        self.buffer = _ipc.ep_ipc_alloc(like, self.layout.num_bytes)
        handle = _ipc.ep_ipc_handle(self.buffer)
        handles = self._exchange(handle)
        self.peers = {p: _ipc.ep_ipc_open(like, handles[p], self.layout.num_bytes)
                      for p in range(self.world_size) if p != self.rank}
        ptrs = [self.buffer.data_ptr() if p == self.rank else self.peers[p].data_ptr() for p in range(self.world_size)]
        self.peer_ptrs = torch.tensor(ptrs, dtype=torch.int64, device=self.device)
        self.error = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.broken = False
        # Nobody writes into a peer before every rank has mapped every buffer.
        self._wait(torch.distributed.barrier(group=group, async_op=True), "setup: handle exchange")

    def _exchange(self, handle: torch.Tensor) -> List[torch.Tensor]:
        mine = handle.to(self.comm_device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._wait(torch.distributed.all_gather(gathered, mine, group=self.group, async_op=True),
                   "setup: handle exchange")
        return [g.cpu() for g in gathered]

    def close(self):
        """Collective (every rank calls it): a barrier (no peer still writes into our buffer), unmap the
        peers' buffers, a barrier (no peer still maps ours), free. If a barrier fails (a peer died,
        timed out or never closes), the buffer is leaked, not freed under a peer: the driver
        reclaims it when the process exits."""
        if getattr(self, "buffer", None) is None:
            return
        self._device_idle()
        healthy = not self.broken and self._close_barrier("close: peers done")
        self.peer_ptrs = None
        self.peers.clear()  # each mapping's deleter calls cudaIpcCloseMemHandle
        healthy = healthy and self._close_barrier("close: peers unmapped")
        if not healthy:
            _LEAKED.append(self.buffer)
        self.buffer = None  # otherwise the deleter calls cudaFree

    def release_unclosed(self):
        """Garbage collection without close(): the peers cannot be asked, so their buffers are unmapped
        and ours is leaked (freed when the process exits) rather than freed under a peer."""
        if getattr(self, "buffer", None) is None:
            return
        self._device_idle()
        self.peer_ptrs = None
        self.peers.clear()
        _LEAKED.append(self.buffer)
        self.buffer = None

    def _device_idle(self):
        torch.cuda.synchronize(self.device)  # this rank's kernels no longer touch any buffer

    def _close_barrier(self, step: str) -> bool:
        try:
            self._wait(torch.distributed.barrier(group=self.group, async_op=True), step)
        except (TimeoutError, RuntimeError) as exc:
            warnings.warn(f"deepseek_ops.ep.Buffer.close: {exc}; leaking this rank's buffer rather than freeing "
                          "memory a peer may still map", RuntimeWarning, stacklevel=3)
            return False
        return True

    # -- device steps ------------------------------------------------------------------------------
    def _check_usable(self):
        if self.broken:
            raise RuntimeError("deepseek_ops.ep: this Buffer timed out earlier; its peers are out of step. "
                               "Create a new Buffer (and process group)")
        if self.buffer is None:
            raise RuntimeError("deepseek_ops.ep.Buffer: used after close()")

    def dispatch(self, x, topk_idx, topk_weights, exact: bool) -> DispatchResult:
        self._check_usable()  # before the host agreement: a broken group must not be waited on
        if exact:
            return super().dispatch(x, topk_idx, topk_weights, exact)
        # No host sync and no collective: checks on this rank only (out-of-range experts are skipped
        # by the kernels, like -1). A rank that raises here leaves its peers to time out on the device.
        x_data, x_scales = check_dispatch_args(x, topk_idx, topk_weights, self.num_experts, hidden=self.hidden,
                                               max_tokens=self.max_tokens, check_range=False)
        if topk_idx.shape[1] > self.max_topk:
            raise ValueError(f"argument 'topk_idx': at most {self.max_topk} experts per token (the Buffer's "
                             f"max_topk), got {topk_idx.shape[1]}")
        weights = topk_weights.contiguous() if topk_weights is not None else None
        return self._dispatch(x_data, x_scales, topk_idx.contiguous(), weights, exact)

    def combine(self, y: torch.Tensor, handle, topk_weights: torch.Tensor) -> torch.Tensor:
        self._check_usable()
        if isinstance(handle, IpcHandle) and not handle.synced:
            check_combine_args(y, topk_weights, handle.num_rows, handle.pair_pos.shape, hidden=self.hidden)
            return self._combine(aligned16(y), handle, topk_weights.contiguous())
        return super().combine(y, handle, topk_weights)

    def check(self):
        """Raises TimeoutError if a device wait of this Buffer timed out (one host sync)."""
        self._check_usable()
        self._raise_if_failed(int(self.error.item()))

    def _barrier(self, step: int):
        _ipc.ep_ipc_barrier(self.peer_ptrs, self.layout.as_list(), self.rank, self.timeout_ns, self.error, step)

    def _raise_if_failed(self, code: int):
        if code != 0:
            self.broken = True
            step, peer = code % NUM_STEP_CODES, code // NUM_STEP_CODES
            raise TimeoutError(f"deepseek_ops.ep: rank {self.rank} stuck in '{STEPS.get(step, step)}' for more than "
                               f"{self.timeout.total_seconds():g} s waiting for rank {peer} (it died or never "
                               "arrived)")

    def _dispatch(self, x_data, x_scales, topk_idx, topk_weights, exact: bool) -> DispatchResult:
        self._check_usable()
        num_tokens, topk = topk_idx.shape
        w, epr, rows = self.world_size, self.num_local_experts, self.world_size * self.max_tokens
        num_tokens_per_rank, _, in_rank = _ops.dispatch_layout(topk_idx, self.num_experts, w)
        slot_of = torch.where(in_rank, torch.cumsum(in_rank.to(torch.int32), 0) - 1, -1).to(torch.int32)
        valid = (topk_idx >= 0) & (topk_idx < self.num_experts)
        weights = topk_weights.contiguous() if topk_weights is not None else valid.to(torch.float32)

        self._barrier(1)
        _ipc.ep_ipc_dispatch_send(x_data, x_scales, topk_idx, weights, slot_of.contiguous(), num_tokens_per_rank,
                                  self.peer_ptrs, self.layout.as_list(), self.rank, epr, self.max_tokens, self.error)
        recv_counts = torch.empty(w, dtype=torch.int32, device=self.device)
        _ipc.ep_ipc_dispatch_wait(self.peer_ptrs, self.layout.as_list(), self.rank, self.max_tokens, topk,
                                  self.timeout_ns, self.error, recv_counts)

        view = self.layout.view
        recv_x = view(self.buffer, "x", x_data.dtype, (rows, x_data.shape[1]))
        recv_scales = view(self.buffer, "scales", torch.float32, (rows, x_scales.shape[1])) \
            if x_scales is not None else None
        recv_idx = view(self.buffer, "idx", torch.int64, (rows, topk))
        recv_weights = view(self.buffer, "weights", torch.float32, (rows, topk))
        if exact:
            _, counts, _ = _ops.dispatch_layout(recv_idx, epr, 1)
            flag_and_counts = torch.cat([self.error.to(torch.int64), counts.to(torch.int64)]).cpu()  # the one sync
            self._raise_if_failed(int(flag_and_counts[0]))
            num_rows = exact_rows(flag_and_counts[1:], self.alignment)
        else:
            num_rows = worst_case_rows(rows, topk, epr, self.alignment)
        out_x, out_scales, out_w, m_indices, recv_row_of, counts = _ops.permute(
            recv_x, recv_scales, recv_weights, recv_idx, epr, self.alignment, num_rows)

        token_pairs = torch.arange(num_tokens * topk, dtype=torch.int32, device=self.device).reshape(num_tokens, topk)
        pair_home = torch.where(valid, token_pairs, -1)
        handle = IpcHandle(recv_row_of, recv_counts, num_rows, pair_home, pair_home, exact)
        return DispatchResult(out_x if x_scales is None else (out_x, out_scales), m_indices, out_w, counts, handle)

    def _combine(self, y: torch.Tensor, handle: IpcHandle, topk_weights: torch.Tensor) -> torch.Tensor:
        self._check_usable()
        self._barrier(3)
        _ipc.ep_ipc_combine_send(y, handle.recv_row_of, handle.recv_counts, self.peer_ptrs, self.layout.as_list(),
                                 self.rank, self.max_tokens, self.error)
        _ipc.ep_ipc_combine_wait(self.peer_ptrs, self.layout.as_list(), self.rank, self.timeout_ns, self.error)
        home = self.layout.view(self.buffer, "combine", torch.bfloat16,
                                (self.max_tokens * handle.pair_home.shape[1], self.hidden))
        out = _ops.combine(home, handle.pair_home, topk_weights)
        if handle.synced:
            self._raise_if_failed(int(self.error.item()))
        return out
