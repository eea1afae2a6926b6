// FP8 quantization in the DeepSeek-V3 recipe (csrc/fp8_recipe.cuh: scale, rounding, bit-identical to
// deepseek_ops/reference.py): 1 x group_size activation groups and 128 x 128 weight blocks, scales
// optionally rounded up to a power of two (UE8M0).
// silu_mul_quant_fp8 is the token-group kernel reading an MLP's [gate | up] rows and quantizing
// silu(gate) * up; that silu keeps PyTorch's IEEE division (bitwise the unfused activation), so
// that variant is issue-bound.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"
#include "fp8.cuh"
#include "fp8_recipe.cuh"
#include "memory.cuh"
#include "sm90_fp8_quant.h"

namespace dso {
namespace {

constexpr int kThreads = 256;

// 16 bytes of input as floats.
template <typename T>
struct Vec16 {
  static constexpr int kElems = 16 / sizeof(T);
  float v[kElems];
};

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return __float2half_rn(v);
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

template <typename T>
__device__ __forceinline__ Vec16<T> unpack16(int4 raw) {
  Vec16<T> out;
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kElems; ++i) out.v[i] = to_float(elems[i]);
  return out;
}

// silu(gate) * up as (F.silu(gate.float()) * up.float()).to(T) computes it on CUDA: silu(g) is
// g / (1 + exp(-g)) with expf and an IEEE division, times up in one rounded fp32 product, then one
// rounding to T (the activation the unfused model quantizes).
template <typename T>
__device__ __forceinline__ Vec16<T> silu_mul(const Vec16<T>& gate, const Vec16<T>& up) {
  Vec16<T> act;
#pragma unroll
  for (int i = 0; i < Vec16<T>::kElems; ++i) {
    const float g = gate.v[i];
    const float silu = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
    act.v[i] = to_float(from_float<T>(__fmul_rn(silu, up.v[i])));
  }
  return act;
}

template <typename T>
__device__ __forceinline__ float abs_max(const Vec16<T>& x) {
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < Vec16<T>::kElems; ++i) m = fmaxf(m, fabsf(x.v[i]));
  return m;
}

// 16 bytes of input quantized to 16 / sizeof(T) e4m3 bytes, stored at `dst`.
template <typename T>
__device__ __forceinline__ void quantize_store(const Vec16<T>& x, float scale, uint8_t* dst) {
  constexpr int kElems = Vec16<T>::kElems;
  const float inv_scale = fp8_inverse_scale(scale);
  uint16_t pairs[kElems / 2];
#pragma unroll
  for (int i = 0; i < kElems / 2; ++i) pairs[i] = fp8_quantize_x2(x.v[2 * i], x.v[2 * i + 1], inv_scale);
  if constexpr (kElems == 8) {
    ptx::st_cs_v2(dst, *reinterpret_cast<const int2*>(pairs));
  } else {
    *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(pairs);
  }
}

// Each group of kGroup contiguous elements is read by kLanes consecutive lanes, 16 bytes each;
// each thread keeps kUnroll groups' loads in flight before it reduces any of them.
// kSiluMul: x is [m, 2 k] (gate | up) and the quantized values are silu(gate) * up (silu_mul).
template <typename T, int kGroup, bool kUE8M0, bool kSiluMul>
__global__ void __launch_bounds__(kThreads) sm90_per_token_group_quant_fp8_kernel(
    const T* __restrict__ x, uint8_t* __restrict__ x_fp8, float* __restrict__ scales, int64_t num_groups_total,
    int64_t groups_per_row, int64_t scale_stride_m, int64_t scale_stride_g) {
  constexpr int kElems = Vec16<T>::kElems;
  constexpr int kLanes = kGroup / kElems;
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "a group must span 1..32 lanes");
  constexpr int kGroupsPerPass = kThreads / kLanes;
  constexpr int kUnroll = 2;

  const int lane_in_group = threadIdx.x % kLanes;
  const int64_t first_group = static_cast<int64_t>(blockIdx.x) * kGroupsPerPass * kUnroll + threadIdx.x / kLanes;

  const int64_t row_elems = groups_per_row * kGroup;  // of the output (and of gate, up)
  int4 raw[kUnroll], raw_up[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t group_idx = first_group + u * kGroupsPerPass;
    const bool valid = group_idx < num_groups_total;
    const int64_t offset = group_idx * kGroup + lane_in_group * kElems;
    if constexpr (kSiluMul) {
      const T* gate = x + offset + group_idx / groups_per_row * row_elems;  // row r starts at 2 r row_elems
      raw[u] = valid ? ptx::ld_nc_na_v4(gate) : make_int4(0, 0, 0, 0);
      raw_up[u] = valid ? ptx::ld_nc_na_v4(gate + row_elems) : make_int4(0, 0, 0, 0);
    } else {
      raw[u] = valid ? ptx::ld_nc_na_v4(x + offset) : make_int4(0, 0, 0, 0);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t group_idx = first_group + u * kGroupsPerPass;
    Vec16<T> vals = unpack16<T>(raw[u]);
    if constexpr (kSiluMul) vals = silu_mul(vals, unpack16<T>(raw_up[u]));
    float amax = abs_max(vals);
#pragma unroll
    for (int mask = kLanes / 2; mask > 0; mask >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
    if (group_idx >= num_groups_total) continue;
    const float scale = fp8_scale_from_amax<kUE8M0>(amax);
    quantize_store(vals, scale, x_fp8 + group_idx * kGroup + lane_in_group * kElems);
    if (lane_in_group == 0) {
      const int64_t row = group_idx / groups_per_row, col = group_idx % groups_per_row;
      scales[row * scale_stride_m + col * scale_stride_g] = scale;
    }
  }
}

// One CTA per 128 x 128 block: every thread loads its share of the block before the reduction,
// then quantizes from registers (the block is read from memory once).
template <typename T, bool kUE8M0>
__global__ void __launch_bounds__(kThreads) sm90_per_block_quant_fp8_kernel(const T* __restrict__ w,
                                                                      uint8_t* __restrict__ w_fp8,
                                                                      float* __restrict__ scales, int64_t n,
                                                                      int64_t k) {
  constexpr int kBlock = 128;
  constexpr int kElems = Vec16<T>::kElems;
  constexpr int kThreadsPerRow = kBlock / kElems;
  constexpr int kRowsPerPass = kThreads / kThreadsPerRow;
  constexpr int kPasses = kBlock / kRowsPerPass;
  __shared__ float warp_amax[kThreads / 32];

  const int64_t block_row = blockIdx.y, block_col = blockIdx.x;
  const int col = threadIdx.x % kThreadsPerRow * kElems;
  const int row0 = threadIdx.x / kThreadsPerRow;
  const int64_t base_col = block_col * kBlock + col;

  int4 raw[kPasses];
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int64_t row = block_row * kBlock + row0 + p * kRowsPerPass;
    raw[p] = row < n ? ptx::ld_nc_na_v4(w + row * k + base_col) : make_int4(0, 0, 0, 0);
  }
  float amax = 0.0f;
#pragma unroll
  for (int p = 0; p < kPasses; ++p) amax = fmaxf(amax, abs_max(unpack16<T>(raw[p])));
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) amax = fmaxf(amax, warp_amax[i]);

  const float scale = fp8_scale_from_amax<kUE8M0>(amax);
  if (threadIdx.x == 0) scales[block_row * gridDim.x + block_col] = scale;
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int64_t row = block_row * kBlock + row0 + p * kRowsPerPass;
    if (row < n) quantize_store(unpack16<T>(raw[p]), scale, w_fp8 + row * k + base_col);
  }
}

// 16 e4m3 values per thread: value * scale in fp32, rounded once to the output type.
template <typename T>
__global__ void __launch_bounds__(kThreads) sm90_dequant_fp8_block_kernel(const uint8_t* __restrict__ w_fp8,
                                                                    const float* __restrict__ scales,
                                                                    T* __restrict__ out, int64_t n, int64_t k,
                                                                    int64_t scale_cols) {
  constexpr int kBlock = 128;
  const int64_t chunks_per_row = k / 16;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (chunk >= n * chunks_per_row) return;
  const int64_t row = chunk / chunks_per_row, col = chunk % chunks_per_row * 16;
  const float scale = scales[row / kBlock * scale_cols + col / kBlock];
  const int4 raw = ptx::ld_nc_na_v4(w_fp8 + row * k + col);
  const uint16_t* pairs = reinterpret_cast<const uint16_t*>(&raw);
  alignas(16) T vals[16];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 f = ptx::e4m3x2_to_float2(pairs[i]);
    vals[2 * i] = from_float<T>(f.x * scale);
    vals[2 * i + 1] = from_float<T>(f.y * scale);
  }
  int4* dst = reinterpret_cast<int4*>(out + row * k + col);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(vals) / 16); ++i) ptx::st_cs_v4(dst + i, reinterpret_cast<int4*>(vals)[i]);
}

template <typename F>
void dispatch_float(FloatKind kind, F&& f) {
  switch (kind) {
    case FloatKind::kBF16: f(__nv_bfloat16{}); break;
    case FloatKind::kFP16: f(__half{}); break;
    case FloatKind::kFP32: f(float{}); break;
  }
}

template <typename F>
void dispatch_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename T, int kGroup, bool kSiluMul = false>
void launch_token_group(const void* x, void* x_fp8, float* scales, int64_t m, int64_t k, bool ue8m0,
                        int64_t scale_stride_m, int64_t scale_stride_g, cudaStream_t stream) {
  constexpr int kLanes = kGroup / Vec16<T>::kElems;
  constexpr int64_t kGroupsPerCta = kThreads / kLanes * 2;
  const int64_t total = m * (k / kGroup);
  const int64_t grid = ceil_div(total, kGroupsPerCta);
  dispatch_bool(ue8m0, [&](auto ue) {
    sm90_per_token_group_quant_fp8_kernel<T, kGroup, decltype(ue)::value, kSiluMul><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<uint8_t*>(x_fp8), scales, total, k / kGroup, scale_stride_m,
        scale_stride_g);
  });
  DSO_LAUNCH_CHECK();
}

}  // namespace

void launch_per_token_group_quant_fp8(const void* x, FloatKind x_kind, void* x_fp8, float* scales, int64_t m,
                                      int64_t k, int64_t group_size, bool ue8m0, int64_t scale_stride_m,
                                      int64_t scale_stride_g, cudaStream_t stream) {
  dispatch_float(x_kind, [&](auto tag) {
    using T = decltype(tag);
    switch (group_size) {
      case 32: launch_token_group<T, 32>(x, x_fp8, scales, m, k, ue8m0, scale_stride_m, scale_stride_g, stream); break;
      case 64: launch_token_group<T, 64>(x, x_fp8, scales, m, k, ue8m0, scale_stride_m, scale_stride_g, stream); break;
      case 128: launch_token_group<T, 128>(x, x_fp8, scales, m, k, ue8m0, scale_stride_m, scale_stride_g, stream); break;
      default: throw std::invalid_argument("deepseek_ops: group_size must be 32, 64 or 128");
    }
  });
}

void launch_silu_mul_quant_fp8(const void* h, FloatKind h_kind, void* act_fp8, float* scales, int64_t m, int64_t k,
                               bool ue8m0, int64_t scale_stride_m, int64_t scale_stride_g, cudaStream_t stream) {
  dispatch_float(h_kind, [&](auto tag) {
    launch_token_group<decltype(tag), 128, true>(h, act_fp8, scales, m, k, ue8m0, scale_stride_m, scale_stride_g,
                                                 stream);
  });
}

void launch_per_block_quant_fp8(const void* w, FloatKind w_kind, void* w_fp8, float* scales, int64_t n, int64_t k,
                                int64_t block_size, bool ue8m0, cudaStream_t stream) {
  if (block_size != 128) throw std::invalid_argument("deepseek_ops: block_size must be 128");
  const dim3 grid(static_cast<unsigned>(k / 128), static_cast<unsigned>(ceil_div<int64_t>(n, 128)));
  dispatch_float(w_kind, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bool(ue8m0, [&](auto ue) {
      sm90_per_block_quant_fp8_kernel<T, decltype(ue)::value><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(w), static_cast<uint8_t*>(w_fp8), scales, n, k);
    });
  });
  DSO_LAUNCH_CHECK();
}

void launch_dequant_fp8_block(const void* w_fp8, const float* scales, void* out, FloatKind out_kind, int64_t n,
                              int64_t k, int64_t block_size, int64_t scale_cols, cudaStream_t stream) {
  if (block_size != 128) throw std::invalid_argument("deepseek_ops: block_size must be 128");
  const int64_t grid = ceil_div<int64_t>(n * (k / 16), kThreads);
  dispatch_float(out_kind, [&](auto tag) {
    using T = decltype(tag);
    sm90_dequant_fp8_block_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(w_fp8), scales,
                                                                static_cast<T*>(out), n, k, scale_cols);
  });
  DSO_LAUNCH_CHECK();
}

}  // namespace dso
