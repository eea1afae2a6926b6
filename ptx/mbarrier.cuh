// Shared-memory mbarriers: the full/empty handshake of a TMA -> wgmma pipeline.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.13.15.9 (mbarrier.init): `count` arrivals complete each phase.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(addr), "r"(count) : "memory");
}

// PTX ISA 9.7.13.4 (fence.mbarrier_init): makes initialized barriers visible to the async proxy (TMA).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// PTX ISA 9.7.13.15.16 (mbarrier.try_wait): spins until the phase of parity `parity` has completed.
// A fresh barrier is in phase 0, so waiting on parity 1 returns at once (the "previous" phase).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}" ::"r"(addr),
      "r"(parity)
      : "memory");
}

// PTX ISA 9.7.13.15.16 (mbarrier.test_wait): whether the phase of parity `parity` has completed, without
// waiting (try_wait may suspend the thread); acquire semantics at CTA scope when it has.
__device__ __forceinline__ bool mbarrier_test_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}"
      : "=r"(done)
      : "r"(addr), "r"(parity)
      : "memory");
  return done != 0;
}

// PTX ISA 9.7.13.15.13 (mbarrier.arrive): one arrival, release semantics at CTA scope.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(addr) : "memory");
}

// PTX ISA 9.7.13.15.13 (mbarrier.arrive.expect_tx): one arrival that also expects `bytes` of TMA data.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(addr), "r"(bytes) : "memory");
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
