// Tensor Memory Accelerator (TMA) bulk tensor copies.
#pragma once
#include <cstdint>

#include <cuda.h>

namespace dso::ptx {

// PTX ISA 9.7.9.25.5.1 (cp.async.bulk.tensor): loads the 2-D box at (inner, outer) of `tmap` into
// shared memory and signals `bar` with its byte count. Out-of-bounds elements are zero-filled and
// still counted, so the expected byte count is always the full box.
__device__ __forceinline__ void tma_load_2d(void* smem_dst, const CUtensorMap* tmap, uint64_t* bar, int32_t inner,
                                            int32_t outer) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const uint32_t mbar = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(mbar), "r"(inner), "r"(outer)
      : "memory");
}

// The same with an L2 eviction policy for the lines it reads (see cache_policy.cuh).
__device__ __forceinline__ void tma_load_2d(void* smem_dst, const CUtensorMap* tmap, uint64_t* bar, int32_t inner,
                                            int32_t outer, uint64_t l2_policy) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const uint32_t mbar = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(mbar), "r"(inner), "r"(outer), "l"(l2_policy)
      : "memory");
}

// PTX ISA 9.7.9.26 (prefetch.tensormap): pulls a __grid_constant__ descriptor into the cache early.
__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* tmap) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}

}  // namespace dso::ptx
