// Warp-level tensor-core MMA (mma.sync, sm_80+).
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.14.5.14 (mma): D += A * B, m16n8k16, A row-major / B column-major bf16, fp32 accumulators.
// Fragments: a[4] (rows g, g+8 x k pairs), b[2] (k pairs x column g), d[4] = rows g, g+8 x columns 2t, 2t+1.
__device__ __forceinline__ void mma_m16n8k16_bf16_f32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                      uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace dso::ptx
