// Launchers of the one-GPU expert-parallel kernels (csrc/sm90_ep_permute.cu): layout counting, the
// dispatch permutation into the grouped GEMM's per-expert contiguous layout, and the weighted combine
// (the un-permutation).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace dso {

// topk_idx [num_tokens, topk] int64 (-1 or out of [0, num_experts): no expert) ->
// num_tokens_per_rank int32 [num_ranks], num_tokens_per_expert int32 [num_experts],
// is_token_in_rank bool [num_tokens, num_ranks]. Experts are contiguous per rank.
void launch_ep_dispatch_layout(const int64_t* topk_idx, int64_t num_tokens, int topk, int num_experts, int num_ranks,
                               int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
                               cudaStream_t stream);

// int32 elements of scratch launch_ep_permute needs.
int64_t ep_permute_workspace_ints(int64_t num_tokens, int topk, int num_experts);

// Every (token, k) pair with an expert becomes one row of recv_x: rows grouped by expert, each group
// starting at a multiple of `alignment`, pairs of one expert in (token, k) order. Writes the valid
// rows of recv_x / recv_scales / recv_weights, m_indices for every row (-1: padding), recv_weights 0
// on padding rows, row_of [num_tokens, topk] (-1: no expert) and num_tokens_per_expert (unpadded).
// Padding rows of recv_x and recv_scales are left unwritten. row_bytes % 16 == 0, x 16-byte aligned.
// x_scales / recv_scales may be null (num_groups 0), topk_weights / recv_weights may be null.
// Two kernels chained by programmatic dependent launch (DSO_PDL=0 in the environment: plain
// stream-ordered launches); no host sync, no memset, CUDA-graph safe.
void launch_ep_permute(const void* x, int64_t row_bytes, const float* x_scales, int num_groups,
                       const float* topk_weights, const int64_t* topk_idx, int64_t num_tokens, int topk,
                       int num_experts, int alignment, int64_t num_rows, void* recv_x, float* recv_scales,
                       float* recv_weights, int* m_indices, int* row_of, int* num_tokens_per_expert, int* workspace,
                       cudaStream_t stream);

// out[t] = sum over k with 0 <= row_of[t, k] < num_rows of topk_weights[t, k] * y[row_of[t, k]], fp32
// accumulation in k order (no FMA contraction: bitwise equal to the reference). y bf16 [num_rows,
// hidden], out bf16; hidden % 8 == 0.
void launch_ep_combine(const void* y, int64_t num_rows, const int* row_of, const float* topk_weights,
                       int64_t num_tokens, int topk, int64_t hidden, void* out, cudaStream_t stream);

}  // namespace dso
