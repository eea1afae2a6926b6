// Thread-block clusters: a CTA's rank, barriers across the cluster, and arrivals on a peer CTA's mbarrier.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 10.x special register %cluster_ctarank: this CTA's rank in its cluster.
__device__ __forceinline__ uint32_t cluster_cta_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}

// PTX ISA 9.7.13.3 (barrier.cluster): every thread of every CTA of the cluster arrives (release: its
// earlier writes, e.g. mbarrier initialization, become visible to the cluster) and waits (acquire).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// PTX ISA 9.7.13.15.13 (mbarrier.arrive, shared::cluster): one arrival on the mbarrier at the same
// shared-memory offset as `bar` in the CTA of rank `cta_rank` (mapa translates the address).
// NOTE: default semantics (release at CTA scope), as CUTLASS's ClusterBarrier: what the arrival
// publishes is that this warp's wgmma and scale reads of a stage are complete, and the peer only
// overwrites the stage with TMA. `.release.cluster` compiles to a GPU-scope MEMBAR before every
// arrival, which cost a third of the GEMM's time on an H100.
__device__ __forceinline__ void mbarrier_arrive_cluster(uint64_t* bar, uint32_t cta_rank) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}" ::"r"(addr),
      "r"(cta_rank)
      : "memory");
}

}  // namespace dso::ptx
