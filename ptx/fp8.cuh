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

// PTX ISA 9.7.9.7 (prmt, default mode): byte i of the result is byte sel[4i+2:4i] of {b, a}, or, when
// selector bit 4i+3 is set, that byte's sign bit replicated.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// Two e4m3 (bytes 2 * `pair` and 2 * `pair` + 1 of `quad`) as a bf16 pair times 2^-120, by moving bits
// instead of through the conversion unit: e4m3 and bf16 both lay out sign | exponent | mantissa, with
// exponent biases 7 and 127, so e4m3's 7 exponent-and-mantissa bits placed at bf16's exponent LSB give
// the same value times 2^-120, subnormals included. Exact for every finite e4m3; NaN (S.1111.111) is not
// kept (it becomes 480 * 2^-120).
template <int kPair>
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2_times_2m120(uint32_t quad) {
  static_assert(kPair == 0 || kPair == 1, "a 32-bit word holds two pairs");
  // Bytes (sign-replicated hi, hi, sign-replicated lo, lo) then shifted by 4: each half is then
  // sign | ... | 7 bits at 4..10; the mask keeps those.
  constexpr uint32_t kSel = kPair == 0 ? 0x9180 : 0xB3A2;
  return (prmt(quad, 0, kSel) << 4) & 0x87f087f0u;
}

}  // namespace dso::ptx
