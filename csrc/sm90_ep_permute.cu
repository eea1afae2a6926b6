// One-GPU expert parallelism: layout counting, the dispatch permutation into the grouped GEMM's
// per-expert contiguous layout, and the weighted un-permute combine. No host sync anywhere: every
// size the kernels need is computed on the device, so the whole dispatch fits in a CUDA graph.
//
// Dispatch is two launches, chained by programmatic dependent launch (PDL: rows starts while count
// runs and waits on it with griddepcontrol.wait, so no launch latency and no ramp-up sits between
// them):
//   count   blocks of kTokensPerCountBlock tokens rank each (token, k) pair among the pairs of the
//           same expert in the block, in (token, k) order (each warp ranks a contiguous run of the
//           block's pairs with __match_any_sync, then the runs are offset by the earlier warps'
//           counts), and write the block's per-expert counts. The last block to finish (a ticket
//           taken with an acquire-release atomic) turns every block's counts into each block's first
//           slot per expert and each expert's padded group start (the deterministic order makes the
//           output bitwise reproducible).
//   rows    one block per token holds the token's row (+ its scales) in registers, loaded before
//           the wait on count (overlapping it), and stores it to each of its rows; the blocks also
//           write m_indices = -1 (and weight 0) on the rows no pair landed on.
// rows' griddepcontrol.wait returns once the whole count grid has completed, the last block's scan
// included, and its writes are visible: rows reads the workspace only after it.
// NOTE (PDL safety): count releases its dependents only after its own wait, so when rows starts,
// every kernel before count (the producers of x, x_scales, topk_idx, topk_weights) has completed:
// rows may read those inputs before its wait (it reads them only for its tokens, so only when count
// runs), never the workspace or its outputs.
#include <algorithm>

#include <cuda_bf16.h>

#include "atomic.cuh"
#include "common.h"
#include "sm90_ep_permute.h"
#include "griddep.cuh"
#include "launch_pdl.h"
#include "memory.cuh"
#include "special_registers.cuh"

namespace dso {
namespace {

constexpr int kMaxTopk = 32;
// NOTE: 128 tokens a count block (32 blocks for 4096 tokens). Count's time is mostly fixed latency
// (the wait, one topk_idx round trip, the ticket's release and round trip, the scan's round trip to
// L2, the grid's completion); the ranking proper is 4 __match_any_sync steps a warp at top-8 and
// would shrink by only ~2 steps with blocks half as large, while the last block's scan would load
// twice the counts (64 a thread at 256 experts: a second batch of kScanUnroll, one more L2 round
// trip) and twice as many blocks would contend for the ticket. Larger blocks lengthen the ranking
// and leave SMs idle. At 4096 tokens the scan is one batch of kScanUnroll loads per expert.
constexpr int kTokensPerCountBlock = 128;
constexpr int kCountThreads = 256;
constexpr int kMaxCountWarps = kCountThreads / 32;
constexpr int kCountStageUnroll = 4;          // topk_idx loads in flight per thread while staging
constexpr int kCountSmemBytes = 48 * 1024;    // no opt-in: the default dynamic shared memory limit
constexpr int kScanUnroll = 32;               // block counts in flight per thread in the last block's scan
constexpr int kNumTicketSlots = 1 << 16;
// 16-byte chunks of the row a rows thread holds in registers: 8 for rows up to kShortRowBytes (an
// FP8 row of hidden 7168: 64-thread blocks, so more tokens' rows are resident and loaded while count
// runs), else 4 (for bf16 rows 8 measured slower; benchmarks/RESULTS.md).
constexpr int kShortRowChunks = 8;
constexpr int kLongRowChunks = 4;
constexpr int64_t kShortRowBytes = 8192;
constexpr int kMaxRowThreads = 512;           // rows up to 32 KB (+ scales) in one pass; longer ones loop
constexpr int kPadRowsPerBlock = 2048;        // the rows grid has at least num_rows / this blocks
constexpr int kCombineThreads = 256;
constexpr int kLayoutThreads = 256;

static_assert(kMaxTopk <= 32, "the rows kernel resolves the pairs of a token with its first warp");
static_assert(kCountThreads % 32 == 0 && kCountThreads / 32 <= 32, "scan: one warp scans the warp totals");
static_assert(kTokensPerCountBlock >= kCountThreads / 32, "the scan keeps its warp totals in the staged pairs' smem");
static_assert((kNumTicketSlots & (kNumTicketSlots - 1)) == 0, "ticket slots: a power of two");

// The count grids' tickets. Static storage, so zero when the module loads (the first call finds 0);
// the block drawing a grid's last ticket puts its slot back to 0 (each call leaves it as it found
// it, hence CUDA-graph replays and reruns need no memset). A grid takes the slot of its %gridid,
// which differs between grids running at the same time: dispatches on other streams or in other
// graphs use other slots. Two grids share a slot only when kNumTicketSlots grids were launched
// between them while the first was still taking tickets (normally a few microseconds).
__device__ int g_count_tickets[kNumTicketSlots];

__device__ __forceinline__ int expert_of(int64_t v, int num_experts) {
  return (v >= 0 && v < num_experts) ? static_cast<int>(v) : -1;
}

__global__ void __launch_bounds__(kLayoutThreads) sm90_ep_dispatch_layout_kernel(
    const int64_t* __restrict__ topk_idx, int64_t num_tokens, int topk, int num_experts, int num_ranks,
    int* __restrict__ num_tokens_per_rank, int* __restrict__ num_tokens_per_expert,
    bool* __restrict__ is_token_in_rank) {
  extern __shared__ int smem_layout_counts[];  // [num_experts] then [num_ranks]
  int* smem_expert = smem_layout_counts;
  int* smem_rank = smem_layout_counts + num_experts;
  for (int i = threadIdx.x; i < num_experts + num_ranks; i += blockDim.x) smem_layout_counts[i] = 0;
  __syncthreads();

  const int64_t token_idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token_idx < num_tokens) {
    const int experts_per_rank = num_experts / num_ranks;
    const int64_t* row = topk_idx + token_idx * topk;
    for (int k = 0; k < topk; ++k) {
      const int e = expert_of(row[k], num_experts);
      if (e < 0) continue;
      atomicAdd(&smem_expert[e], 1);
      const int rank_idx = e / experts_per_rank;
      bool seen = false;  // a token counts once per rank however many of its experts live there
      for (int j = 0; j < k; ++j) {
        const int other = expert_of(row[j], num_experts);
        seen |= other >= 0 && other / experts_per_rank == rank_idx;
      }
      if (!seen) {
        atomicAdd(&smem_rank[rank_idx], 1);
        is_token_in_rank[token_idx * num_ranks + rank_idx] = true;
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_experts; i += blockDim.x)
    if (smem_expert[i] != 0) atomicAdd(&num_tokens_per_expert[i], smem_expert[i]);
  for (int i = threadIdx.x; i < num_ranks; i += blockDim.x)
    if (smem_rank[i] != 0) atomicAdd(&num_tokens_per_rank[i], smem_rank[i]);
}

// The last count block's scan (every thread of the block): block_counts [num_blocks, E] ->
// block_offsets [num_blocks, E], each block's first slot within each expert (exclusive over the
// blocks); expert_start [E + 1] the first row of each expert's padded group (and the total);
// num_tokens_per_expert [E] the unpadded counts. Shared scratch: smem_padded [E], smem_warp_total
// [kCountThreads / 32]. NOTE: block_counts is written by this grid: plain (coherent) loads, never the
// read-only path (no const __restrict__ on it).
__device__ __forceinline__ void scan_block_counts(const int* block_counts, int num_blocks, int num_experts,
                                                  int alignment, int* smem_padded, int* smem_warp_total,
                                                  int* block_offsets, int* expert_start,
                                                  int* num_tokens_per_expert) {
  for (int e = threadIdx.x; e < num_experts; e += kCountThreads) {
    int running = 0;
    for (int b0 = 0; b0 < num_blocks; b0 += kScanUnroll) {
      int counts[kScanUnroll];  // loads batched ahead of the dependent sum: latency, not bandwidth, bound
#pragma unroll
      for (int i = 0; i < kScanUnroll; ++i)
        counts[i] = b0 + i < num_blocks ? block_counts[static_cast<int64_t>(b0 + i) * num_experts + e] : 0;
#pragma unroll
      for (int i = 0; i < kScanUnroll; ++i) {
        if (b0 + i < num_blocks) block_offsets[static_cast<int64_t>(b0 + i) * num_experts + e] = running;
        running += counts[i];
      }
    }
    num_tokens_per_expert[e] = running;
    smem_padded[e] = (running + alignment - 1) / alignment * alignment;
  }
  __syncthreads();

  // Exclusive scan of the padded sizes: each thread sums a contiguous run of experts, the runs are
  // scanned across the warp (shuffles) and across the warps (their totals).
  const int per_thread = (num_experts + kCountThreads - 1) / kCountThreads;
  const int begin = min(static_cast<int>(threadIdx.x) * per_thread, num_experts);
  const int end = min(begin + per_thread, num_experts);
  int sum = 0;
  for (int e = begin; e < end; ++e) sum += smem_padded[e];
  const int lane_idx = threadIdx.x % 32, warp_idx = threadIdx.x / 32;
  int inclusive = sum;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane_idx >= d) inclusive += other;
  }
  if (lane_idx == 31) smem_warp_total[warp_idx] = inclusive;
  __syncthreads();
  int start = inclusive - sum;
  for (int w = 0; w < warp_idx; ++w) start += smem_warp_total[w];
  for (int e = begin; e < end; ++e) {
    expert_start[e] = start;
    start += smem_padded[e];
  }
  if (threadIdx.x == kCountThreads - 1) expert_start[num_experts] = start;  // the last run ends at the total
}

// pair_rank[pair] = rank of the pair among the block's pairs of its expert, in (token, k) order;
// block_counts [num_blocks, E] the block's per-expert counts. Warp w < num_rank_warps ranks pairs
// [w * pairs_per_warp, (w + 1) * pairs_per_warp) of the block into its own count row. The last
// block to finish then scans the counts (scan_block_counts).
__global__ void __launch_bounds__(kCountThreads) sm90_ep_count_kernel(
    const int64_t* __restrict__ topk_idx, int64_t num_pairs, int topk, int num_experts, int alignment,
    int num_rank_warps, int pairs_per_warp, int* __restrict__ pair_rank, int* __restrict__ block_counts,
    int* __restrict__ block_offsets, int* __restrict__ expert_start, int* __restrict__ num_tokens_per_expert) {
  // NOTE: dynamic shared memory only (none static): the host's budget is the whole 48 KB.
  extern __shared__ int smem_count_block[];  // [num_rank_warps][num_experts] counts, then the block's pairs
  int* smem_warp_count = smem_count_block;
  int* smem_pair = smem_count_block + num_rank_warps * num_experts;
  const int64_t first_pair = static_cast<int64_t>(blockIdx.x) * kTokensPerCountBlock * topk;
  const int num_block_pairs =
      static_cast<int>(min(static_cast<int64_t>(kTokensPerCountBlock) * topk, num_pairs - first_pair));
  for (int i = threadIdx.x; i < num_rank_warps * num_experts; i += kCountThreads) smem_warp_count[i] = 0;

  ptx::griddep_wait();  // topk_idx may come from the previous kernel; the workspace may be in use by it
  // NOTE: released right after the wait, so that the rows grid becomes resident and loads its rows
  // while this grid runs; not before it: see the file header (rows reads the inputs before its wait).
  ptx::griddep_launch_dependents();
  // The whole block stages the experts (loads batched, one DRAM round trip for 1024 pairs): the
  // ranking warps then never wait on DRAM.
  for (int base = 0; base < num_block_pairs; base += kCountThreads * kCountStageUnroll) {
    int64_t v[kCountStageUnroll];
#pragma unroll
    for (int j = 0; j < kCountStageUnroll; ++j) {
      const int i = base + j * kCountThreads + threadIdx.x;
      v[j] = i < num_block_pairs ? topk_idx[first_pair + i] : -1;
    }
#pragma unroll
    for (int j = 0; j < kCountStageUnroll; ++j) {
      const int i = base + j * kCountThreads + threadIdx.x;
      if (i < num_block_pairs) smem_pair[i] = expert_of(v[j], num_experts);
    }
  }
  __syncthreads();

  // NOTE: each warp walks its pairs in order so that ranks follow (token, k) order exactly; atomics
  // would give a valid but run-dependent permutation. A ranked pair is packed as rank << 16 | expert.
  const int warp_idx = threadIdx.x / 32, lane_idx = threadIdx.x % 32;
  if (warp_idx < num_rank_warps) {
    int* count = smem_warp_count + warp_idx * num_experts;
    const int begin = warp_idx * pairs_per_warp, end = min(begin + pairs_per_warp, num_block_pairs);
    for (int base = begin; base < end; base += 32) {
      const int i = base + lane_idx;
      const int e = i < end ? smem_pair[i] : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, e);
      const int num_before = __popc(peers & ((1u << lane_idx) - 1u));
      if (e >= 0) smem_pair[i] = ((count[e] + num_before) << 16) | e;
      __syncwarp();
      if (e >= 0 && num_before == 0) count[e] += __popc(peers);
      __syncwarp();
    }
  }
  __syncthreads();

  // Each warp's counts become the rank of its first pair per expert (exclusive over the warps).
  for (int e = threadIdx.x; e < num_experts; e += kCountThreads) {
    int running = 0;
    for (int w = 0; w < num_rank_warps; ++w) {
      const int c = smem_warp_count[w * num_experts + e];
      smem_warp_count[w * num_experts + e] = running;
      running += c;
    }
    block_counts[static_cast<int64_t>(blockIdx.x) * num_experts + e] = running;
  }
  __syncthreads();

  // NOTE (last block): the ticket's release covers the block's counts (every thread's, ordered before
  // it by the barrier above); the last block's acquire, then the barrier below, make every block's
  // counts visible to all its threads. The pair ranks are read only by rows, after its wait.
  bool is_last = false;
  if (threadIdx.x == 0) {
    int* ticket = g_count_tickets + (ptx::read_gridid() & (kNumTicketSlots - 1));
    is_last = ptx::atom_add_acq_rel_gpu(ticket, 1) == static_cast<int>(gridDim.x) - 1;
    if (is_last) *ticket = 0;  // every block has drawn: the slot is free for the next grid
  }
  for (int i = threadIdx.x; i < num_block_pairs; i += kCountThreads) {  // overlaps the ticket's round trip
    const int packed = smem_pair[i];  // -1: no expert
    if (packed >= 0)
      pair_rank[first_pair + i] = (packed >> 16) + smem_warp_count[(i / pairs_per_warp) * num_experts + (packed & 0xffff)];
  }
  // The barrier hands thread 0's draw to the block; past it the shared counts and pairs are free.
  if (__syncthreads_or(is_last))
    scan_block_counts(block_counts, static_cast<int>(gridDim.x), num_experts, alignment, smem_warp_count,
                      smem_pair, block_offsets, expert_start, num_tokens_per_expert);
}

// One block per token (blocks past num_tokens only fill padding). Thread t holds the 16-byte chunks
// t + j * blockDim.x (j < kChunks) of each pass over the x row and, with vector_scales
// (num_groups % 4 == 0), chunk t of the scale row.
template <int kChunks>
__global__ void __launch_bounds__(kMaxRowThreads) sm90_ep_permute_rows_kernel(
    const uint8_t* __restrict__ x, int64_t row_bytes, const float* __restrict__ x_scales, int num_groups,
    bool vector_scales, const float* __restrict__ topk_weights, const int64_t* __restrict__ topk_idx,
    int64_t num_tokens, int topk, int num_experts, int64_t num_rows, const int* __restrict__ pair_rank,
    const int* __restrict__ block_offsets, const int* __restrict__ expert_start,
    const int* __restrict__ num_tokens_per_expert, uint8_t* __restrict__ recv_x, float* __restrict__ recv_scales,
    float* __restrict__ recv_weights, int* __restrict__ m_indices, int* __restrict__ row_of) {
  __shared__ int64_t smem_rows[kMaxTopk];
  const int64_t token_idx = blockIdx.x;
  const bool has_token = token_idx < num_tokens;  // uniform over the block
  const int num_threads = blockDim.x;
  const int thread_idx = threadIdx.x;
  const int row_chunks = static_cast<int>(row_bytes / 16);  // the host keeps rows under 2 GiB
  const int scale_chunks = vector_scales ? num_groups / 4 : 0;
  const int64_t scale_bytes = static_cast<int64_t>(num_groups) * 4;
  const uint8_t* src_x = x + token_idx * row_bytes;
  const uint8_t* src_scales = reinterpret_cast<const uint8_t*>(x_scales) + token_idx * scale_bytes;
  uint8_t* recv_scale_bytes = reinterpret_cast<uint8_t*>(recv_scales);

  // Inputs only before the wait (file header): the first pass of the row, the scales, the routing.
  int4 v[kChunks];
  auto load_pass = [&](int first_chunk) {
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int c = first_chunk + j * num_threads + thread_idx;
      if (c < row_chunks) v[j] = ptx::ld_nc_na_v4(src_x + c * 16);
    }
  };
  int4 s = make_int4(0, 0, 0, 0);
  const int64_t pair_idx = token_idx * topk + thread_idx;
  const bool is_pair = has_token && thread_idx < topk;
  int e = -1;
  float weight = 0.0f;
  if (has_token) {
    load_pass(0);
    if (thread_idx < scale_chunks) s = ptx::ld_nc_na_v4(src_scales + thread_idx * 16);
  }
  if (is_pair) {
    e = expert_of(topk_idx[pair_idx], num_experts);
    if (topk_weights != nullptr) weight = topk_weights[pair_idx];
  }
  ptx::griddep_wait();

  if (has_token) {
    if (is_pair) {
      int64_t row = -1;
      if (e >= 0) {
        const int64_t block_idx = token_idx / kTokensPerCountBlock;
        row = static_cast<int64_t>(expert_start[e]) + block_offsets[block_idx * num_experts + e] + pair_rank[pair_idx];
        row = row < num_rows ? row : -1;  // never past the buffer (the host sizes it so this cannot happen)
      }
      if (row >= 0) {
        m_indices[row] = e;
        if (recv_weights != nullptr) recv_weights[row] = weight;
      }
      row_of[pair_idx] = static_cast<int>(row);
      smem_rows[thread_idx] = row;
    }
    __syncthreads();

    // Every destination row is written once and not read again here: streaming (evict-first) stores.
    for (int first_chunk = 0;;) {
      for (int k = 0; k < topk; ++k) {
        const int64_t row = smem_rows[k];
        if (row < 0) continue;
        uint8_t* dst = recv_x + row * row_bytes + (first_chunk + thread_idx) * 16;
#pragma unroll
        for (int j = 0; j < kChunks; ++j)
          if (first_chunk + j * num_threads + thread_idx < row_chunks) ptx::st_cs_v4(dst + j * num_threads * 16, v[j]);
      }
      first_chunk += num_threads * kChunks;
      if (first_chunk >= row_chunks) break;
      load_pass(first_chunk);
    }
    for (int c = thread_idx; c < scale_chunks; c += num_threads) {
      if (c != thread_idx) s = ptx::ld_nc_na_v4(src_scales + c * 16);  // scale rows over blockDim.x chunks
      for (int k = 0; k < topk; ++k) {
        const int64_t row = smem_rows[k];
        if (row >= 0) ptx::st_cs_v4(recv_scale_bytes + row * scale_bytes + c * 16, s);
      }
    }
    if (!vector_scales) {  // scale rows that are not whole 16-byte chunks
      for (int g = thread_idx; g < num_groups; g += num_threads) {
        const float scale = x_scales[token_idx * num_groups + g];
        for (int k = 0; k < topk; ++k) {
          const int64_t row = smem_rows[k];
          if (row >= 0) recv_scales[row * num_groups + g] = scale;
        }
      }
    }
  }

  // Padding: m_indices -1 (weight 0) on each expert's group past its pairs, then past the last group.
  for (int expert_idx = blockIdx.x; expert_idx < num_experts; expert_idx += gridDim.x) {
    const int64_t begin = static_cast<int64_t>(expert_start[expert_idx]) + num_tokens_per_expert[expert_idx];
    const int64_t end = min(static_cast<int64_t>(expert_start[expert_idx + 1]), num_rows);
    for (int64_t row = begin + threadIdx.x; row < end; row += num_threads) {
      m_indices[row] = -1;
      if (recv_weights != nullptr) recv_weights[row] = 0.0f;
    }
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * num_threads;
  for (int64_t row = expert_start[num_experts] + static_cast<int64_t>(blockIdx.x) * num_threads + threadIdx.x;
       row < num_rows; row += stride) {
    m_indices[row] = -1;
    if (recv_weights != nullptr) recv_weights[row] = 0.0f;
  }
}

__device__ __forceinline__ void accumulate_bf16x2(float* acc, uint32_t packed, float weight) {
  // bf16 -> fp32 is exact (a shift); mul and add stay separate roundings, as in the reference.
  const float lo = __uint_as_float(packed << 16), hi = __uint_as_float(packed & 0xffff0000u);
  acc[0] = __fadd_rn(acc[0], __fmul_rn(weight, lo));
  acc[1] = __fadd_rn(acc[1], __fmul_rn(weight, hi));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__global__ void __launch_bounds__(kCombineThreads) sm90_bf16_ep_combine_kernel(const uint8_t* __restrict__ y,
                                                                                const int* __restrict__ row_of,
                                                                                const float* __restrict__ topk_weights,
                                                                                int topk, int64_t hidden,
                                                                                int64_t num_rows,
                                                                                uint8_t* __restrict__ out) {
  __shared__ int smem_rows[kMaxTopk];
  __shared__ float smem_weights[kMaxTopk];
  const int64_t token_idx = blockIdx.x;
  if (threadIdx.x < topk) {
    smem_rows[threadIdx.x] = row_of[token_idx * topk + threadIdx.x];
    smem_weights[threadIdx.x] = topk_weights[token_idx * topk + threadIdx.x];
  }
  __syncthreads();

  const int64_t row_bytes = hidden * 2;
  for (int64_t chunk = threadIdx.x; chunk < hidden / 8; chunk += kCombineThreads) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < topk; ++k) {
      const int row = smem_rows[k];
      if (row < 0 || row >= num_rows) continue;  // a bad row is skipped like -1: never a read past y
      const int4 v = ptx::ld_nc_na_v4(y + static_cast<int64_t>(row) * row_bytes + chunk * 16);
      const float w = smem_weights[k];
      accumulate_bf16x2(acc + 0, static_cast<uint32_t>(v.x), w);
      accumulate_bf16x2(acc + 2, static_cast<uint32_t>(v.y), w);
      accumulate_bf16x2(acc + 4, static_cast<uint32_t>(v.z), w);
      accumulate_bf16x2(acc + 6, static_cast<uint32_t>(v.w), w);
    }
    const int4 packed = make_int4(static_cast<int>(pack_bf16x2(acc[0], acc[1])), static_cast<int>(pack_bf16x2(acc[2], acc[3])),
                                  static_cast<int>(pack_bf16x2(acc[4], acc[5])), static_cast<int>(pack_bf16x2(acc[6], acc[7])));
    *reinterpret_cast<int4*>(out + token_idx * row_bytes + chunk * 16) = packed;
  }
}

// At least one: with no tokens, count's single block still writes the zero counts and group starts.
int64_t num_count_blocks(int64_t num_tokens) {
  return std::max<int64_t>(1, ceil_div<int64_t>(num_tokens, kTokensPerCountBlock));
}

}  // namespace

void launch_ep_dispatch_layout(const int64_t* topk_idx, int64_t num_tokens, int topk, int num_experts, int num_ranks,
                               int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
                               cudaStream_t stream) {
  DSO_CUDA_CHECK(cudaMemsetAsync(num_tokens_per_rank, 0, sizeof(int) * num_ranks, stream));
  DSO_CUDA_CHECK(cudaMemsetAsync(num_tokens_per_expert, 0, sizeof(int) * num_experts, stream));
  if (num_tokens == 0) return;
  DSO_CUDA_CHECK(cudaMemsetAsync(is_token_in_rank, 0, sizeof(bool) * num_tokens * num_ranks, stream));
  const size_t smem = sizeof(int) * (num_experts + num_ranks);
  sm90_ep_dispatch_layout_kernel<<<ceil_div<int64_t>(num_tokens, kLayoutThreads), kLayoutThreads, smem, stream>>>(
      topk_idx, num_tokens, topk, num_experts, num_ranks, num_tokens_per_rank, num_tokens_per_expert,
      is_token_in_rank);
  DSO_LAUNCH_CHECK();
}

int64_t ep_permute_workspace_ints(int64_t num_tokens, int topk, int num_experts) {
  // pair_rank, block_counts, block_offsets, expert_start
  return num_tokens * topk + 2 * num_count_blocks(num_tokens) * num_experts + num_experts + 1;
}

void launch_ep_permute(const void* x, int64_t row_bytes, const float* x_scales, int num_groups,
                       const float* topk_weights, const int64_t* topk_idx, int64_t num_tokens, int topk,
                       int num_experts, int alignment, int64_t num_rows, void* recv_x, float* recv_scales,
                       float* recv_weights, int* m_indices, int* row_of, int* num_tokens_per_expert, int* workspace,
                       cudaStream_t stream) {
  if (topk > kMaxTopk) throw std::runtime_error("deepseek_ops: ep_permute supports topk <= 32");
  if (row_bytes % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(recv_x) % 16 != 0)
    throw std::runtime_error("deepseek_ops: ep_permute needs 16-byte aligned x and rows of a multiple of 16 bytes");
  if (row_bytes + 4 * static_cast<int64_t>(num_groups) >= (int64_t{1} << 31))
    throw std::runtime_error("deepseek_ops: ep_permute needs rows (+ scales) under 2 GiB");
  const int64_t num_blocks = num_count_blocks(num_tokens);
  int* pair_rank = workspace;
  int* block_counts = pair_rank + num_tokens * topk;
  int* block_offsets = block_counts + num_blocks * num_experts;
  int* expert_start = block_offsets + num_blocks * num_experts;

  const int64_t max_block_pairs = std::min<int64_t>(num_tokens, kTokensPerCountBlock) * topk;
  // The staged pairs (also the last block's warp totals: at least kCountThreads / 32 ints) and one
  // per-expert count row per ranking warp (also the last block's padded group sizes).
  const int64_t stage_smem = sizeof(int) * static_cast<int64_t>(kTokensPerCountBlock) * std::max(topk, 1);
  const int64_t warp_count_smem = sizeof(int) * static_cast<int64_t>(std::max(num_experts, 1));
  if (stage_smem + warp_count_smem > kCountSmemBytes)
    throw std::runtime_error("deepseek_ops: ep_permute supports at most ~8000 experts");
  // As many ranking warps as their per-expert count rows fit in shared memory (8 for 256 experts):
  // each walks a contiguous run of the block's pairs, 32 a step.
  const int num_rank_warps = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(
      {kMaxCountWarps, (kCountSmemBytes - stage_smem) / warp_count_smem, ceil_div<int64_t>(max_block_pairs, 32)})));
  const int pairs_per_warp = static_cast<int>(align_up<int64_t>(ceil_div<int64_t>(max_block_pairs, num_rank_warps), 32));
  const size_t count_smem = stage_smem + warp_count_smem * num_rank_warps;  // also the last block's scan scratch
  launch_with_pdl(sm90_ep_count_kernel, dim3(static_cast<unsigned>(num_blocks)), kCountThreads, count_smem, stream,
                  topk_idx, num_tokens * topk, topk, num_experts, alignment, num_rank_warps, pairs_per_warp,
                  pair_rank, block_counts, block_offsets, expert_start, num_tokens_per_expert);

  const int64_t rows_blocks = std::max<int64_t>(num_tokens, ceil_div<int64_t>(num_rows, kPadRowsPerBlock));
  if (rows_blocks > 0) {
    // Scales ride in the row's 16-byte chunks when their rows are whole chunks (1x128 groups of
    // hidden % 512 == 0, e.g. DeepSeek-V3's 56), else a scalar loop stores them.
    const bool vector_scales = x_scales != nullptr && num_groups % 4 == 0 &&
                               reinterpret_cast<uintptr_t>(x_scales) % 16 == 0 &&
                               reinterpret_cast<uintptr_t>(recv_scales) % 16 == 0;
    const bool short_row = row_bytes <= kShortRowBytes;
    const int chunks = short_row ? kShortRowChunks : kLongRowChunks;
    const int num_threads = static_cast<int>(std::clamp<int64_t>(
        align_up<int64_t>(ceil_div<int64_t>(row_bytes / 16, chunks), 32), 32, kMaxRowThreads));
    launch_with_pdl(short_row ? sm90_ep_permute_rows_kernel<kShortRowChunks> : sm90_ep_permute_rows_kernel<kLongRowChunks>,
                    dim3(static_cast<unsigned>(rows_blocks)), num_threads, 0, stream,
                    static_cast<const uint8_t*>(x), row_bytes, x_scales, num_groups, vector_scales, topk_weights,
                    topk_idx, num_tokens, topk, num_experts, num_rows, pair_rank, block_offsets, expert_start,
                    num_tokens_per_expert, static_cast<uint8_t*>(recv_x), recv_scales, recv_weights, m_indices,
                    row_of);
  }
}

void launch_ep_combine(const void* y, int64_t num_rows, const int* row_of, const float* topk_weights,
                       int64_t num_tokens, int topk, int64_t hidden, void* out, cudaStream_t stream) {
  if (topk > kMaxTopk) throw std::runtime_error("deepseek_ops: ep_combine supports topk <= 32");
  if (hidden % 8 != 0 || reinterpret_cast<uintptr_t>(y) % 16 != 0)
    throw std::runtime_error("deepseek_ops: ep_combine needs a 16-byte aligned y and hidden % 8 == 0");
  if (num_tokens == 0 || hidden == 0) return;
  sm90_bf16_ep_combine_kernel<<<num_tokens, kCombineThreads, 0, stream>>>(
      static_cast<const uint8_t*>(y), row_of, topk_weights, topk, hidden, num_rows, static_cast<uint8_t*>(out));
  DSO_LAUNCH_CHECK();
}

}  // namespace dso
