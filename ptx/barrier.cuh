// Named CTA barriers: synchronize a subset of warps (one warpgroup) without stalling the rest.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.13.1 (bar.sync): waits until `num_threads` threads (a multiple of 32) reached barrier `id`.
// Barrier 0 is __syncthreads(); callers use ids 1..15.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

}  // namespace dso::ptx
