// Warpgroup-wide register reallocation (producer/consumer specialization). Every thread of the
// warpgroup must execute these (.sync.aligned), hence namespace warpgroup.
#pragma once
#include <cstdint>

namespace dso::ptx::warpgroup {

// PTX ISA 9.7.17.1 (setmaxnreg): raises this warpgroup's per-thread register limit to kRegs.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg takes a multiple of 8 in [24, 256]");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// PTX ISA 9.7.17.1 (setmaxnreg): lowers this warpgroup's per-thread register limit to kRegs.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg takes a multiple of 8 in [24, 256]");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

}  // namespace dso::ptx::warpgroup
