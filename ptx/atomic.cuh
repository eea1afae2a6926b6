// Atomics and reductions: ticket counters within a GPU, arrival counters shared with peer GPUs and
// processes (their plain scoped loads and stores: scoped_memory.cuh).
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.13.7 (red): system-scope release add: this thread's earlier writes (and those it
// observed, e.g. through a preceding bar.sync) are visible before the counter moves.
__device__ __forceinline__ void red_add_release_sys(int* ptr, int v) {
  asm volatile("red.release.sys.global.add.s32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

// PTX ISA 9.7.13.5 (atom): GPU-scope acquire-release add, returns the old value. Release: this
// thread's earlier writes (and those it observed, e.g. through a preceding bar.sync) are visible
// before the counter moves; acquire: what the earlier adders released is visible after it.
__device__ __forceinline__ int atom_add_acq_rel_gpu(int* ptr, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(ptr), "r"(v) : "memory");
  return old;
}

}  // namespace dso::ptx
