// Tensor Memory Accelerator (TMA) bulk tensor copies.
#pragma once
#include <cstdint>

#include <cuda.h>

namespace dso::ptx {

// PTX ISA 9.7.9.25.5.1 (cp.async.bulk.tensor): loads the 2-D box at (inner, outer) of `tmap` into
// shared memory and signals `bar` with its byte count. Out-of-bounds elements are zero-filled and
// still counted, so the expected byte count is always the full box.
__device__ __forceinline__ void tma_load_2d(void* smem_dst, const CUtensorMap* tmap, uint64_t* bar, int32_t inner,
                                            int32_t outer) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const uint32_t mbar = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(mbar), "r"(inner), "r"(outer)
      : "memory");
}

// The same for a 3-D tensor map: the box at (inner, outer, depth).
__device__ __forceinline__ void tma_load_3d(void* smem_dst, const CUtensorMap* tmap, uint64_t* bar, int32_t inner,
                                            int32_t outer, int32_t depth) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const uint32_t mbar = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}],"
      " [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(mbar), "r"(inner), "r"(outer), "r"(depth)
      : "memory");
}

// The same with an L2 eviction policy for the lines it reads (see cache_policy.cuh).
__device__ __forceinline__ void tma_load_2d(void* smem_dst, const CUtensorMap* tmap, uint64_t* bar, int32_t inner,
                                            int32_t outer, uint64_t l2_policy) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const uint32_t mbar = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(mbar), "r"(inner), "r"(outer), "l"(l2_policy)
      : "memory");
}

// The same, multicast: the box lands at the same shared-memory offset in every CTA of the cluster
// whose bit is set in `cta_mask`, and signals the mbarrier at `bar`'s offset in each of them.
__device__ __forceinline__ void tma_load_2d_multicast(void* smem_dst, const CUtensorMap* tmap, uint64_t* bar,
                                                      int32_t inner, int32_t outer, uint16_t cta_mask) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const uint32_t mbar = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(mbar), "r"(inner), "r"(outer), "h"(cta_mask)
      : "memory");
}

// PTX ISA 9.7.9.26 (prefetch.tensormap): pulls a __grid_constant__ descriptor into the cache early.
__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* tmap) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}

// PTX ISA 9.7.9.25.5.2 (cp.async.bulk.tensor, shared -> global): stores the 2-D box at (inner, outer)
// of `tmap` from shared memory as one bulk async-group member. Elements outside the tensor are not
// written. The source must stay unmodified until tma_store_wait_read says it has been read.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* tmap, const void* smem_src, int32_t inner,
                                             int32_t outer) {
  const uint32_t src = static_cast<uint32_t>(__cvta_generic_to_shared(smem_src));
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(tmap)),
               "r"(src), "r"(inner), "r"(outer)
               : "memory");
}

// The same for a 3-D tensor map: the box at (inner, outer, depth).
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* tmap, const void* smem_src, int32_t inner,
                                             int32_t outer, int32_t depth) {
  const uint32_t src = static_cast<uint32_t>(__cvta_generic_to_shared(smem_src));
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(tmap)),
               "r"(src), "r"(inner), "r"(outer), "r"(depth)
               : "memory");
}

// PTX ISA, cp.reduce.async.bulk.tensor (.add): adds the 3-D box at (inner, outer, depth) of
// shared memory into global memory element by element (the add happens at L2; the SM reads nothing
// of the destination), as one bulk async-group member. Clipped and awaited as tma_store_3d.
__device__ __forceinline__ void tma_reduce_add_3d(const CUtensorMap* tmap, const void* smem_src, int32_t inner,
                                                  int32_t outer, int32_t depth) {
  const uint32_t src = static_cast<uint32_t>(__cvta_generic_to_shared(smem_src));
  asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(tmap)),
               "r"(src), "r"(inner), "r"(outer), "r"(depth)
               : "memory");
}

// PTX ISA 9.7.9.25.6.1 (cp.async.bulk.commit_group): closes the bulk async-group of the stores so far.
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// PTX ISA 9.7.9.25.6.2 (cp.async.bulk.wait_group.read): waits until at most kPending bulk groups of
// this thread still read their shared-memory source (the global writes may still be in flight).
template <int kPending>
__device__ __forceinline__ void tma_store_wait_read() {
  static_assert(kPending >= 0 && kPending <= 7, "cp.async.bulk.wait_group takes a small immediate");
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}

}  // namespace dso::ptx
