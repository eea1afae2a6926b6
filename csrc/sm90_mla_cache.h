// Launchers of the MLA latent-cache writes (csrc/sm90_mla_cache.cu), and the cache format that the
// decode kernels (csrc/sm90_mla_decode.cu) read. Geometry shared with deepseek_ops/constants.py.
//
// A cache is [num_blocks, 64 tokens, 1 head, token]; a token is either
//   bf16:      576 bf16 (512 latent c_KV, then 64 RoPE k_pe), or
//   FP8 packed (656 bytes, no padding; a page is 64 tokens = 41984 bytes):
//     [0, 512)    512 e4m3 values of c_KV, value = e4m3 * scale of its 128-group
//     [512, 528)  4 fp32 scales, the FP8 recipe of csrc/fp8_recipe.cuh with UE8M0 rounding: each a
//                 power of two (max(amax, 1e-4) / 448 rounded up), so e4m3 * scale is exact
//     [528, 656)  64 bf16 RoPE values (k_pe), unquantized
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace dso {

constexpr int kMlaPageSize = 64;      // tokens per cache page
constexpr int kMlaHeadDimQK = 576;    // 512 latent + 64 RoPE
constexpr int kMlaHeadDimV = 512;     // V = the first 512 latent entries of K
constexpr int kMlaFp8TokenBytes = 656;
constexpr int kMlaFp8ScalesOffset = kMlaHeadDimV;          // byte offset of the 4 fp32 scales
constexpr int kMlaFp8RopeOffset = kMlaFp8ScalesOffset + 16;  // byte offset of the bf16 RoPE values
constexpr float kMlaFp8ScaleFloor = 1e-4f;  // amax floor of the cache's scales: they span 2^-22 .. 2^120
static_assert(kMlaFp8RopeOffset + (kMlaHeadDimQK - kMlaHeadDimV) * 2 == kMlaFp8TokenBytes,
              "a packed FP8 token is values, scales and RoPE with no padding");

// kv bf16 [num_tokens, 576] -> packed FP8 tokens uint8 [num_tokens, 656].
void launch_mla_quantize_kv(const void* kv, void* packed, int64_t num_tokens, cudaStream_t stream);

// Writes token (b, s) (c_kv [B, S, 512], k_pe [B, S, 64] bf16) at cache position positions[b, s]
// of request b (negative positions and positions past the block table are skipped).
void launch_mla_cache_append(void* kv_cache, bool fp8_cache, int num_blocks, const int* block_table, int max_blocks,
                             int block_table_stride, const int* positions, const void* c_kv, const void* k_pe,
                             int batch, int tokens_per_req, cudaStream_t stream);

}  // namespace dso
