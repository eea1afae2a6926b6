// Special registers read with mov: the global clock (bounded spin-waits), the grid's launch number and
// a CTA's rank in its cluster.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 10.24 (%globaltimer): nanoseconds, the same clock on every SM (timeouts across SMs).
__device__ __forceinline__ uint64_t read_globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// PTX ISA 10.10 (%gridid): the temporal launch number of this grid, distinct for every grid launched
// in the context (hence among grids running at the same time).
__device__ __forceinline__ uint64_t read_gridid() {
  uint64_t id;
  asm volatile("mov.u64 %0, %%gridid;" : "=l"(id));
  return id;
}

// PTX ISA 10.19 (%cluster_ctarank): this CTA's rank in its cluster.
__device__ __forceinline__ uint32_t read_cluster_ctarank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}

}  // namespace dso::ptx
