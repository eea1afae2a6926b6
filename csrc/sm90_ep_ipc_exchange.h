// Launchers of the intranode expert-parallel kernels (csrc/sm90_ep_ipc_exchange.cu): every rank
// pushes rows into its peers' symmetric buffers (opened with cudaIpcOpenMemHandle) and raises their
// arrival counters with system-scope release adds; receivers acquire. Every wait is bounded: past timeout_ns the
// kernel stores its step code into `error` and returns (the host raises), never hangs.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace dso {

// Byte offsets of the fields inside each rank's symmetric buffer (one layout on every rank; the
// Python side, deepseek_ops/ep/_ipc.py, computes them). Counters are int32 [world_size], indexed by
// the peer that raises them; receive fields are [world_size * max_tokens, ...] (source-major).
struct EpIpcLayout {
  int64_t barrier, arrive, combine_arrive, counts;
  int64_t rounds;  // int32 [kEpIpcNumRounds]: this rank's own round counters (no peer touches them)
  int64_t x, scales, idx, weights, src;
  int64_t combine;  // bf16 [max_tokens * topk, hidden]: one row per (token, k) pair of this rank
};
constexpr int kEpIpcLayoutFields = 11;

// Rounds are counted on the device, so that a CUDA graph replaying the kernels waits for the right
// arrivals: every rank runs the same sequence of steps, so the counters stay in step across ranks.
enum EpIpcRound : int { kRoundBarrier = 0, kRoundDispatch = 1, kRoundCombine = 2 };
constexpr int kEpIpcNumRounds = 3;

// Sender grids are fixed so that every receiver knows how many release adds a round brings.
constexpr int kEpIpcSendBlocks = 132;
constexpr int kEpIpcCombineBlocks = 132;

// A wait that timed out writes ep_ipc_error_code(step, the rank it waited for) into `error`; the host
// decodes it (deepseek_ops/ep/_ipc.py) to name both.
enum EpIpcStep : int { kStepDispatchBarrier = 1, kStepDispatchReceive = 2, kStepCombineBarrier = 3,
                       kStepCombineReceive = 4 };
constexpr int kEpIpcNumStepCodes = 16;
__host__ __device__ constexpr int ep_ipc_error_code(int step, int peer) { return step + kEpIpcNumStepCodes * peer; }

// The symmetric buffer: a dedicated zeroed cudaMalloc (an IPC handle names a whole allocation).
void* ep_ipc_malloc(int64_t num_bytes);
void ep_ipc_free(void* ptr);
constexpr int kEpIpcHandleBytes = sizeof(cudaIpcMemHandle_t);
void ep_ipc_get_handle(void* ptr, uint8_t* handle_out);
// Maps a peer's buffer (another process; the same or a peer GPU) into this process.
void* ep_ipc_open(const uint8_t* handle);
void ep_ipc_close(void* ptr);

// Each rank adds 1 to its slot of every peer's barrier counter, then waits until all of its own
// counters reach the number of barriers so far (its barrier round, counted here).
void launch_ep_ipc_barrier(const int64_t* peer_ptrs, const EpIpcLayout& layout, int rank, int world_size,
                           int64_t timeout_ns, int* error, int step, cudaStream_t stream);

// Pushes token t to rank d at receive row (rank * max_tokens + slot_of[t, d]) when slot_of >= 0: its
// x row, scales, topk_idx made local to d (-1 for experts elsewhere), weights and t. Then every block
// raises every peer's arrival counter; block 0 first stores counts[d] (rows sent to d) there. Block
// 0 also counts this rank's dispatch round.
void launch_ep_ipc_dispatch_send(const void* x, int64_t row_bytes, const float* x_scales, int num_groups,
                                 const int64_t* topk_idx, const float* topk_weights, int topk, const int* slot_of,
                                 const int* counts, int64_t num_tokens, const int64_t* peer_ptrs,
                                 const EpIpcLayout& layout, int rank, int world_size, int num_local_experts,
                                 int64_t max_tokens, const int* error, cudaStream_t stream);

// Waits for every source's kEpIpcSendBlocks arrivals of this round (target = dispatch round * blocks),
// copies the counts to recv_counts [world_size] and marks the unused receive rows (-1 experts).
void launch_ep_ipc_dispatch_wait(const int64_t* peer_ptrs, const EpIpcLayout& layout, int rank, int world_size,
                                 int64_t max_tokens, int topk, int64_t timeout_ns, int* error, int* recv_counts,
                                 cudaStream_t stream);

// Sends y[recv_row_of[i, k]] home: to rank (i / max_tokens)'s combine field at row src[i] * topk + k.
// Block 0 counts this rank's combine round.
void launch_ep_ipc_combine_send(const void* y, int64_t hidden, const int* recv_row_of, int topk,
                                const int* recv_counts, const int64_t* peer_ptrs, const EpIpcLayout& layout, int rank,
                                int world_size, int64_t max_tokens, const int* error, cudaStream_t stream);

// Waits for every peer's kEpIpcCombineBlocks arrivals of this round.
void launch_ep_ipc_combine_wait(const int64_t* peer_ptrs, const EpIpcLayout& layout, int rank, int world_size,
                                int64_t timeout_ns, int* error, cudaStream_t stream);

}  // namespace dso
