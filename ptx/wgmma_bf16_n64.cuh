// bf16 warpgroup MMA m64n64k16 (wgmma.mma_async, sm_90a), fp32 accumulators, A and B K-major in shared
// memory: the MLA decode score tile (64 query rows x one 64-token page). Accumulator layout as in
// wgmma_bf16.cuh: d[4j .. 4j + 3] = (row g, columns 8j + 2t, 8j + 2t + 1), then (row g + 8, same columns).
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.15.5.2 (wgmma.mma_async): D (+)= A B^T, m64n64k16, A and B K-major; scale_d = 0 overwrites D.
__device__ __forceinline__ void wgmma_m64n64k16_bf16_f32(float (&d)[32], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

}  // namespace dso::ptx
