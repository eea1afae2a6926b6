// Transpose-quantization for the weight gradient (deepseek_ops.transpose_quant_fp8): x [T, C] ->
// x^T [C, T_pad] e4m3, one scale per 1 x 128 token group of each channel, in the recipe of
// csrc/fp8_recipe.cuh (bit-identical to deepseek_ops/reference.py).
//
// One CTA per tile of 128 tokens (one scale group) x 256 bytes of channels (128 bf16/fp16 or 64 fp32):
// - load: the tile's token rows into shared memory, coalesced 16-byte loads (element loads where a
//   row is not a whole number of 16-byte vectors);
// - store: 4 lanes per 32-bit word column read its 128 tokens down the tile, reduce the amax of
//   each channel in it, and write the channel's 128 e4m3 bytes as 16-byte stores (a store
//   instruction: 8 channel rows, 64 contiguous bytes each; csrc/fp8_transpose_tile.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <type_traits>

#include "common.h"
#include "fp8_transpose_tile.cuh"
#include "memory.cuh"
#include "sm90_fp8_transpose_quant.h"

namespace dso {
namespace {

constexpr int kThreads = 256;
constexpr int kRowWords = 64;  // 256 bytes of channels a token row
constexpr int kRowChunks = kRowWords / 4;
// NOTE: 4 resident CTAs (64 registers a thread) keep one CTA's loads in flight while another quantizes.
constexpr int kMinCtasPerSm = 4;
using transpose_tile::kLanesPerColumn;
using transpose_tile::kTileTokens;
static_assert(kThreads / kLanesPerColumn == kRowWords, "one thread group per word column");

__device__ __forceinline__ int smem_word(int row, int word) { return transpose_tile::smem_word<kRowWords>(row, word); }

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

  // This thread: tokens [16 q, 16 q + 16) and [64 + 16 q, 80 + 16 q) of word column threadIdx.x / 4.
  const int word = threadIdx.x / kLanesPerColumn;
  transpose_tile::quantize_store_column<T, kRowWords>(smem_tile, word, first_channel + word * kChannelsPerWord,
                                                      num_channels, token_tile_idx, num_token_tiles * kTileTokens,
                                                      num_token_tiles, x_t, scales);
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
