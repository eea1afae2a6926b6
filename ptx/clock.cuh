// Clocks for bounded spin-waits.
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 10.24 (%globaltimer): nanoseconds, the same clock on every SM (timeouts across SMs).
__device__ __forceinline__ uint64_t read_globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace dso::ptx
