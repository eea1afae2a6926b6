// Warp-wide shared-memory matrix loads (ldmatrix, sm_75+) feeding mma.sync fragments.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.14.5.15 (ldmatrix): four 8x8 b16 matrices; lane i gives the row address of row i%8
// of matrix i/8, and register j receives this lane's pair of matrix j (the mma A/B fragment layout).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// PTX ISA 9.7.14.5.15 (ldmatrix): the same with each 8x8 matrix transposed (a K-major tile read
// as an N-major mma B operand).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

}  // namespace dso::ptx
