// The transposed half of the weight-gradient quantization, shared by transpose_quant_fp8
// (csrc/sm90_fp8_transpose_quant.cu) and swiglu_backward_quant_fp8 (csrc/sm90_fp8_swiglu_backward_quant.cu):
// a shared-memory tile of 128 tokens (one scale group along the token axis) x kRowWords 32-bit words
// of channels, stored as e4m3 rows of 128 tokens per channel with one scale each, in the recipe of
// csrc/fp8_recipe.cuh. 4 lanes per word column read its 128 tokens down the tile, reduce the amax
// of each channel in it, and write the channel's 128 bytes as 16-byte stores.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "fp8_recipe.cuh"
#include "memory.cuh"

namespace dso::transpose_tile {

constexpr int kTileTokens = 128;
constexpr int kLanesPerColumn = 4;  // a word column's 128 tokens: 2 x 16 per lane

// Word (row, word) of a tile with kRowWords words a row. NOTE: the store reads one word column in 4
// rows 16 apart across a warp's lanes (8 columns x 4 rows); XOR-ing the word index with
// 8 x (row / 16 mod 4) puts those rows on distinct banks, and keeps each 16-byte chunk of a row
// contiguous and aligned.
template <int kRowWords>
__device__ __forceinline__ int smem_word(int row, int word) {
  static_assert(kRowWords % 32 == 0, "rows of whole bank lines");
  return row * kRowWords + (word ^ (((row >> 4) & 3) << 3));
}

// Channel e of the channels packed in a 32-bit word of the tile, as a float (exact).
template <typename T>
__device__ __forceinline__ float channel_of(uint32_t word, int e) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(word);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(e == 0 ? word << 16 : word & 0xffff0000u);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(e == 0 ? word : word >> 16)));
  }
}

// max(acc, |word|) channel by channel, the channels kept packed (abs and max are exact in any format).
template <typename T>
__device__ __forceinline__ uint32_t abs_max_packed(uint32_t acc, uint32_t word) {
  if constexpr (std::is_same_v<T, float>) {
    return __float_as_uint(fmaxf(__uint_as_float(acc), fabsf(__uint_as_float(word))));
  } else {
    using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    const T2 m = __hmax2(*reinterpret_cast<const T2*>(&acc), __habs2(*reinterpret_cast<const T2*>(&word)));
    return *reinterpret_cast<const uint32_t*>(&m);
  }
}

// The calling thread's share (tokens [16 q, 16 q + 16) and [64 + 16 q, 80 + 16 q) of the tile,
// q = lane % 4) of storing word column `word`; the 4 lanes of a column are consecutive. Its
// channels are rows first_row, first_row + 1, ... of out [., t_pad] (those < num_rows are written)
// and of scales [., num_token_tiles]; the tile holds tokens [token_tile_idx * 128, + 128).
template <typename T, int kRowWords>
__device__ __forceinline__ void quantize_store_column(const uint32_t* smem_tile, int word, int64_t first_row,
                                                      int64_t num_rows, int64_t token_tile_idx, int64_t t_pad,
                                                      int64_t num_token_tiles, uint8_t* __restrict__ out,
                                                      float* __restrict__ scales) {
  constexpr int kChannelsPerWord = 4 / sizeof(T);
  const int quarter = threadIdx.x % kLanesPerColumn;
  uint32_t words[2][16];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int i = 0; i < 16; ++i) words[half][i] = smem_tile[smem_word<kRowWords>(64 * half + 16 * quarter + i, word)];
  }
  uint32_t amax = 0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = abs_max_packed<T>(amax, words[half][i]);
  }
#pragma unroll
  for (int mask = kLanesPerColumn / 2; mask > 0; mask >>= 1) {
    amax = abs_max_packed<T>(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
  }

#pragma unroll
  for (int e = 0; e < kChannelsPerWord; ++e) {
    const int64_t row = first_row + e;
    if (row >= num_rows) continue;
    const float scale = fp8_scale_from_amax(channel_of<T>(amax, e));
    const float inv_scale = fp8_inverse_scale(scale);
    uint8_t* row_out = out + row * t_pad + token_tile_idx * kTileTokens + 16 * quarter;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      uint32_t packed[4];  // 16 tokens' e4m3 bytes, the first token in the low byte
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t* w = words[half] + 4 * i;
        const uint32_t lo = fp8_quantize_x2(channel_of<T>(w[0], e), channel_of<T>(w[1], e), inv_scale);
        const uint32_t hi = fp8_quantize_x2(channel_of<T>(w[2], e), channel_of<T>(w[3], e), inv_scale);
        packed[i] = lo | hi << 16;
      }
      ptx::st_cs_v4(row_out + 64 * half, make_int4(packed[0], packed[1], packed[2], packed[3]));
    }
    if (quarter == 0) scales[row * num_token_tiles + token_tile_idx] = scale;
  }
}

}  // namespace dso::transpose_tile
