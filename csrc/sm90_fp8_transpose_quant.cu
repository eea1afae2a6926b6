// Transpose-quantization for the weight gradient (deepseek_ops.transpose_quant_fp8): x [T, C] ->
// x^T [C, T_pad] e4m3, one scale per 1 x 128 token group of each channel, in the recipe of
// csrc/fp8_recipe.cuh (bit-identical to deepseek_ops/reference.py).
//
// One CTA per tile of 128 tokens (one scale group) x 256 bytes of channels (128 bf16/fp16 or 64 fp32):
// - load: the tile's token rows into shared memory, coalesced 16-byte loads (element loads where a
//   row is not a whole number of 16-byte vectors);
// - store: 4 lanes per 32-bit word column read its 128 tokens down the tile, reduce the amax of
//   each channel in it, and write the channel's 128 e4m3 bytes as 16-byte stores (a store
//   instruction: 8 channel rows, 64 contiguous bytes each).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <type_traits>

#include "common.h"
#include "fp8_recipe.cuh"
#include "memory.cuh"
#include "sm90_fp8_transpose_quant.h"

namespace dso {
namespace {

constexpr int kThreads = 256;
constexpr int kTileTokens = 128;  // one scale group along the token axis
constexpr int kRowWords = 64;     // 256 bytes of channels a token row
constexpr int kRowChunks = kRowWords / 4;
constexpr int kLanesPerColumn = 4;  // a word column's 128 tokens: 2 x 16 per lane
// NOTE: 4 resident CTAs (64 registers a thread) keep one CTA's loads in flight while another quantizes.
constexpr int kMinCtasPerSm = 4;
static_assert(kThreads / 32 * (32 / kLanesPerColumn) == kRowWords, "one thread group per word column");

// Word (row, word) of the tile. NOTE: the store phase reads one word column in 4 rows 16 apart
// across a warp's lanes (8 columns x 4 rows); XOR-ing the word index with 8 x (row / 16 mod 4) puts
// those rows on distinct banks, and keeps each 16-byte chunk of a row contiguous and aligned.
__device__ __forceinline__ int smem_word(int row, int word) { return row * kRowWords + (word ^ (((row >> 4) & 3) << 3)); }

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

// kVec16: every token row is a whole number of 16-byte vectors (C * sizeof(T) % 16 == 0).
template <typename T, bool kVec16>
__device__ __forceinline__ void load_tile(const T* __restrict__ x, uint32_t* smem_tile, int64_t first_token,
                                          int64_t first_channel, int64_t num_tokens, int64_t num_channels) {
  constexpr int kChannelsPerWord = 4 / sizeof(T);
  if constexpr (kVec16) {
    constexpr int kChannelsPerChunk = 16 / sizeof(T);
    constexpr int kLoads = kTileTokens * kRowChunks / kThreads;
    int4 raw[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int chunk = threadIdx.x + u * kThreads, row = chunk / kRowChunks;
      const int64_t token = first_token + row, channel = first_channel + chunk % kRowChunks * kChannelsPerChunk;
      raw[u] = token < num_tokens && channel < num_channels ? ptx::ld_nc_na_v4(x + token * num_channels + channel)
                                                            : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int chunk = threadIdx.x + u * kThreads, row = chunk / kRowChunks;
      *reinterpret_cast<int4*>(smem_tile + smem_word(row, chunk % kRowChunks * 4)) = raw[u];
    }
  } else {
    using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
    constexpr int kTileChannels = kRowWords * kChannelsPerWord;
    for (int idx = threadIdx.x; idx < kTileTokens * kTileChannels; idx += kThreads) {
      const int row = idx / kTileChannels, col = idx % kTileChannels;
      const int64_t token = first_token + row, channel = first_channel + col;
      const Bits bits = token < num_tokens && channel < num_channels
                            ? reinterpret_cast<const Bits*>(x)[token * num_channels + channel]
                            : Bits{0};
      reinterpret_cast<Bits*>(smem_tile + smem_word(row, col / kChannelsPerWord))[col % kChannelsPerWord] = bits;
    }
  }
}

template <typename T, bool kVec16>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) sm90_transpose_quant_fp8_kernel(
    const T* __restrict__ x, uint8_t* __restrict__ x_t, float* __restrict__ scales, int64_t num_tokens,
    int64_t num_channels, int64_t num_channel_tiles, int64_t num_token_tiles) {
  constexpr int kChannelsPerWord = 4 / sizeof(T);
  constexpr int kTileChannels = kRowWords * kChannelsPerWord;
  __shared__ __align__(16) uint32_t smem_tile[kTileTokens * kRowWords];

  const int64_t channel_tile_idx = blockIdx.x % num_channel_tiles, token_tile_idx = blockIdx.x / num_channel_tiles;
  const int64_t first_token = token_tile_idx * kTileTokens, first_channel = channel_tile_idx * kTileChannels;
  load_tile<T, kVec16>(x, smem_tile, first_token, first_channel, num_tokens, num_channels);
  __syncthreads();

  // This thread: word column `word`, tokens [16 q, 16 q + 16) and [64 + 16 q, 80 + 16 q) of the tile.
  const int lane_idx = threadIdx.x % 32;
  const int word = threadIdx.x / 32 * (32 / kLanesPerColumn) + lane_idx / kLanesPerColumn;
  const int quarter = lane_idx % kLanesPerColumn;
  uint32_t words[2][16];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int i = 0; i < 16; ++i) words[half][i] = smem_tile[smem_word(64 * half + 16 * quarter + i, word)];
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

  const int64_t t_pad = num_token_tiles * kTileTokens;
#pragma unroll
  for (int e = 0; e < kChannelsPerWord; ++e) {
    const int64_t channel = first_channel + word * kChannelsPerWord + e;
    if (channel >= num_channels) continue;
    const float scale = fp8_scale_from_amax(channel_of<T>(amax, e));
    const float inv_scale = fp8_inverse_scale(scale);
    uint8_t* row_out = x_t + channel * t_pad + first_token + 16 * quarter;
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
    if (quarter == 0) scales[channel * num_token_tiles + token_tile_idx] = scale;
  }
}

template <typename T>
void launch_typed(const void* x, void* x_t, float* scales, int64_t num_tokens, int64_t num_channels,
                  cudaStream_t stream) {
  constexpr int64_t kTileChannels = kRowWords * 4 / sizeof(T);
  const int64_t num_channel_tiles = ceil_div(num_channels, kTileChannels);
  const int64_t num_token_tiles = ceil_div<int64_t>(num_tokens, kTileTokens);
  const int64_t grid = num_channel_tiles * num_token_tiles;
  if (grid > INT32_MAX) throw std::invalid_argument("deepseek_ops: transpose_quant_fp8: input too large");
  auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<uint8_t*>(x_t),
                                                                 scales, num_tokens, num_channels, num_channel_tiles,
                                                                 num_token_tiles);
  };
  if (num_channels * static_cast<int64_t>(sizeof(T)) % 16 == 0) {
    launch(sm90_transpose_quant_fp8_kernel<T, true>);
  } else {
    launch(sm90_transpose_quant_fp8_kernel<T, false>);
  }
  DSO_LAUNCH_CHECK();
}

}  // namespace

void launch_transpose_quant_fp8(const void* x, FloatKind x_kind, void* x_t, float* scales, int64_t num_tokens,
                                int64_t num_channels, cudaStream_t stream) {
  switch (x_kind) {
    case FloatKind::kBF16: launch_typed<__nv_bfloat16>(x, x_t, scales, num_tokens, num_channels, stream); break;
    case FloatKind::kFP16: launch_typed<__half>(x, x_t, scales, num_tokens, num_channels, stream); break;
    case FloatKind::kFP32: launch_typed<float>(x, x_t, scales, num_tokens, num_channels, stream); break;
  }
}

}  // namespace dso
