// Named CTA barriers (synchronize a subset of warps, one warpgroup, without stalling the rest) and the
// cluster barrier.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.13.1 (bar.sync): waits until `num_threads` threads (a multiple of 32) reached barrier `id`.
// Barrier 0 is __syncthreads(); callers use ids 1..15.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

// PTX ISA 9.7.13.1 (barrier.red.and): named_barrier_sync that also returns whether `pred` held in
// every one of the `num_threads` threads.
__device__ __forceinline__ bool named_barrier_sync_and(uint32_t id, uint32_t num_threads, bool pred) {
  uint32_t all;
  asm volatile(
      "{\n"
      ".reg .pred p, q;\n"
      "setp.ne.u32 p, %1, 0;\n"
      "barrier.red.and.pred q, %2, %3, p;\n"
      "selp.u32 %0, 1, 0, q;\n"
      "}"
      : "=r"(all)
      : "r"(static_cast<uint32_t>(pred)), "r"(id), "r"(num_threads)
      : "memory");
  return all != 0;
}

// PTX ISA 9.7.13.3 (barrier.cluster): every thread of every CTA of the cluster arrives (release: its
// earlier writes, e.g. mbarrier initialization, become visible to the cluster) and waits (acquire).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

}  // namespace dso::ptx
