// Memory-ordering fences.
#pragma once

namespace dso::ptx {

// PTX ISA 9.7.13.4 (membar/fence): order this thread's generic-proxy shared-memory writes before
// later async-proxy (TMA, wgmma) reads of them. Each writing thread issues it before the barrier.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// PTX ISA 9.7.13.4 (membar/fence): system-scope acquire-release fence (peer GPUs over NVLink).
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

}  // namespace dso::ptx
