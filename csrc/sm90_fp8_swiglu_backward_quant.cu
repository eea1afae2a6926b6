// The SwiGLU backward, quantized for the backward GEMMs of the gate/up projection
// (deepseek_ops.swiglu_backward_quant_fp8): from dact [M, K] and h = [gate | up] [M, 2K], dh = [dgate | dup]
// as autograd of act = (silu(gate.float()) * up.float()).to(h.dtype) computes it on CUDA, rounded to h's
// type and never written, quantized in the recipe of csrc/fp8_recipe.cuh both ways: dh_fp8 [M, 2K] with
// 1 x 128 scales along channels (dgrad's dy) and, if asked, dh_t [2K, M_pad] with 1 x 128 scales along
// tokens (wgrad's dy^T). Bit-identical to deepseek_ops/reference.py run on the GPU.
//
// One CTA per tile of 128 tokens x 128 channels of K: one scale group of dgate and one of dup, each way.
// - rows: 8 lanes per token row, 16 channels each (16-byte loads of dact, gate and up); the 8 lanes reduce
//   the row's amax and store its e4m3 groups (16-byte stores), and put the rounded dgate and dup into two
//   shared-memory tiles;
// - columns: the two tiles stored transposed (csrc/fp8_transpose_tile.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <stdexcept>
#include <type_traits>

#include "common.h"
#include "fp8_recipe.cuh"
#include "fp8_transpose_tile.cuh"
#include "memory.cuh"
#include "sm90_fp8_swiglu_backward_quant.h"

namespace dso {
namespace {

using transpose_tile::kLanesPerColumn;
using transpose_tile::kTileTokens;

constexpr int kThreads = 256;
constexpr int kTileChannels = 128;  // of K: one scale group of dgate and of dup per token
constexpr int kChannelsPerThread = 16;
constexpr int kLanesPerRow = kTileChannels / kChannelsPerThread;
constexpr int kRowsPerPass = kThreads / kLanesPerRow;
constexpr int kPasses = kTileTokens / kRowsPerPass;
static_assert(kLanesPerRow == 8 && kTileTokens % kRowsPerPass == 0, "8 lanes of a warp per token row");

// Shared memory of the two tiles (dgate, dup), 128 tokens x 128 channels of T each.
template <typename T>
constexpr int kSmemBytes = 2 * kTileTokens * kTileChannels * static_cast<int>(sizeof(T));

// NOTE: 2-byte types: 2 resident CTAs (64 KB of tiles each, 128 registers a thread: 3 CTAs' 80
// spill) with two token rows' loads in flight per thread (96 KB a SM) keep the memory busy while a
// CTA computes or stores; fp32 tiles (128 KB) allow one CTA.
template <typename T>
constexpr int kMinCtasPerSm = sizeof(T) == 4 ? 1 : 2;
template <typename T>
constexpr int kRowsInFlight = sizeof(T) == 4 ? 1 : 2;

// v rounded to nearest (even) in T, as T's bits in the low bytes of a word.
template <typename T>
__device__ __forceinline__ uint32_t round_bits(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return __float_as_uint(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

// (dgate, dup) of one element, in fp32 as PyTorch's CUDA kernels compute them in the autograd of
// (silu(g) * u): dup = dact * silu(g), silu(g) = g / (1 + exp(-g)); dgate = silu_backward(dact * u, g)
// = (dact * u) * s * (1 + g * (1 - s)), s = 1 / (1 + exp(-g)). expf and IEEE divisions as there; the
// last line is written as ATen writes it, so that nvcc contracts it (into one fma) alike.
__device__ __forceinline__ float2 swiglu_grad(float dact, float g, float u) {
  const float denom = __fadd_rn(1.0f, expf(-g));
  const float silu = __fdiv_rn(g, denom);
  const float s = __fdiv_rn(1.0f, denom);
  const float dy = __fmul_rn(dact, u);
  const float dgate = dy * s * (1.0f + g * (1.0f - s));
  return make_float2(dgate, __fmul_rn(dact, silu));
}

// Word w of a 16-byte vector (w a compile-time constant after unrolling: the vector stays in registers).
__device__ __forceinline__ uint32_t word_of(const int4& v, int w) {
  return static_cast<uint32_t>(w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w);
}

// 16 channels of one token row of dgate or dup, rounded to T, packed as T's bits.
template <typename T>
struct RowSlice {
  static constexpr int kChannelsPerWord = 4 / sizeof(T);
  static constexpr int kWords = kChannelsPerThread / kChannelsPerWord;
  static constexpr int kVecs = kWords / 4;  // 16-byte vectors
  uint32_t words[kWords];

  __device__ __forceinline__ float channel(int c) const {
    return transpose_tile::channel_of<T>(words[c / kChannelsPerWord], c % kChannelsPerWord);
  }
  __device__ __forceinline__ float abs_max() const {
    float m = 0.0f;
#pragma unroll
    for (int c = 0; c < kChannelsPerThread; ++c) m = fmaxf(m, fabsf(channel(c)));
    return m;
  }
};

// The row's group amax (its 8 lanes are aligned in the warp), its scale and 16 e4m3 bytes at dst.
template <typename T>
__device__ __forceinline__ float quantize_row_store(const RowSlice<T>& x, float amax, bool valid, uint8_t* dst) {
#pragma unroll
  for (int mask = kLanesPerRow / 2; mask > 0; mask >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
  const float scale = fp8_scale_from_amax(amax);
  const float inv_scale = fp8_inverse_scale(scale);
  uint32_t packed[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = fp8_quantize_x2(x.channel(4 * i), x.channel(4 * i + 1), inv_scale);
    const uint32_t hi = fp8_quantize_x2(x.channel(4 * i + 2), x.channel(4 * i + 3), inv_scale);
    packed[i] = lo | hi << 16;
  }
  if (valid) ptx::st_cs_v4(dst, make_int4(packed[0], packed[1], packed[2], packed[3]));
  return scale;
}

// The slice into row `row` of a [128][kRowWords] tile. NOTE: lane l of a row starts at its vector
// l * kVecs / 8 (mod kVecs): a quarter-warp's 16-byte stores (8 lanes of one row) then cover all 32 banks.
template <typename T>
__device__ __forceinline__ void store_to_tile(const RowSlice<T>& x, uint32_t* smem_tile, int row, int lane_in_row) {
  using Slice = RowSlice<T>;
  constexpr int kRowWords = kTileChannels / Slice::kChannelsPerWord;
#pragma unroll
  for (int step = 0; step < Slice::kVecs; ++step) {
    const int vec = (step + lane_in_row * Slice::kVecs / 8) % Slice::kVecs;
    int4 value;  // x's vector `vec`, picked by selects (a runtime index would put x in local memory)
#pragma unroll
    for (int v = 0; v < Slice::kVecs; ++v) {
      if (v == vec) value = make_int4(x.words[4 * v], x.words[4 * v + 1], x.words[4 * v + 2], x.words[4 * v + 3]);
    }
    const int word = lane_in_row * Slice::kWords + 4 * vec;
    *reinterpret_cast<int4*>(smem_tile + transpose_tile::smem_word<kRowWords>(row, word)) = value;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm<T>) sm90_swiglu_backward_quant_fp8_kernel(
    const T* __restrict__ dact, const T* __restrict__ h, uint8_t* __restrict__ dh_fp8, float* __restrict__ dh_scales,
    uint8_t* __restrict__ dh_t, float* __restrict__ dh_t_scales, int64_t m, int64_t k, int64_t num_channel_tiles,
    int64_t num_token_tiles, bool transposed) {
  using Slice = RowSlice<T>;
  constexpr int kVecs = Slice::kVecs;
  constexpr int kElemsPerVec = 16 / sizeof(T);
  constexpr int kRowWords = kTileChannels / Slice::kChannelsPerWord;
  constexpr int kUnroll = kRowsInFlight<T>;
  static_assert(kPasses % kUnroll == 0, "whole unrolled passes");
  extern __shared__ __align__(16) uint32_t smem_tiles[];  // dgate tile, then dup tile: [128][kRowWords] words
  uint32_t* smem_dup = smem_tiles + kTileTokens * kRowWords;

  const int64_t channel_tile_idx = blockIdx.x % num_channel_tiles, token_tile_idx = blockIdx.x / num_channel_tiles;
  const int lane_in_row = threadIdx.x % kLanesPerRow;
  const int64_t channel = channel_tile_idx * kTileChannels + lane_in_row * kChannelsPerThread;  // of K
  const int64_t scale_cols = 2 * num_channel_tiles;  // dh_scales: dgate's groups, then dup's

#pragma unroll 1
  for (int pass = 0; pass < kPasses; pass += kUnroll) {
    int4 raw_d[kUnroll][kVecs], raw_g[kUnroll][kVecs], raw_u[kUnroll][kVecs];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t token = token_tile_idx * kTileTokens + threadIdx.x / kLanesPerRow + (pass + u) * kRowsPerPass;
      const bool valid = token < m;
      const T* d_row = dact + token * k + channel;
      const T* g_row = h + token * 2 * k + channel;
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        raw_d[u][v] = valid ? ptx::ld_nc_na_v4(d_row + v * kElemsPerVec) : make_int4(0, 0, 0, 0);
        raw_g[u][v] = valid ? ptx::ld_nc_na_v4(g_row + v * kElemsPerVec) : make_int4(0, 0, 0, 0);
        raw_u[u][v] = valid ? ptx::ld_nc_na_v4(g_row + k + v * kElemsPerVec) : make_int4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int row = threadIdx.x / kLanesPerRow + (pass + u) * kRowsPerPass;
      const int64_t token = token_tile_idx * kTileTokens + row;
      const bool valid = token < m;  // padding rows hold zeros: dgate = dup = 0
      Slice dgate, dup;
#pragma unroll
      for (int w = 0; w < Slice::kWords; ++w) {
        const uint32_t d_word = word_of(raw_d[u][w / 4], w % 4);
        const uint32_t g_word = word_of(raw_g[u][w / 4], w % 4);
        const uint32_t u_word = word_of(raw_u[u][w / 4], w % 4);
        dgate.words[w] = dup.words[w] = 0;
#pragma unroll
        for (int e = 0; e < Slice::kChannelsPerWord; ++e) {
          const float2 grad = swiglu_grad(transpose_tile::channel_of<T>(d_word, e),
                                          transpose_tile::channel_of<T>(g_word, e),
                                          transpose_tile::channel_of<T>(u_word, e));
          dgate.words[w] |= round_bits<T>(grad.x) << (16 * e);
          dup.words[w] |= round_bits<T>(grad.y) << (16 * e);
        }
      }
      uint8_t* out_row = dh_fp8 + token * 2 * k + channel;
      const float scale_gate = quantize_row_store(dgate, dgate.abs_max(), valid, out_row);
      const float scale_up = quantize_row_store(dup, dup.abs_max(), valid, out_row + k);
      if (valid && lane_in_row == 0) {
        dh_scales[token * scale_cols + channel_tile_idx] = scale_gate;
        dh_scales[token * scale_cols + num_channel_tiles + channel_tile_idx] = scale_up;
      }
      if (transposed) {
        store_to_tile(dgate, smem_tiles, row, lane_in_row);
        store_to_tile(dup, smem_dup, row, lane_in_row);
      }
    }
  }
  if (!transposed) return;
  __syncthreads();

  // Column `word` of each tile: channels tile_idx * K + first channel of the word, for tokens of this tile.
  const int64_t first_channel = channel_tile_idx * kTileChannels;
#pragma unroll
  for (int tile_idx = 0; tile_idx < 2; ++tile_idx) {
#pragma unroll
    for (int word = threadIdx.x / kLanesPerColumn; word < kRowWords; word += kThreads / kLanesPerColumn) {
      transpose_tile::quantize_store_column<T, kRowWords>(
          tile_idx == 0 ? smem_tiles : smem_dup, word, tile_idx * k + first_channel + word * Slice::kChannelsPerWord,
          2 * k, token_tile_idx, num_token_tiles * kTileTokens, num_token_tiles, dh_t, dh_t_scales);
    }
  }
}

template <typename T>
void launch_typed(const void* dact, const void* h, void* dh_fp8, float* dh_scales, void* dh_t, float* dh_t_scales,
                  int64_t m, int64_t k, bool transposed, cudaStream_t stream) {
  const int64_t num_channel_tiles = k / kTileChannels;
  const int64_t num_token_tiles = ceil_div<int64_t>(m, kTileTokens);
  const int64_t grid = num_channel_tiles * num_token_tiles;
  if (grid > INT32_MAX) throw std::invalid_argument("deepseek_ops: swiglu_backward_quant_fp8: input too large");
  static std::once_flag smem_opt_in[kMaxDevices];
  once_per_device(smem_opt_in, [] {
    DSO_CUDA_CHECK(cudaFuncSetAttribute(sm90_swiglu_backward_quant_fp8_kernel<T>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes<T>));
  });
  sm90_swiglu_backward_quant_fp8_kernel<T><<<static_cast<unsigned>(grid), kThreads, kSmemBytes<T>, stream>>>(
      static_cast<const T*>(dact), static_cast<const T*>(h), static_cast<uint8_t*>(dh_fp8), dh_scales,
      static_cast<uint8_t*>(dh_t), dh_t_scales, m, k, num_channel_tiles, num_token_tiles, transposed);
  DSO_LAUNCH_CHECK();
}

}  // namespace

void launch_swiglu_backward_quant_fp8(const void* dact, const void* h, FloatKind kind, void* dh_fp8, float* dh_scales,
                                      void* dh_t, float* dh_t_scales, int64_t m, int64_t k, bool transposed,
                                      cudaStream_t stream) {
  if (k % kTileChannels != 0) throw std::invalid_argument("deepseek_ops: swiglu_backward_quant_fp8: K % 128 != 0");
  switch (kind) {
    case FloatKind::kBF16:
      launch_typed<__nv_bfloat16>(dact, h, dh_fp8, dh_scales, dh_t, dh_t_scales, m, k, transposed, stream);
      break;
    case FloatKind::kFP16:
      launch_typed<__half>(dact, h, dh_fp8, dh_scales, dh_t, dh_t_scales, m, k, transposed, stream);
      break;
    case FloatKind::kFP32:
      launch_typed<float>(dact, h, dh_fp8, dh_scales, dh_t, dh_t_scales, m, k, transposed, stream);
      break;
  }
}

}  // namespace dso
