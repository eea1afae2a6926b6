// Warpgroup MMA (wgmma): the operand descriptors, the Wgmma<Type, N> template whose specializations
// (one wgmma.mma_async per N) ptx/gen_wgmma.py generates into wgmma_<type>.cuh, and the
// issue/commit/wait bookkeeping a whole warpgroup runs (namespace warpgroup).
#pragma once
#include <cstdint>

namespace dso::ptx {

// Which dimension of an operand tile is contiguous in shared memory.
enum class Major : int { kK = 0, kMN = 1 };

// Wgmma<Type, N>::mma(d, desc_a, desc_b, scale_d): D[64 x N] (+)= A B for one warpgroup, operands of
// element type Type (e.g. __nv_bfloat16) in shared memory; kNumAccum fp32 registers a thread.
template <typename Type, int N>
struct Wgmma;

// Pins an accumulator register across wgmma issue/wait: the compiler may not move reads or writes
// of it past this point (wgmma writes registers asynchronously, invisible to the compiler).
__device__ __forceinline__ void wgmma_fence_operand(float& reg) { asm volatile("" : "+f"(reg)::"memory"); }

// PTX ISA 9.7.15.5.1.2 (matrix descriptor): a K-major tile stored with the 128-byte swizzle, i.e.
// rows of exactly 128 bytes, 16-byte chunks XOR-ed with (row % 8), 8-row atoms of 1024 bytes
// (what a TMA load with CU_TENSOR_MAP_SWIZZLE_128B writes). The tile base must be 1024-byte aligned
// (base offset 0); stepping along K inside the 128-byte row just adds bytes to the start address.
//   bits  0-13: start address >> 4      bits 16-29: leading byte offset >> 4 (unused here: 1)
//   bits 32-45: stride byte offset >> 4 (1024 B between 8-row atoms)
//   bits 49-51: base offset (0)         bits 62-63: layout (1 = 128-byte swizzle)
__device__ __forceinline__ uint64_t make_smem_desc_sw128(const void* smem_ptr) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  uint64_t desc = static_cast<uint64_t>((addr & 0x3FFFFu) >> 4);
  desc |= static_cast<uint64_t>(1) << 16;
  desc |= static_cast<uint64_t>(1024 >> 4) << 32;
  desc |= static_cast<uint64_t>(1) << 62;
  return desc;
}

// PTX ISA 9.7.15.5.1.2 (matrix descriptor): a 128-byte-swizzled tile (1024-byte aligned base, rows of
// 128 bytes with chunks XOR-ed by row % 8) with explicit byte offsets, for MN-major operands:
// LBO = bytes between 64-element MN blocks, SBO = bytes between 8-row K groups.
__device__ __forceinline__ uint64_t make_smem_desc_sw128_mn(const void* smem_ptr, uint32_t lbo_bytes,
                                                           uint32_t sbo_bytes) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  uint64_t desc = static_cast<uint64_t>((addr & 0x3FFFFu) >> 4);
  desc |= static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16;
  desc |= static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32;
  desc |= static_cast<uint64_t>(1) << 62;
  return desc;
}

// A descriptor's start address moved by `bytes` (a multiple of 16: the field counts 16-byte units),
// e.g. to the next K step inside a swizzled row. Per thread: no warpgroup-wide effect.
__device__ __forceinline__ uint64_t smem_desc_advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

namespace warpgroup {

// PTX ISA 9.7.15.5.1 (wgmma.fence): orders earlier register/shared accesses before the next wgmma.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }

// PTX ISA 9.7.15.5.2 (wgmma.commit_group): closes the group of wgmma issued so far.
__device__ __forceinline__ void wgmma_commit_group() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }

// PTX ISA 9.7.15.5.3 (wgmma.wait_group): waits until at most kPending groups are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait_group() {
  static_assert(kPending >= 0 && kPending <= 7, "wgmma.wait_group takes 0..7");
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// wgmma_fence_operand on every accumulator register: after a wgmma_wait_group (reads of d may not
// move above it) and before the next issue (writes of d may not move below it).
template <int kN>
__device__ __forceinline__ void fence_accumulators(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) wgmma_fence_operand(d[i]);
}

}  // namespace warpgroup
}  // namespace dso::ptx
