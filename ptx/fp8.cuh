// FP8 (e4m3) conversions.
#pragma once
#include <cstdint>
#include <cuda_fp16.h>

namespace dso::ptx {

// PTX ISA 9.7.8.21 (cvt): two floats to a packed e4m3 pair, round-to-nearest-even, saturating
// to +-448. `lo` lands in the low byte, as a little-endian store of consecutive elements wants.
__device__ __forceinline__ uint16_t cvt_e4m3x2(float lo, float hi) {
  uint16_t packed;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
  return packed;
}

// PTX ISA 9.7.8.21 (cvt): a packed e4m3 pair to two halves (exact: every e4m3 is an f16).
__device__ __forceinline__ uint32_t cvt_e4m3x2_to_f16x2(uint16_t packed) {
  uint32_t halves;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(halves) : "h"(packed));
  return halves;
}

// A packed e4m3 pair to two floats (low byte first).
__device__ __forceinline__ float2 e4m3x2_to_float2(uint16_t packed) {
  const uint32_t halves = cvt_e4m3x2_to_f16x2(packed);
  return __half22float2(*reinterpret_cast<const __half2*>(&halves));
}

}  // namespace dso::ptx
