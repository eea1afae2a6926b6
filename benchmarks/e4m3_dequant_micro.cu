// Microbenchmark of the e4m3 -> bf16 conversion sequences the MLA decode's FP8 cache can use (issue 19),
// no torch. Each thread repeats what a dequantizing thread does per 16-value chunk: one 16-byte shared
// load, the conversion, two 16-byte shared stores (swizzled, no bank conflict), so the figure includes
// the memory instructions the kernel pairs with the conversion.
//
//   fp32     e4m3x2 -> f16x2 (F2FP), -> 2 f32 (HADD2.F32), 2 FMUL by the scale, pack (F2FP): exact for
//            any scale (the kernel's path today).
//   bits     bit moves only (LOP3, PRMT, shifts) to e4m3 * 2^-120 as bf16, then 2 HMUL2.BF16 by powers
//            of two: exact for power-of-two scales (NaN bytes need a separate check, not timed here).
//   f16bits  F2FP to f16x2, its bits shifted into bf16 (e4m3 * 2^-112), 1 HMUL2.BF16 (scales <= 2^15).
//   f32pack  F2FP, HADD2.F32, pack (no FMUL), 1 HMUL2.BF16 by the power of two.
// Every variant is checked against fp32 on all 256 bytes (NaN bytes excluded) and scales 2^-22 .. 2^7.
// Printed: ns per 64-token page (2048 chunks) for one SM, with 1, 3, 8 and 12 warps converting.
//
// Exit status 1 if a variant mismatches fp32.
//
// Build and run (from the repository root; any sm_90 GPU):
//   nvcc -std=c++20 -O3 -gencode arch=compute_90a,code=sm_90a -Iptx -Icsrc benchmarks/e4m3_dequant_micro.cu \
//        -o e4m3_dequant_micro && ./e4m3_dequant_micro
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "common.h"
#include "fp8.cuh"

enum Variant { kFp32, kBits, kF16Bits, kF32Pack, kNumVariants };
static const char* kNames[kNumVariants] = {"fp32", "bits", "f16bits", "f32pack"};

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t x, uint32_t y) {
  const __nv_bfloat162 p = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&x), *reinterpret_cast<const __nv_bfloat162*>(&y));
  return *reinterpret_cast<const uint32_t*>(&p);
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&b);
}

// 16 e4m3 -> 8 bf16x2 words. `scale` = 2^k; f1 * f2 = 2^(120 + k), f16 = 2^(112 + k), fk = 2^k (bf16x2).
template <Variant V>
__device__ __forceinline__ void convert(const uint4 raw, float scale, uint32_t f1, uint32_t f2, uint32_t f16,
                                        uint32_t fk, uint32_t (&out)[8]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t x = words[w];
    if constexpr (V == kBits) {
      const uint32_t magnitude = x & 0x7f7f7f7fu, sign = (x >> 4) & 0x08080808u;
      out[2 * w] = bf16x2_mul(bf16x2_mul(__byte_perm(magnitude, sign, 0x5140) << 4, f1), f2);
      out[2 * w + 1] = bf16x2_mul(bf16x2_mul(__byte_perm(magnitude, sign, 0x7362) << 4, f1), f2);
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint16_t pair = static_cast<uint16_t>(x >> (16 * h));
        if constexpr (V == kFp32) {
          const float2 v = dso::ptx::e4m3x2_to_float2(pair);
          out[2 * w + h] = pack_bf16x2(v.x * scale, v.y * scale);
        } else if constexpr (V == kF16Bits) {
          const uint32_t halves = dso::ptx::cvt_e4m3x2_to_f16x2(pair);
          const uint32_t bits = ((halves & 0x7fff7fffu) >> 3) | (halves & 0x80008000u);
          out[2 * w + h] = bf16x2_mul(bits, f16);  // one factor: 2^(112 + k) is a bf16 for k <= 15
        } else {
          const float2 v = dso::ptx::e4m3x2_to_float2(pair);
          out[2 * w + h] = bf16x2_mul(pack_bf16x2(v.x, v.y), fk);
        }
      }
    }
  }
}

__device__ __forceinline__ void factors(int k, float& scale, uint32_t& f1, uint32_t& f2, uint32_t& f16, uint32_t& fk) {
  scale = ldexpf(1.0f, k);
  const uint32_t a = min(127 + 120 + k, 254), b = max(127 + k, 134) - 7;
  f1 = (a << 7) * 0x10001u, f2 = (b << 7) * 0x10001u;
  f16 = static_cast<uint32_t>(127 + 112 + k) << 7 | static_cast<uint32_t>(127 + 112 + k) << 23;
  fk = static_cast<uint32_t>(127 + k) << 7 | static_cast<uint32_t>(127 + k) << 23;
}

// Every non-NaN byte at scales 2^-22 .. 2^7: mismatches of each variant against fp32, bitwise.
__global__ void check_kernel(int* mismatches) {
  const int k = static_cast<int>(threadIdx.x) - 22;  // 30 threads
  if (k > 7) return;
  float scale;
  uint32_t f1, f2, f16, fk;
  factors(k, scale, f1, f2, f16, fk);
  for (int base = 0; base < 256; base += 16) {
    uint8_t bytes[16];
    for (int i = 0; i < 16; ++i) bytes[i] = ((base + i) & 0x7f) == 0x7f ? 0 : base + i;
    uint4 raw;
    memcpy(&raw, bytes, 16);
    uint32_t ref[8], out[8];
    convert<kFp32>(raw, scale, f1, f2, f16, fk, ref);
    convert<kBits>(raw, scale, f1, f2, f16, fk, out);
    for (int i = 0; i < 8; ++i) atomicAdd(&mismatches[kBits], out[i] != ref[i]);
    convert<kF16Bits>(raw, scale, f1, f2, f16, fk, out);
    for (int i = 0; i < 8; ++i) atomicAdd(&mismatches[kF16Bits], out[i] != ref[i]);
    convert<kF32Pack>(raw, scale, f1, f2, f16, fk, out);
    for (int i = 0; i < 8; ++i) atomicAdd(&mismatches[kF32Pack], out[i] != ref[i]);
  }
}

constexpr int kIters = 2048;  // chunks per thread

template <Variant V>
__global__ void bench_kernel(const uint4* input, uint32_t* sink) {
  __shared__ __align__(16) uint8_t smem[3 * 8192];  // raw block, then two output blocks
  for (int i = threadIdx.x; i < 8192 / 16; i += blockDim.x) reinterpret_cast<uint4*>(smem)[i] = input[i];
  __syncthreads();
  float scale;
  uint32_t f1, f2, f16, fk;
  factors(-3, scale, f1, f2, f16, fk);
  const int row = threadIdx.x % 64, lane_chunk = threadIdx.x / 64 % 8;
  uint32_t acc = 0;
#pragma unroll 1
  for (int it = 0; it < kIters; ++it) {
    const int chunk = (lane_chunk + it) & 7;
    const uint4 raw = *reinterpret_cast<const uint4*>(smem + row * 128 + ((chunk ^ row) & 7) * 16);
    uint32_t out[8];
    convert<V>(raw, scale, f1, f2, f16, fk, out);
    uint8_t* dst = smem + 8192 + (chunk & 1) * 8192 + row * 128;
    *reinterpret_cast<uint4*>(dst + ((chunk ^ row) & 7) * 16) = make_uint4(out[0], out[1], out[2], out[3]);
    *reinterpret_cast<uint4*>(dst + (((chunk + 4) ^ row) & 7) * 16) = make_uint4(out[4], out[5], out[6], out[7]);
    acc ^= out[0];
  }
  if (acc == 0x12345678u) sink[threadIdx.x] = acc;  // keeps the loop
}

template <Variant V>
float time_variant(int warps, const uint4* input, uint32_t* sink, int num_sms) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  bench_kernel<V><<<num_sms, warps * 32>>>(input, sink);  // warm-up
  float best = 1e30f;
  for (int rep = 0; rep < 5; ++rep) {
    cudaEventRecord(start);
    bench_kernel<V><<<num_sms, warps * 32>>>(input, sink);
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms;
    cudaEventElapsedTime(&ms, start, stop);
    best = ms < best ? ms : best;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  // chunks one SM converted = warps * 32 * kIters; a page is 2048 chunks.
  return best * 1e6f / (static_cast<float>(warps) * 32 * kIters / 2048);
}

int main() {
  int device = 0, num_sms = 0;
  DSO_CUDA_CHECK(cudaGetDevice(&device));
  DSO_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  int* mismatches;
  DSO_CUDA_CHECK(cudaMallocManaged(&mismatches, kNumVariants * sizeof(int)));
  memset(mismatches, 0, kNumVariants * sizeof(int));
  check_kernel<<<1, 32>>>(mismatches);
  DSO_CUDA_CHECK(cudaDeviceSynchronize());
  int total_mismatches = 0;
  for (int v = 1; v < kNumVariants; ++v) {
    std::printf("check %-8s %d mismatching words\n", kNames[v], mismatches[v]);
    total_mismatches += mismatches[v];
  }

  uint4* input;
  uint32_t* sink;
  DSO_CUDA_CHECK(cudaMalloc(&input, 8192));
  DSO_CUDA_CHECK(cudaMalloc(&sink, 4096));
  uint8_t host[8192];
  for (int i = 0; i < 8192; ++i) host[i] = static_cast<uint8_t>((i * 37 + 11) & 0x7e);  // no NaN byte
  DSO_CUDA_CHECK(cudaMemcpy(input, host, 8192, cudaMemcpyHostToDevice));
  std::printf("ns per 64-token page (2048 chunks of 16 values) on one SM:\n%-8s", "warps");
  const int warp_counts[] = {1, 3, 8, 12};
  for (int w : warp_counts) std::printf(" %8d", w);
  std::printf("\n");
  for (int v = 0; v < kNumVariants; ++v) {
    std::printf("%-8s", kNames[v]);
    for (int w : warp_counts) {
      float ns = 0;
      switch (v) {
        case kFp32: ns = time_variant<kFp32>(w, input, sink, num_sms); break;
        case kBits: ns = time_variant<kBits>(w, input, sink, num_sms); break;
        case kF16Bits: ns = time_variant<kF16Bits>(w, input, sink, num_sms); break;
        default: ns = time_variant<kF32Pack>(w, input, sink, num_sms); break;
      }
      std::printf(" %8.0f", ns);
    }
    std::printf("\n");
  }
  DSO_CUDA_CHECK(cudaGetLastError());
  return total_mismatches == 0 ? 0 : 1;
}
