// Launchers of the MLA decode kernels (csrc/sm90_bf16_mla_decode.cu): the split-KV schedule,
// the attention kernel over a paged latent cache (bf16 or packed FP8) and the split combine.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace dso {

// Cache geometry shared with deepseek_ops/mla.py.
constexpr int kMlaPageSize = 64;      // tokens per cache page
constexpr int kMlaHeadDimQK = 576;    // 512 latent + 64 RoPE
constexpr int kMlaHeadDimV = 512;     // V = the first 512 latent entries of K
constexpr int kMlaBlockRows = 64;     // query rows (s_q * h_q packed) per CTA
constexpr int kMlaSchedCols = 8;      // int32 columns of one tile_sched row
// FP8 packed token: 512 e4m3, 4 fp32 scales (one per 128 values), 64 bf16 RoPE = 656 bytes, no padding.
constexpr int kMlaFp8TokenBytes = 656;

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
  float* o_accum;             // fp32 [batch + num_parts, s_q * h_q, 512] workspace
  float* lse_accum;           // fp32 [batch + num_parts, s_q * h_q] workspace
  int batch, s_q, h_q, num_blocks, max_blocks, block_table_stride, num_parts;
  float softmax_scale;
  bool causal;
  bool fp8_cache;
};

// Split-KV attention then the log-sum-exp combine of requests that were split.
void launch_mla_decode(const MlaDecodeArgs& args, cudaStream_t stream);

// kv bf16 [num_tokens, 576] -> packed FP8 tokens uint8 [num_tokens, 656].
void launch_mla_quantize_kv(const void* kv, void* packed, int64_t num_tokens, cudaStream_t stream);

// Writes token (b, s) (c_kv [B, S, 512], k_pe [B, S, 64] bf16) at cache position positions[b, s]
// of request b (negative positions and positions past the block table are skipped).
void launch_mla_cache_append(void* kv_cache, bool fp8_cache, int num_blocks, const int* block_table, int max_blocks,
                             int block_table_stride, const int* positions, const void* c_kv, const void* k_pe,
                             int batch, int tokens_per_req, cudaStream_t stream);

}  // namespace dso
