// Launchers of the MLA decode kernels (csrc/sm90_mla_decode.cu): the split-KV schedule,
// the attention kernel over a paged latent cache (bf16 or packed FP8) and the split combine.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "sm90_mla_cache.h"

namespace dso {

constexpr int kMlaBlockRows = 64;     // query rows (s_q * h_q packed) per CTA
constexpr int kMlaSchedCols = 8;      // int32 columns of one tile_sched row

// cache_seqlens [batch] -> tile_sched [num_parts, 8] (begin_req, begin_tile, end_req, end_tile,
// begin_split, 0, 0, 0) and split_offsets [batch + 1] (prefix sums of the splits per request).
void launch_mla_metadata(const int* cache_seqlens, int batch, int num_parts, int* tile_sched, int* split_offsets,
                         cudaStream_t stream);

struct MlaDecodeArgs {
  const void* q;              // bf16 [batch, s_q, h_q, 576]
  const void* kv_cache;       // bf16 [num_blocks, 64, 1, 576] or uint8 [num_blocks, 64, 1, 656]
  const int* block_table;     // int32 [batch, max_blocks], row stride block_table_stride
  const int* cache_seqlens;   // int32 [batch]
  const int* tile_sched;      // from launch_mla_metadata
  const int* split_offsets;
  void* out;                  // bf16 [batch, s_q, h_q, 512]
  float* lse;                 // fp32 [batch, h_q, s_q]
  float* o_accum;             // fp32 [mla_num_split_rows, s_q * h_q, 512] workspace
  float* lse_accum;           // fp32 [mla_num_split_rows, s_q * h_q] workspace
  int batch, s_q, h_q, num_blocks, max_blocks, block_table_stride, num_parts;
  float softmax_scale;
  bool causal;
  bool fp8_cache;
};

// Rows of the split workspaces (o_accum, lse_accum): a part shares at most one request with the next,
// so batch + num_parts splits at most.
__host__ __device__ inline int64_t mla_num_split_rows(int64_t batch, int64_t num_parts) { return batch + num_parts; }

// Split-KV attention then the log-sum-exp combine of requests that were split. tile_sched and
// split_offsets are read as given: indices from them are clamped (requests into [0, batch), split
// rows into the workspaces), so metadata built for other lengths cannot access memory out of bounds.
void launch_mla_decode(const MlaDecodeArgs& args, cudaStream_t stream);

}  // namespace dso
