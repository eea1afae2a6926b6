// Programmatic dependent launch (PDL): a kernel launched with the programmatic stream
// serialization attribute may start while the previous kernel of its stream is still running.
#pragma once

namespace dso::ptx {

// PTX ISA 9.7.13 (griddepcontrol): blocks until every prerequisite grid has completed and its
// memory operations are visible. Returns at once in a kernel launched without the PDL attribute.
__device__ __forceinline__ void griddep_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// PTX ISA 9.7.13 (griddepcontrol): the dependent grid (launched with the PDL attribute) may start
// once every block of this grid has issued this or exited. It says nothing about memory: the
// dependent still calls griddep_wait before it reads what this grid writes.
__device__ __forceinline__ void griddep_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

}  // namespace dso::ptx
