// Non-tensor bulk operations (cp.async.bulk family, sm_90): contiguous global bytes through the TMA
// engine, no tensor map.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.9.25.4.3 (cp.async.bulk.prefetch.L2): starts pulling `bytes` (a multiple of 16, 16-byte
// aligned) of global memory into L2; nothing waits for it.
__device__ __forceinline__ void bulk_prefetch_l2(const void* gmem_src, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(gmem_src), "r"(bytes) : "memory");
}

}  // namespace dso::ptx
