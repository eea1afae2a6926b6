// Memory-ordering fences and acquire/release accesses.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.13.4 (membar/fence): order this thread's generic-proxy shared-memory writes before
// later async-proxy (TMA, wgmma) reads of them. Each writing thread issues it before the barrier.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// PTX ISA 9.7.13.4 (membar/fence): the same, for global memory written then read by TMA.
__device__ __forceinline__ void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

// PTX ISA 9.7.13.4 (membar/fence): system-scope acquire-release fence (peer GPUs over NVLink).
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// PTX ISA 9.7.13.4 (membar/fence): GPU-scope acquire-release fence.
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// PTX ISA 9.7.9.8 (ld): system-scope acquire load of a flag written by another GPU or process.
__device__ __forceinline__ int ld_acquire_sys(const int* ptr) {
  int v;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

// PTX ISA 9.7.9.10 (st): system-scope release store: every earlier write is visible before it.
__device__ __forceinline__ void st_release_sys(int* ptr, int v) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

// PTX ISA 9.7.9.8 (ld): GPU-scope acquire load.
__device__ __forceinline__ int ld_acquire_gpu(const int* ptr) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

// PTX ISA 9.7.9.10 (st): GPU-scope release store.
__device__ __forceinline__ void st_release_gpu(int* ptr, int v) {
  asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

}  // namespace dso::ptx
