// Global-memory vector loads and stores with cache hints (scoped, ordered ones: scoped_memory.cuh).
#pragma once
#include <cstdint>

namespace dso::ptx {

// PTX ISA 9.7.9.8 (ld): 16-byte read-only load that skips L1 (streamed once, never re-read).
__device__ __forceinline__ int4 ld_nc_na_v4(const void* ptr) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// The same, and L2 fetches the whole 256-byte block around it: the neighbouring loads of a streamed
// record then hit L2.
__device__ __forceinline__ int4 ld_nc_na_l2_256_v4(const void* ptr) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// PTX ISA 9.7.9.10 (st): 16-byte streaming store (.cs: evict-first, the data is not read again soon).
__device__ __forceinline__ void st_cs_v4(void* ptr, int4 v) {
  asm volatile("st.global.cs.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// PTX ISA 9.7.9.10 (st): 8-byte streaming store.
__device__ __forceinline__ void st_cs_v2(void* ptr, int2 v) {
  asm volatile("st.global.cs.v2.s32 [%0], {%1, %2};" ::"l"(ptr), "r"(v.x), "r"(v.y) : "memory");
}

}  // namespace dso::ptx
