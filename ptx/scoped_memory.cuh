// Global loads and stores with a memory-model order and scope (relaxed or acquire, at system scope):
// flags and counters shared with peer GPUs and other processes.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.9.8 (ld): system-scope acquire load of a flag written by another GPU or process.
__device__ __forceinline__ int ld_acquire_sys(const int* ptr) {
  int v;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

// PTX ISA 9.7.9.8 (ld): system-scope relaxed load (an error flag another kernel may set).
__device__ __forceinline__ int ld_relaxed_sys(const int* ptr) {
  int v;
  asm volatile("ld.relaxed.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

// PTX ISA 9.7.9.10 (st): system-scope relaxed store.
__device__ __forceinline__ void st_relaxed_sys(int* ptr, int v) {
  asm volatile("st.relaxed.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

}  // namespace dso::ptx
