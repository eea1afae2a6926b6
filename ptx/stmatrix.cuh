// stmatrix: a warp writes 8 x 8 tiles of 16-bit values from the MMA fragment layout to shared memory.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.14.5.16 (stmatrix): four 8 x 8 b16 matrices. Register i of lane t holds row t / 4,
// columns 2 (t % 4) and 2 (t % 4) + 1 of matrix i (the wgmma accumulator fragment of 8 columns);
// lane t gives the shared-memory address of row t % 8 of matrix t / 8 (16 contiguous bytes).
__device__ __forceinline__ void stmatrix_x4(void* smem_row, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

// PTX ISA 9.7.14.5.16 (stmatrix): two 8 x 8 b16 matrices (lanes 0-15 give the row addresses).
__device__ __forceinline__ void stmatrix_x2(void* smem_row, uint32_t r0, uint32_t r1) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("stmatrix.sync.aligned.m8n8.x2.shared.b16 [%0], {%1, %2};" ::"r"(addr), "r"(r0), "r"(r1) : "memory");
}

}  // namespace dso::ptx
