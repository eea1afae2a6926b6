// One-GPU expert parallelism: layout counting, the dispatch permutation into the grouped GEMM's
// per-expert contiguous layout, and the weighted un-permute combine. No host sync anywhere: every
// size the kernels need is computed on the device, so the whole dispatch fits in a CUDA graph.
//
// Dispatch is four launches:
//   count   blocks of kTokensPerCountBlock tokens rank each (token, k) pair among the pairs of the
//           same expert in the block, in (token, k) order (one warp, __match_any_sync), and write
//           the block's per-expert counts.
//   scan    one block turns the counts into each block's first slot per expert and each expert's
//           padded group start (the deterministic order makes the output bitwise reproducible).
//   rows    one block per token: reads the token's row once and writes it to each of its rows.
//   padding m_indices = -1 (and weight 0) on the rows no pair landed on.
#include <cuda_bf16.h>

#include "common.h"
#include "ep_local.h"
#include "memory.cuh"

namespace dso {
namespace {

constexpr int kMaxTopk = 32;
constexpr int kTokensPerCountBlock = 128;
constexpr int kCountThreads = 128;
constexpr int kScanThreads = 256;
constexpr int kRowThreads = 256;
constexpr int kPadThreads = 256;
constexpr int kCombineThreads = 256;
constexpr int kLayoutThreads = 256;
constexpr int kScanUnroll = 16;

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

__global__ void __launch_bounds__(kCountThreads) sm90_ep_count_kernel(const int64_t* __restrict__ topk_idx,
                                                                       int64_t num_pairs, int topk, int num_experts,
                                                                       int* __restrict__ pair_rank,
                                                                       int* __restrict__ block_counts) {
  extern __shared__ int smem_count_block[];  // [num_experts] counts, then the block's pairs' experts
  int* smem_expert_count = smem_count_block;
  int* smem_pair_expert = smem_count_block + num_experts;
  const int64_t first_pair = static_cast<int64_t>(blockIdx.x) * kTokensPerCountBlock * topk;
  const int64_t end_pair = min(first_pair + static_cast<int64_t>(kTokensPerCountBlock) * topk, num_pairs);
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) smem_expert_count[e] = 0;
  // The whole block stages the experts in one coalesced pass: the ranking warp then never waits on DRAM.
  for (int64_t i = threadIdx.x; i < end_pair - first_pair; i += blockDim.x)
    smem_pair_expert[i] = expert_of(topk_idx[first_pair + i], num_experts);
  __syncthreads();

  // NOTE: one warp walks the block's pairs in order so that ranks follow (token, k) order exactly;
  // atomics would give a valid but run-dependent permutation.
  if (threadIdx.x < 32) {
    const int lane_idx = threadIdx.x;
    for (int64_t base = first_pair; base < end_pair; base += 32) {
      const int64_t pair_idx = base + lane_idx;
      const int e = pair_idx < end_pair ? smem_pair_expert[pair_idx - first_pair] : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, e);
      const int num_before = __popc(peers & ((1u << lane_idx) - 1u));
      if (e >= 0) pair_rank[pair_idx] = smem_expert_count[e] + num_before;
      __syncwarp();
      if (e >= 0 && num_before == 0) smem_expert_count[e] += __popc(peers);
      __syncwarp();
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
    block_counts[static_cast<int64_t>(blockIdx.x) * num_experts + e] = smem_expert_count[e];
}

// block_counts [num_blocks, E] becomes each block's first slot within each expert (exclusive scan
// over blocks); expert_start [E + 1] the first row of each expert's padded group (and the total).
__global__ void __launch_bounds__(kScanThreads) sm90_ep_scan_kernel(int* __restrict__ block_counts, int num_blocks,
                                                                     int num_experts, int alignment,
                                                                     int* __restrict__ expert_start,
                                                                     int* __restrict__ num_tokens_per_expert) {
  extern __shared__ int smem_padded[];  // [num_experts]
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int running = 0;
    for (int b0 = 0; b0 < num_blocks; b0 += kScanUnroll) {
      int counts[kScanUnroll];  // loads batched ahead of the dependent sum: latency, not bandwidth, bound
#pragma unroll
      for (int i = 0; i < kScanUnroll; ++i)
        counts[i] = b0 + i < num_blocks ? block_counts[static_cast<int64_t>(b0 + i) * num_experts + e] : 0;
#pragma unroll
      for (int i = 0; i < kScanUnroll; ++i) {
        if (b0 + i < num_blocks) block_counts[static_cast<int64_t>(b0 + i) * num_experts + e] = running;
        running += counts[i];
      }
    }
    num_tokens_per_expert[e] = running;
    smem_padded[e] = (running + alignment - 1) / alignment * alignment;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int start = 0;
    for (int e = 0; e < num_experts; ++e) {
      expert_start[e] = start;
      start += smem_padded[e];
    }
    expert_start[num_experts] = start;
  }
}

__global__ void __launch_bounds__(kRowThreads) sm90_ep_permute_rows_kernel(
    const uint8_t* __restrict__ x, int64_t row_bytes, const float* __restrict__ x_scales, int num_groups,
    const float* __restrict__ topk_weights, const int64_t* __restrict__ topk_idx, int topk, int num_experts,
    int64_t num_rows, const int* __restrict__ pair_rank, const int* __restrict__ block_offsets,
    const int* __restrict__ expert_start, uint8_t* __restrict__ recv_x, float* __restrict__ recv_scales,
    float* __restrict__ recv_weights, int* __restrict__ m_indices, int* __restrict__ row_of) {
  __shared__ int64_t smem_rows[kMaxTopk];
  const int64_t token_idx = blockIdx.x;
  if (threadIdx.x < topk) {
    const int64_t pair_idx = token_idx * topk + threadIdx.x;
    const int e = expert_of(topk_idx[pair_idx], num_experts);
    int64_t row = -1;
    if (e >= 0) {
      const int64_t block_idx = token_idx / kTokensPerCountBlock;
      row = static_cast<int64_t>(expert_start[e]) + block_offsets[block_idx * num_experts + e] + pair_rank[pair_idx];
      row = row < num_rows ? row : -1;  // never past the buffer (the host sizes it so this cannot happen)
    }
    if (row >= 0) {
      m_indices[row] = e;
      if (recv_weights != nullptr) recv_weights[row] = topk_weights[pair_idx];
    }
    row_of[pair_idx] = static_cast<int>(row);
    smem_rows[threadIdx.x] = row;
  }
  __syncthreads();

  // The source row is read once (streamed past L1) and stored to every destination row.
  const uint8_t* src = x + token_idx * row_bytes;
  for (int64_t chunk = threadIdx.x; chunk < row_bytes / 16; chunk += kRowThreads) {
    const int4 v = ptx::ld_nc_na_v4(src + chunk * 16);
    for (int k = 0; k < topk; ++k) {
      const int64_t row = smem_rows[k];
      if (row >= 0) *reinterpret_cast<int4*>(recv_x + row * row_bytes + chunk * 16) = v;
    }
  }
  for (int g = threadIdx.x; g < num_groups; g += kRowThreads) {
    const float s = x_scales[token_idx * num_groups + g];
    for (int k = 0; k < topk; ++k) {
      const int64_t row = smem_rows[k];
      if (row >= 0) recv_scales[row * num_groups + g] = s;
    }
  }
}

__global__ void __launch_bounds__(kPadThreads) sm90_ep_fill_padding_kernel(const int* __restrict__ expert_start,
                                                                            const int* __restrict__ num_tokens_per_expert,
                                                                            int num_experts, int64_t num_rows,
                                                                            int* __restrict__ m_indices,
                                                                            float* __restrict__ recv_weights) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= num_rows) return;
  bool padding = row >= expert_start[num_experts];
  if (!padding) {
    int lo = 0, hi = num_experts - 1;  // the last expert whose group starts at or before row
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (expert_start[mid] <= row) lo = mid; else hi = mid - 1;
    }
    padding = row - expert_start[lo] >= num_tokens_per_expert[lo];
  }
  if (padding) {
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
      if (row < 0) continue;
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

int64_t num_count_blocks(int64_t num_tokens) { return ceil_div<int64_t>(num_tokens, kTokensPerCountBlock); }

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
  return num_tokens * topk + num_count_blocks(num_tokens) * num_experts + num_experts + 1;
}

void launch_ep_permute(const void* x, int64_t row_bytes, const float* x_scales, int num_groups,
                       const float* topk_weights, const int64_t* topk_idx, int64_t num_tokens, int topk,
                       int num_experts, int alignment, int64_t num_rows, void* recv_x, float* recv_scales,
                       float* recv_weights, int* m_indices, int* row_of, int* num_tokens_per_expert, int* workspace,
                       cudaStream_t stream) {
  if (topk > kMaxTopk) throw std::runtime_error("deepseek_ops: ep_permute supports topk <= 32");
  if (row_bytes % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(recv_x) % 16 != 0)
    throw std::runtime_error("deepseek_ops: ep_permute needs 16-byte aligned x and rows of a multiple of 16 bytes");
  const int64_t num_blocks = num_count_blocks(num_tokens);
  int* pair_rank = workspace;
  int* block_counts = pair_rank + num_tokens * topk;
  int* expert_start = block_counts + num_blocks * num_experts;
  const size_t smem = sizeof(int) * num_experts;
  if (num_blocks > 0) {
    const size_t count_smem = smem + sizeof(int) * kTokensPerCountBlock * topk;
    if (count_smem > 48 * 1024) throw std::runtime_error("deepseek_ops: ep_permute supports at most ~8000 experts");
    sm90_ep_count_kernel<<<num_blocks, kCountThreads, count_smem, stream>>>(topk_idx, num_tokens * topk, topk,
                                                                           num_experts, pair_rank, block_counts);
    DSO_LAUNCH_CHECK();
  }
  sm90_ep_scan_kernel<<<1, kScanThreads, smem, stream>>>(block_counts, static_cast<int>(num_blocks), num_experts,
                                                         alignment, expert_start, num_tokens_per_expert);
  DSO_LAUNCH_CHECK();
  if (num_tokens > 0) {
    sm90_ep_permute_rows_kernel<<<num_tokens, kRowThreads, 0, stream>>>(
        static_cast<const uint8_t*>(x), row_bytes, x_scales, num_groups, topk_weights, topk_idx, topk, num_experts,
        num_rows, pair_rank, block_counts, expert_start, static_cast<uint8_t*>(recv_x), recv_scales, recv_weights,
        m_indices, row_of);
    DSO_LAUNCH_CHECK();
  }
  if (num_rows > 0) {
    sm90_ep_fill_padding_kernel<<<ceil_div<int64_t>(num_rows, kPadThreads), kPadThreads, 0, stream>>>(
        expert_start, num_tokens_per_expert, num_experts, num_rows, m_indices, recv_weights);
    DSO_LAUNCH_CHECK();
  }
}

void launch_ep_combine(const void* y, const int* row_of, const float* topk_weights, int64_t num_tokens, int topk,
                       int64_t hidden, void* out, cudaStream_t stream) {
  if (topk > kMaxTopk) throw std::runtime_error("deepseek_ops: ep_combine supports topk <= 32");
  if (hidden % 8 != 0 || reinterpret_cast<uintptr_t>(y) % 16 != 0)
    throw std::runtime_error("deepseek_ops: ep_combine needs a 16-byte aligned y and hidden % 8 == 0");
  if (num_tokens == 0 || hidden == 0) return;
  sm90_bf16_ep_combine_kernel<<<num_tokens, kCombineThreads, 0, stream>>>(
      static_cast<const uint8_t*>(y), row_of, topk_weights, topk, hidden, static_cast<uint8_t*>(out));
  DSO_LAUNCH_CHECK();
}

}  // namespace dso
