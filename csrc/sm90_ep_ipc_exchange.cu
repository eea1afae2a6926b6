// Intranode expert parallelism over CUDA IPC: senders write rows straight into their peers'
// symmetric buffers and publish them with system-scope release adds on per-source counters;
// receivers acquire the counters. No NCCL in the data path. Counters only grow (one add per sender
// block per round), so a round's target is known without resetting anything between rounds; each
// rank counts its rounds on the device (layout.rounds), so a CUDA graph of the kernels stays valid.
#include <cstring>

#include "atomic.cuh"
#include "common.h"
#include "fence.cuh"
#include "scoped_memory.cuh"
#include "sm90_ep_ipc_exchange.h"
#include "special_registers.cuh"

namespace dso {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ uint8_t* peer_base(const int64_t* peer_ptrs, int rank_idx) {
  return reinterpret_cast<uint8_t*>(peer_ptrs[rank_idx]);
}

__device__ __forceinline__ int* counter(const int64_t* peer_ptrs, int rank_idx, int64_t offset, int slot) {
  return reinterpret_cast<int*>(peer_base(peer_ptrs, rank_idx) + offset) + slot;
}

// This rank's round counter of `which`: read and written by this rank's kernels only, in stream order.
__device__ __forceinline__ int* round_counter(const int64_t* peer_ptrs, const EpIpcLayout& layout, int rank,
                                              int which) {
  return counter(peer_ptrs, rank, layout.rounds, which);
}

// The arrival count a round brings: one add per sender block per round. NOTE: unsigned, so that the
// product wraps like the counters (wait_at_least compares differences).
__device__ __forceinline__ int round_target(int round, int blocks_per_round) {
  return static_cast<int>(static_cast<unsigned>(round) * static_cast<unsigned>(blocks_per_round));
}

// Spins until *flag >= target (raised by rank `peer`); false (and ep_ipc_error_code(step, peer) in
// *error) after timeout_ns or when another wait already failed. NOTE: flags are compared as
// differences so that a wrapped int still orders.
__device__ bool wait_at_least(const int* flag, int target, int64_t timeout_ns, int* error, int step, int peer) {
  const uint64_t start = ptx::read_globaltimer();
  while (ptx::ld_acquire_sys(flag) - target < 0) {
    if (ptx::ld_relaxed_sys(error) != 0) return false;
    if (static_cast<int64_t>(ptx::read_globaltimer() - start) > timeout_ns) {
      atomicCAS(error, 0, ep_ipc_error_code(step, peer));
      return false;
    }
  }
  return true;
}

// 16-byte copy of one row by the whole block.
__device__ __forceinline__ void copy_row(uint8_t* dst, const uint8_t* src, int64_t row_bytes) {
  for (int64_t i = threadIdx.x; i < row_bytes / 16; i += blockDim.x)
    *reinterpret_cast<int4*>(dst + i * 16) = *reinterpret_cast<const int4*>(src + i * 16);
}

__global__ void __launch_bounds__(32) sm90_ep_ipc_barrier_kernel(const int64_t* peer_ptrs, EpIpcLayout layout,
                                                                 int rank, int world_size, int64_t timeout_ns,
                                                                 int* error, int step) {
  if (threadIdx.x != 0 || ptx::ld_relaxed_sys(error) != 0) return;
  const int target = ++*round_counter(peer_ptrs, layout, rank, kRoundBarrier);
  for (int p = 0; p < world_size; ++p) ptx::red_add_release_sys(counter(peer_ptrs, p, layout.barrier, rank), 1);
  for (int s = 0; s < world_size; ++s)
    if (!wait_at_least(counter(peer_ptrs, rank, layout.barrier, s), target, timeout_ns, error, step, s)) return;
}

__global__ void __launch_bounds__(kThreads) sm90_ep_ipc_dispatch_send_kernel(
    const uint8_t* __restrict__ x, int64_t row_bytes, const float* __restrict__ x_scales, int num_groups,
    const int64_t* __restrict__ topk_idx, const float* __restrict__ topk_weights, int topk,
    const int* __restrict__ slot_of, const int* __restrict__ counts, int64_t num_tokens, const int64_t* peer_ptrs,
    EpIpcLayout layout, int rank, int world_size, int num_local_experts, int64_t max_tokens, const int* error) {
  if (ptx::ld_relaxed_sys(error) != 0) return;  // an earlier wait failed: the peers are not listening
  if (blockIdx.x == 0 && threadIdx.x == 0) ++*round_counter(peer_ptrs, layout, rank, kRoundDispatch);
  for (int64_t token_idx = blockIdx.x; token_idx < num_tokens; token_idx += gridDim.x) {
    for (int d = 0; d < world_size; ++d) {
      const int slot = slot_of[token_idx * world_size + d];
      if (slot < 0) continue;  // block-uniform
      uint8_t* base = peer_base(peer_ptrs, d);
      const int64_t row = static_cast<int64_t>(rank) * max_tokens + slot;
      copy_row(base + layout.x + row * row_bytes, x + token_idx * row_bytes, row_bytes);
      float* dst_scales = reinterpret_cast<float*>(base + layout.scales) + row * num_groups;
      for (int g = threadIdx.x; g < num_groups; g += blockDim.x) dst_scales[g] = x_scales[token_idx * num_groups + g];
      if (threadIdx.x < topk) {
        const int64_t e = topk_idx[token_idx * topk + threadIdx.x];
        const int64_t first = static_cast<int64_t>(d) * num_local_experts;
        const bool local = e >= first && e < first + num_local_experts;
        reinterpret_cast<int64_t*>(base + layout.idx)[row * topk + threadIdx.x] = local ? e - first : -1;
        reinterpret_cast<float*>(base + layout.weights)[row * topk + threadIdx.x] =
            topk_weights[token_idx * topk + threadIdx.x];
      }
      if (threadIdx.x == 0) reinterpret_cast<int64_t*>(base + layout.src)[row] = token_idx;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // NOTE: the bar.sync above orders the block's row writes before this thread's system fence, and
    // the release add publishes them: a receiver that acquires the counter sees every row.
    ptx::fence_acq_rel_sys();
    for (int d = 0; d < world_size; ++d) {
      if (blockIdx.x == 0) ptx::st_relaxed_sys(counter(peer_ptrs, d, layout.counts, rank), counts[d]);
      ptx::red_add_release_sys(counter(peer_ptrs, d, layout.arrive, rank), 1);
    }
  }
}

__global__ void __launch_bounds__(kThreads) sm90_ep_ipc_dispatch_wait_kernel(const int64_t* peer_ptrs,
                                                                             EpIpcLayout layout, int rank,
                                                                             int64_t max_tokens, int topk,
                                                                             int64_t timeout_ns, int* error,
                                                                             int* recv_counts) {
  __shared__ int smem_count;
  const int src_rank = blockIdx.x;
  if (threadIdx.x == 0) {
    // The send kernel, earlier in this stream, counted the round.
    const int target = round_target(*round_counter(peer_ptrs, layout, rank, kRoundDispatch), kEpIpcSendBlocks);
    const bool arrived = ptx::ld_relaxed_sys(error) == 0 &&
                         wait_at_least(counter(peer_ptrs, rank, layout.arrive, src_rank), target, timeout_ns, error,
                                       kStepDispatchReceive, src_rank);
    smem_count = arrived ? ptx::ld_acquire_sys(counter(peer_ptrs, rank, layout.counts, src_rank)) : -1;
    recv_counts[src_rank] = arrived ? smem_count : 0;
  }
  __syncthreads();
  const int count = smem_count;
  if (count < 0) return;
  // Rows past the count hold an earlier round's data: no expert, so permute skips them.
  int64_t* idx = reinterpret_cast<int64_t*>(peer_base(peer_ptrs, rank) + layout.idx) + src_rank * max_tokens * topk;
  for (int64_t i = static_cast<int64_t>(count) * topk + threadIdx.x; i < max_tokens * topk; i += blockDim.x) idx[i] = -1;
}

__global__ void __launch_bounds__(kThreads) sm90_ep_ipc_combine_send_kernel(
    const uint8_t* __restrict__ y, int64_t row_bytes, const int* __restrict__ recv_row_of, int topk,
    const int* __restrict__ recv_counts, const int64_t* peer_ptrs, EpIpcLayout layout, int rank, int world_size,
    int64_t max_tokens, const int* error) {
  if (ptx::ld_relaxed_sys(error) != 0) return;
  if (blockIdx.x == 0 && threadIdx.x == 0) ++*round_counter(peer_ptrs, layout, rank, kRoundCombine);
  const int64_t* src = reinterpret_cast<const int64_t*>(peer_base(peer_ptrs, rank) + layout.src);
  for (int64_t row = blockIdx.x; row < world_size * max_tokens; row += gridDim.x) {
    const int src_rank = static_cast<int>(row / max_tokens);
    if (row % max_tokens >= recv_counts[src_rank]) continue;  // block-uniform
    const int64_t token_idx = src[row];
    uint8_t* home = peer_base(peer_ptrs, src_rank) + layout.combine;
    for (int k = 0; k < topk; ++k) {
      const int y_row = recv_row_of[row * topk + k];
      if (y_row >= 0) copy_row(home + (token_idx * topk + k) * row_bytes, y + static_cast<int64_t>(y_row) * row_bytes, row_bytes);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ptx::fence_acq_rel_sys();
    for (int p = 0; p < world_size; ++p) ptx::red_add_release_sys(counter(peer_ptrs, p, layout.combine_arrive, rank), 1);
  }
}

__global__ void __launch_bounds__(32) sm90_ep_ipc_combine_wait_kernel(const int64_t* peer_ptrs, EpIpcLayout layout,
                                                                      int rank, int world_size, int64_t timeout_ns,
                                                                      int* error) {
  if (threadIdx.x != 0 || ptx::ld_relaxed_sys(error) != 0) return;
  const int target = round_target(*round_counter(peer_ptrs, layout, rank, kRoundCombine), kEpIpcCombineBlocks);
  for (int s = 0; s < world_size; ++s)
    if (!wait_at_least(counter(peer_ptrs, rank, layout.combine_arrive, s), target, timeout_ns, error,
                       kStepCombineReceive, s))
      return;
}

}  // namespace

void* ep_ipc_malloc(int64_t num_bytes) {
  void* ptr = nullptr;
  DSO_CUDA_CHECK(cudaMalloc(&ptr, num_bytes));
  // NOTE: counters must start at 0 on every rank before any peer adds to them; the host exchanges
  // handles (a collective) only after this memset has completed.
  DSO_CUDA_CHECK(cudaMemset(ptr, 0, num_bytes));
  DSO_CUDA_CHECK(cudaDeviceSynchronize());
  return ptr;
}

void ep_ipc_free(void* ptr) { cudaFree(ptr); }  // a destructor path: never throws

void ep_ipc_get_handle(void* ptr, uint8_t* handle_out) {
  cudaIpcMemHandle_t handle;
  DSO_CUDA_CHECK(cudaIpcGetMemHandle(&handle, ptr));
  memcpy(handle_out, &handle, sizeof(handle));
}

void* ep_ipc_open(const uint8_t* handle) {
  cudaIpcMemHandle_t h;
  memcpy(&h, handle, sizeof(h));
  void* ptr = nullptr;
  DSO_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess));
  return ptr;
}

void ep_ipc_close(void* ptr) { cudaIpcCloseMemHandle(ptr); }  // a destructor path: never throws

void launch_ep_ipc_barrier(const int64_t* peer_ptrs, const EpIpcLayout& layout, int rank, int world_size,
                           int64_t timeout_ns, int* error, int step, cudaStream_t stream) {
  sm90_ep_ipc_barrier_kernel<<<1, 32, 0, stream>>>(peer_ptrs, layout, rank, world_size, timeout_ns, error, step);
  DSO_LAUNCH_CHECK();
}

void launch_ep_ipc_dispatch_send(const void* x, int64_t row_bytes, const float* x_scales, int num_groups,
                                 const int64_t* topk_idx, const float* topk_weights, int topk, const int* slot_of,
                                 const int* counts, int64_t num_tokens, const int64_t* peer_ptrs,
                                 const EpIpcLayout& layout, int rank, int world_size, int num_local_experts,
                                 int64_t max_tokens, const int* error, cudaStream_t stream) {
  if (row_bytes % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0)
    throw std::runtime_error("deepseek_ops: ep ipc dispatch needs 16-byte aligned rows");
  if (topk > kThreads) throw std::runtime_error("deepseek_ops: ep ipc dispatch supports topk <= 256");
  // NOTE: always kEpIpcSendBlocks blocks, even with no tokens: receivers count this many arrivals.
  sm90_ep_ipc_dispatch_send_kernel<<<kEpIpcSendBlocks, kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(x), row_bytes, x_scales, num_groups, topk_idx, topk_weights, topk, slot_of, counts,
      num_tokens, peer_ptrs, layout, rank, world_size, num_local_experts, max_tokens, error);
  DSO_LAUNCH_CHECK();
}

void launch_ep_ipc_dispatch_wait(const int64_t* peer_ptrs, const EpIpcLayout& layout, int rank, int world_size,
                                 int64_t max_tokens, int topk, int64_t timeout_ns, int* error, int* recv_counts,
                                 cudaStream_t stream) {
  sm90_ep_ipc_dispatch_wait_kernel<<<world_size, kThreads, 0, stream>>>(peer_ptrs, layout, rank, max_tokens, topk,
                                                                        timeout_ns, error, recv_counts);
  DSO_LAUNCH_CHECK();
}

void launch_ep_ipc_combine_send(const void* y, int64_t hidden, const int* recv_row_of, int topk,
                                const int* recv_counts, const int64_t* peer_ptrs, const EpIpcLayout& layout, int rank,
                                int world_size, int64_t max_tokens, const int* error, cudaStream_t stream) {
  if (hidden % 8 != 0 || reinterpret_cast<uintptr_t>(y) % 16 != 0)
    throw std::runtime_error("deepseek_ops: ep ipc combine needs a 16-byte aligned y and hidden % 8 == 0");
  sm90_ep_ipc_combine_send_kernel<<<kEpIpcCombineBlocks, kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(y), hidden * 2, recv_row_of, topk, recv_counts, peer_ptrs, layout, rank, world_size,
      max_tokens, error);
  DSO_LAUNCH_CHECK();
}

void launch_ep_ipc_combine_wait(const int64_t* peer_ptrs, const EpIpcLayout& layout, int rank, int world_size,
                                int64_t timeout_ns, int* error, cudaStream_t stream) {
  sm90_ep_ipc_combine_wait_kernel<<<1, 32, 0, stream>>>(peer_ptrs, layout, rank, world_size, timeout_ns, error);
  DSO_LAUNCH_CHECK();
}

}  // namespace dso
