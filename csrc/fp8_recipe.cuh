// The FP8 recipe of DeepSeek-V3, the one device home of its numbers and its rounding (Python:
// deepseek_ops/constants.py). Every quantizing kernel (csrc/sm90_fp8_quant.cu, the MLA cache writes
// in csrc/sm90_mla_cache.cu, always UE8M0) goes through these, so all of them are bit-identical to
// deepseek_ops/reference.py:
//   scale = max(amax, floor) / 448, an IEEE fp32 division (UE8M0: then rounded up to a power of two),
//   floor = 1e-12 (the MLA cache: 1e-4, part of its format; csrc/sm90_mla_cache.h);
//   e4m3  = cvt.rn.satfinite(x * (1 / scale)), the reciprocal and the product each rounded to nearest.
// NOTE: values multiply by the reciprocal rather than divide: an IEEE division per element costs
// ~20 instructions, enough to make the activation quantizer issue-bound.
#pragma once
#include <cstdint>

#include "fp8.cuh"

namespace dso {

constexpr float kFp8Max = 448.0f;        // largest finite e4m3
// An all-zero group still gets a positive scale; below any gradient's amax (why: FP8_SCALE_FLOOR in
// deepseek_ops/constants.py).
constexpr float kFp8ScaleFloor = 1e-12f;

// Scale of a group from its amax; UE8M0 rounds it up to the next power of two, exactly.
template <bool kUE8M0 = false>
__device__ __forceinline__ float fp8_scale_from_amax(float amax, float floor = kFp8ScaleFloor) {
  float scale = __fdiv_rn(fmaxf(amax, floor), kFp8Max);
  if constexpr (kUE8M0) {
    uint32_t bits = __float_as_uint(scale);
    if (bits & 0x7fffffu) bits = (bits & 0x7f800000u) + 0x800000u;
    scale = __uint_as_float(bits);
  }
  return scale;
}

// 1 / scale, rounded to nearest: what fp8_quantize_x2 multiplies by.
__device__ __forceinline__ float fp8_inverse_scale(float scale) { return __frcp_rn(scale); }

// Two values to a packed e4m3 pair (`lo` in the low byte), given fp8_inverse_scale(scale).
__device__ __forceinline__ uint16_t fp8_quantize_x2(float lo, float hi, float inv_scale) {
  return ptx::cvt_e4m3x2(__fmul_rn(lo, inv_scale), __fmul_rn(hi, inv_scale));
}

}  // namespace dso
