// Asynchronous global -> shared copies (cp.async, sm_80+), and their commit/wait groups.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.9.25.3 (cp.async): 16-byte copy that bypasses L1 (.cg). Only `src_bytes` (0 or 16)
// bytes are read; the rest of the 16 is zero-filled, so src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_cg_16(void* smem_dst, const void* gmem_src, uint32_t src_bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

// PTX ISA 9.7.9.25.3 (cp.async): 4-byte copy through L1 (.ca), for scattered scalars such as scales.
__device__ __forceinline__ void cp_async_ca_4(void* smem_dst, const void* gmem_src) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(gmem_src) : "memory");
}

// PTX ISA 9.7.9.25.4 (cp.async.commit_group): closes the group of this thread's cp.async issued so far.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// PTX ISA 9.7.9.25.5 (cp.async.wait_group): waits until at most kPending groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(kPending >= 0 && kPending <= 8, "cp.async.wait_group takes a small immediate");
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// PTX ISA, cp.async.mbarrier.arrive (without .noinc): the mbarrier's current phase also waits
// for every cp.async this thread issued so far. It adds a pending arrival now and arrives when they land,
// so the barrier's expected count stays as it is (the thread still arrives on it as usual).
__device__ __forceinline__ void cp_async_mbarrier_arrive(uint64_t* bar) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];" ::"r"(addr) : "memory");
}

}  // namespace dso::ptx
