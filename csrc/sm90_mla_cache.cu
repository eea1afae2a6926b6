// Writes into the MLA latent cache (format in sm90_mla_cache.h): quantization of bf16 tokens into
// the packed FP8 format, and the model's per-step append of new tokens at their positions (bf16 or
// FP8 cache). One warp per token: lane l quantizes values 16 l .. 16 l + 15 (group l / 8); lanes
// 0..7 copy the RoPE.
#include <cuda_bf16.h>

#include "common.h"
#include "fp8_recipe.cuh"
#include "sm90_mla_cache.h"

namespace dso {
namespace {

constexpr int kWarpsPerBlock = 8;

// Quantizes this lane's 16 latent values (bf16, 16-byte aligned) into `dst_token` (and its group scale).
__device__ __forceinline__ void quantize_latent_lane(const __nv_bfloat16* src16, uint8_t* dst_token, int lane) {
  const int4 raw0 = reinterpret_cast<const int4*>(src16)[0];
  const int4 raw1 = reinterpret_cast<const int4*>(src16)[1];
  const __nv_bfloat16* h0 = reinterpret_cast<const __nv_bfloat16*>(&raw0);
  const __nv_bfloat16* h1 = reinterpret_cast<const __nv_bfloat16*>(&raw1);
  float v[16];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = __bfloat162float(h0[i]), v[8 + i] = __bfloat162float(h1[i]);
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
  // A 128-group is 8 consecutive lanes.
#pragma unroll
  for (int offset = 1; offset < 8; offset <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  // The cache's scales are powers of two, from the cache's own floor.
  const float scale = fp8_scale_from_amax</*kUE8M0=*/true>(amax, kMlaFp8ScaleFloor);
  const float inv_scale = fp8_inverse_scale(scale);
  uint16_t pairs[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) pairs[i] = fp8_quantize_x2(v[2 * i], v[2 * i + 1], inv_scale);
  *reinterpret_cast<int4*>(dst_token + 16 * lane) = *reinterpret_cast<const int4*>(pairs);
  if (lane % 8 == 0) reinterpret_cast<float*>(dst_token + kMlaFp8ScalesOffset)[lane / 8] = scale;
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    sm90_mla_quantize_kv_kernel(const __nv_bfloat16* __restrict__ kv, uint8_t* __restrict__ packed, int64_t num_tokens) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (token >= num_tokens) return;
  const __nv_bfloat16* src = kv + token * kMlaHeadDimQK;
  uint8_t* dst = packed + token * kMlaFp8TokenBytes;
  quantize_latent_lane(src + 16 * lane, dst, lane);
  if (lane < 8) {
    *reinterpret_cast<int4*>(dst + kMlaFp8RopeOffset + 16 * lane) =
        reinterpret_cast<const int4*>(src + kMlaHeadDimV)[lane];
  }
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    sm90_mla_cache_append_kernel(uint8_t* __restrict__ kv_cache, bool fp8_cache, int num_blocks,
                                 const int* __restrict__ block_table, int max_blocks, int block_table_stride,
                                 const int* __restrict__ positions, const __nv_bfloat16* __restrict__ c_kv,
                                 const __nv_bfloat16* __restrict__ k_pe, int batch, int tokens_per_req) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (token >= static_cast<int64_t>(batch) * tokens_per_req) return;
  const int req = static_cast<int>(token / tokens_per_req);
  const int pos = positions[token];
  if (pos < 0 || pos / kMlaPageSize >= max_blocks) return;  // padding, or no page for it
  const int page = block_table[static_cast<int64_t>(req) * block_table_stride + pos / kMlaPageSize];
  if (page < 0 || page >= num_blocks) return;  // never write outside the cache
  const int64_t slot = static_cast<int64_t>(page) * kMlaPageSize + pos % kMlaPageSize;
  const __nv_bfloat16* src_latent = c_kv + token * kMlaHeadDimV;
  const __nv_bfloat16* src_rope = k_pe + token * (kMlaHeadDimQK - kMlaHeadDimV);
  if (fp8_cache) {
    uint8_t* dst = kv_cache + slot * kMlaFp8TokenBytes;
    quantize_latent_lane(src_latent + 16 * lane, dst, lane);
    if (lane < 8) {
      *reinterpret_cast<int4*>(dst + kMlaFp8RopeOffset + 16 * lane) = reinterpret_cast<const int4*>(src_rope)[lane];
    }
  } else {
    // 1152 bytes = 72 chunks: 64 of latent, 8 of RoPE.
    int4* dst = reinterpret_cast<int4*>(kv_cache + slot * kMlaHeadDimQK * 2);
    for (int chunk = lane; chunk < 72; chunk += 32) {
      dst[chunk] = chunk < 64 ? reinterpret_cast<const int4*>(src_latent)[chunk]
                              : reinterpret_cast<const int4*>(src_rope)[chunk - 64];
    }
  }
}

}  // namespace

void launch_mla_quantize_kv(const void* kv, void* packed, int64_t num_tokens, cudaStream_t stream) {
  const int64_t blocks = ceil_div<int64_t>(num_tokens, kWarpsPerBlock);
  sm90_mla_quantize_kv_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(kv), static_cast<uint8_t*>(packed), num_tokens);
  DSO_LAUNCH_CHECK();
}

void launch_mla_cache_append(void* kv_cache, bool fp8_cache, int num_blocks, const int* block_table, int max_blocks,
                             int block_table_stride, const int* positions, const void* c_kv, const void* k_pe,
                             int batch, int tokens_per_req, cudaStream_t stream) {
  const int64_t blocks = ceil_div<int64_t>(static_cast<int64_t>(batch) * tokens_per_req, kWarpsPerBlock);
  sm90_mla_cache_append_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<uint8_t*>(kv_cache), fp8_cache, num_blocks, block_table, max_blocks, block_table_stride, positions,
      static_cast<const __nv_bfloat16*>(c_kv), static_cast<const __nv_bfloat16*>(k_pe), batch, tokens_per_req);
  DSO_LAUNCH_CHECK();
}

}  // namespace dso
