// Non-tensor bulk copies (cp.async.bulk, sm_90): contiguous global bytes -> shared memory via the TMA
// engine, completion counted in bytes on an mbarrier (no tensor map, no swizzle).
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.9.25.4.1 (cp.async.bulk): copies `bytes` (a multiple of 16; both addresses 16-byte
// aligned) from global to shared memory and signals `bar` with complete_tx of `bytes`.
__device__ __forceinline__ void bulk_load(void* smem_dst, const void* gmem_src, uint32_t bytes, uint64_t* bar) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const uint32_t mbar = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
               "l"(gmem_src), "r"(bytes), "r"(mbar)
               : "memory");
}

// The same with an L2 eviction policy for the lines it reads (see cache_policy.cuh).
__device__ __forceinline__ void bulk_load(void* smem_dst, const void* gmem_src, uint32_t bytes, uint64_t* bar,
                                          uint64_t l2_policy) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const uint32_t mbar = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::
          "r"(dst),
      "l"(gmem_src), "r"(bytes), "r"(mbar), "l"(l2_policy)
      : "memory");
}

}  // namespace dso::ptx
