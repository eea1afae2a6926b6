// FP8 GEMM with DeepSeek-V3 fine-grained scaling on Hopper: d = (a * sa) @ (b * sb)^T (+ c).
//
// One kernel template serves the dense GEMM and both grouped (MoE) layouts; only the tile
// scheduler differs (sm90_fp8_gemm_scheduler.cuh). Per CTA (persistent, one per SM):
//   - a producer warpgroup, one thread of which issues TMA loads of A [BLOCK_M x 128],
//     B [BLOCK_N x 128] (128-byte swizzle) and A's scales [BLOCK_M] into a ring of kNumStages
//     shared-memory stages guarded by full/empty mbarriers;
//   - BLOCK_M / 64 consumer warpgroups, each owning 64 rows: per 128-wide K block, 4 wgmma
//     m64nBLOCK_Nk32 into a fresh fp32 accumulator, then promotion on CUDA cores,
//     final += acc * a_scale[row] * b_scale[column block] (the tensor cores keep ~14 mantissa
//     bits of an FP8 product sum, so sums longer than 128 are formed in real fp32);
//   - an epilogue through padded shared memory and 16-byte coalesced global stores, bounded by
//     the valid rows of the tile (and N), optionally adding c (fp32 output).
#include <cuda.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include "barrier.cuh"
#include "cache_policy.cuh"
#include "common.h"
#include "cp_async.cuh"
#include "mbarrier.cuh"
#include "sm90_fp8_gemm.h"
#include "sm90_fp8_gemm_scheduler.cuh"
#include "tensor_map.h"
#include "tma.cuh"
#include "warpgroup.cuh"
#include "wgmma.cuh"
#include "wgmma_e4m3.cuh"

namespace dso::gemm {

constexpr int BLOCK_K = 128;  // one scale per 128 K: a K block is exactly one scale block
constexpr int kWarpgroupThreads = 128;
// Registers per thread after setmaxnreg (BLOCK_M = 128, 384 threads start with 168 each): the
// producer needs few; consumers hold two fp32 accumulators of BLOCK_N / 2 each.
// 128 x 40 + 256 x 232 = 64512 <= 65536. With BLOCK_M = 64 (256 threads) every thread may
// already have 255 registers, so that variant does not reallocate.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;

// B's 128-row scale blocks a BLOCK_N-wide tile can touch: tile starts are multiples of
// gcd(BLOCK_N, 128), so at most two blocks when BLOCK_N - gcd(BLOCK_N, 128) <= 128.
constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }
constexpr bool block_n_supported(int block_n) {
  return block_n % 16 == 0 && block_n >= 16 && block_n <= 256 && block_n - gcd(block_n, 128) <= 128;
}

// Shared-memory layout, computed identically on host and device.
template <int BLOCK_M, int BLOCK_N, bool kOutFp32>
struct SmemLayout {
  static constexpr int kNumMathWarpgroups = BLOCK_M / 64;
  static constexpr int kABytes = BLOCK_M * BLOCK_K;  // e4m3: one byte an element
  static constexpr int kBBytes = BLOCK_N * BLOCK_K;
  static constexpr int kSfaBytes = BLOCK_M * 4;
  static constexpr int kStageTxBytes = kABytes + kBBytes + kSfaBytes;
  // Rows padded by 16 bytes: the 8 rows a warp writes at once land on distinct banks.
  static constexpr int kDRowBytes = BLOCK_N * (kOutFp32 ? 4 : 2) + 16;
  static constexpr int kDBytesPerWarpgroup = 64 * kDRowBytes;

  int num_stages, num_k_blocks;
  __host__ __device__ constexpr int a_offset(int stage) const { return stage * kABytes; }
  __host__ __device__ constexpr int b_offset(int stage) const { return num_stages * kABytes + stage * kBBytes; }
  __host__ __device__ constexpr int sfa_offset(int stage) const {
    return num_stages * (kABytes + kBBytes) + stage * kSfaBytes;
  }
  __host__ __device__ constexpr int d_offset() const { return num_stages * kStageTxBytes; }
  // Per consumer warpgroup, two buffers (this tile, next tile) of [2 column blocks][num_k_blocks].
  __host__ __device__ constexpr int sfb_offset() const { return d_offset() + kNumMathWarpgroups * kDBytesPerWarpgroup; }
  __host__ __device__ constexpr int sfb_floats_per_buffer() const { return 2 * num_k_blocks; }
  __host__ __device__ constexpr int barrier_offset() const {
    return (sfb_offset() + kNumMathWarpgroups * 2 * sfb_floats_per_buffer() * 4 + 7) / 8 * 8;
  }
  __host__ __device__ constexpr int total_bytes() const { return barrier_offset() + 2 * num_stages * 8; }
};

template <int BLOCK_M, int BLOCK_N, GemmType kType, bool kOutFp32>
struct Kernel {
  static_assert(BLOCK_M == 64 || BLOCK_M == 128, "BLOCK_M is 64 (one consumer warpgroup) or 128 (two)");
  static_assert(block_n_supported(BLOCK_N), "BLOCK_N: a multiple of 16 whose tiles touch <= 2 scale blocks");
  using Layout = SmemLayout<BLOCK_M, BLOCK_N, kOutFp32>;
  using Mma = ptx::WgmmaE4M3<BLOCK_N>;
  static constexpr int kNumMathWarpgroups = Layout::kNumMathWarpgroups;
  static constexpr int kNumMathThreads = kNumMathWarpgroups * kWarpgroupThreads;
  static constexpr int kNumThreads = kNumMathThreads + kWarpgroupThreads;
  static constexpr int kNumAccum = Mma::kNumAccum;  // BLOCK_N / 2 floats per thread
  static constexpr bool kMayStraddle = 128 % BLOCK_N != 0;
  // Two accumulators in flight need 3 x BLOCK_N / 2 registers of the ~232 a consumer thread has.
  static constexpr bool kOverlapPromotion = BLOCK_N <= 128;
  static_assert(kNumAccum == BLOCK_N / 2, "m64nN f32 accumulator: 64 * N / 128 threads");
  static_assert(BLOCK_K % 32 == 0, "wgmma e4m3 consumes K in steps of 32");
  // NOTE: wgmma reads A/B through 128B-swizzle descriptors whose atoms are 8 rows x 128 bytes;
  // every stage's A and B tile must start on a 1024-byte boundary.
  static_assert(Layout::kABytes % 1024 == 0 && Layout::kBBytes % 1024 == 0, "stage tiles must stay 1024-aligned");
};

// ---------------------------------------------------------------------------------------------
// Producer: one thread streams A, B, and A's scales for every (tile, K block) into the ring.

// A B tile read by at most this many tiles (the row blocks of its group) is streamed through L2 as
// evict-first: those tiles are consecutive in the rasterization, so they run in one wave and read it
// at about the same time, and then it is dead. It then replaces itself, not A (which every column
// block re-reads) nor dirty lines that would first have to be written back. Other B tiles load
// without a hint, as before (with an evict-normal hint, M = 4096 read ~3% slower on the H200, across
// two machine starts: not settled).
constexpr int kMaxStreamedBReaders = 2;

template <int BLOCK_M, int BLOCK_N, GemmType kType, bool kOutFp32>
__device__ __forceinline__ void produce(const CUtensorMap* tmap_a, const CUtensorMap* tmap_b,
                                        const CUtensorMap* tmap_sfa, const GemmParams& p, uint8_t* smem,
                                        const SmemLayout<BLOCK_M, BLOCK_N, kOutFp32>& layout, uint64_t* full,
                                        uint64_t* empty) {
  using Layout = SmemLayout<BLOCK_M, BLOCK_N, kOutFp32>;
  TileScheduler<kType, BLOCK_M, BLOCK_N> scheduler(p);
  const uint64_t evict_first = ptx::l2_policy_evict_first();
  int stage = 0;
  uint32_t phase = 0;
  Tile tile;
  while (scheduler.next(tile)) {
    const int b_row = tile.group_idx * p.n + tile.n_block_idx * BLOCK_N;
    const bool stream_b = scheduler.num_m_blocks <= kMaxStreamedBReaders;
    for (int k_block_idx = 0; k_block_idx < p.num_k_blocks; ++k_block_idx) {
      ptx::mbarrier_wait(&empty[stage], phase ^ 1);
      ptx::mbarrier_arrive_expect_tx(&full[stage], Layout::kStageTxBytes);
      ptx::tma_load_2d(smem + layout.a_offset(stage), tmap_a, &full[stage], k_block_idx * BLOCK_K, tile.row);
      if (stream_b) {
        ptx::tma_load_2d(smem + layout.b_offset(stage), tmap_b, &full[stage], k_block_idx * BLOCK_K, b_row,
                         evict_first);
      } else {
        ptx::tma_load_2d(smem + layout.b_offset(stage), tmap_b, &full[stage], k_block_idx * BLOCK_K, b_row);
      }
      ptx::tma_load_2d(smem + layout.sfa_offset(stage), tmap_sfa, &full[stage], tile.row, k_block_idx);
      if (++stage == layout.num_stages) {
        stage = 0;
        phase ^= 1;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Consumers.

// B's scales of a tile for every K block -> smem_sfb [2][num_k_blocks]: row 0 for the 128-column
// block holding the tile's first column, row 1 for the next block (clamped to the last one).
template <int BLOCK_N>
__device__ __forceinline__ void load_b_scales_async(const GemmParams& p, const Tile& tile, float* smem_sfb,
                                                    int thread_idx) {
  const int num_n_scale_blocks = (p.n + 127) / 128;
  const int first_block = tile.n_block_idx * BLOCK_N / 128;
  const float* gmem_sfb = p.b_scales + static_cast<int64_t>(tile.group_idx) * num_n_scale_blocks * p.num_k_blocks;
  for (int i = thread_idx; i < 2 * p.num_k_blocks; i += kWarpgroupThreads) {
    const int which = i >= p.num_k_blocks;
    const int n_scale_block = min(first_block + which, num_n_scale_blocks - 1);
    ptx::cp_async_ca_4(smem_sfb + i, gmem_sfb + n_scale_block * p.num_k_blocks + (i - which * p.num_k_blocks));
  }
  ptx::cp_async_commit();
}

// The fragment of the 64 x BLOCK_N tile this thread holds (see ptx/wgmma_e4m3.cuh) -> padded smem.
template <int BLOCK_N, bool kOutFp32, int kNumAccum>
__device__ __forceinline__ void write_fragment(const float (&acc)[kNumAccum], uint8_t* smem_d, int warp_idx,
                                               int lane_idx) {
  constexpr int kRowBytes = SmemLayout<64, BLOCK_N, kOutFp32>::kDRowBytes;
  const int row = warp_idx * 16 + lane_idx / 4;
#pragma unroll
  for (int j = 0; j < BLOCK_N / 8; ++j) {
    const int col = j * 8 + (lane_idx % 4) * 2;
    uint8_t* lo = smem_d + row * kRowBytes;
    uint8_t* hi = lo + 8 * kRowBytes;
    if constexpr (kOutFp32) {
      *reinterpret_cast<float2*>(lo + col * 4) = make_float2(acc[4 * j], acc[4 * j + 1]);
      *reinterpret_cast<float2*>(hi + col * 4) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
    } else {
      *reinterpret_cast<__nv_bfloat162*>(lo + col * 2) = __floats2bfloat162_rn(acc[4 * j], acc[4 * j + 1]);
      *reinterpret_cast<__nv_bfloat162*>(hi + col * 2) = __floats2bfloat162_rn(acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
}

// Padded smem [64 rows] -> global, 16 bytes a thread. Skips rows >= num_rows and, contiguous
// layout, rows not of the tile's group (padding, -1).
template <int BLOCK_N, GemmType kType, bool kOutFp32>
__device__ __forceinline__ void store_rows(const GemmParams& p, const uint8_t* smem_d, int first_row, int num_rows,
                                           int first_col, int group_idx, int thread_idx) {
  constexpr int kElemBytes = kOutFp32 ? 4 : 2;
  constexpr int kRowBytes = SmemLayout<64, BLOCK_N, kOutFp32>::kDRowBytes;
  constexpr int kUnitsPerRow = BLOCK_N * kElemBytes / 16;
  constexpr int kElemsPerUnit = 16 / kElemBytes;
  for (int unit = thread_idx; unit < 64 * kUnitsPerRow; unit += kWarpgroupThreads) {
    const int row = unit / kUnitsPerRow;
    const int col = first_col + (unit % kUnitsPerRow) * kElemsPerUnit;
    if (row >= num_rows || col >= p.n) continue;
    const int64_t gmem_row = first_row + row;
    if constexpr (kType == GemmType::kGroupedContiguous) {
      if (__ldg(p.m_indices + gmem_row) != group_idx) continue;
    }
    int4 v = *reinterpret_cast<const int4*>(smem_d + row * kRowBytes + (unit % kUnitsPerRow) * 16);
    if constexpr (kOutFp32) {
      if (p.c != nullptr) {
        const float4 c = *reinterpret_cast<const float4*>(p.c + gmem_row * p.ldc + col);
        float4& f = reinterpret_cast<float4&>(v);
        f.x += c.x, f.y += c.y, f.z += c.z, f.w += c.w;
      }
    }
    *reinterpret_cast<int4*>(static_cast<uint8_t*>(p.d) + (gmem_row * p.ldd + col) * kElemBytes) = v;
  }
}

template <int BLOCK_M, int BLOCK_N, GemmType kType, bool kOutFp32>
__device__ __forceinline__ void consume(const GemmParams& p, uint8_t* smem,
                                        const SmemLayout<BLOCK_M, BLOCK_N, kOutFp32>& layout, uint64_t* full,
                                        uint64_t* empty) {
  using K = Kernel<BLOCK_M, BLOCK_N, kType, kOutFp32>;
  using Layout = SmemLayout<BLOCK_M, BLOCK_N, kOutFp32>;
  constexpr int kNumAccum = K::kNumAccum;
  const int math_wg_idx = threadIdx.x / kWarpgroupThreads;
  const int thread_idx = threadIdx.x % kWarpgroupThreads;
  const int warp_idx = thread_idx / 32;
  const int lane_idx = threadIdx.x % 32;
  const int sfa_row = math_wg_idx * 64 + warp_idx * 16 + lane_idx / 4;  // and sfa_row + 8
  uint8_t* smem_d = smem + layout.d_offset() + math_wg_idx * Layout::kDBytesPerWarpgroup;
  float* smem_sfb = reinterpret_cast<float*>(smem + layout.sfb_offset()) +
                    math_wg_idx * 2 * layout.sfb_floats_per_buffer();
  const uint32_t named_barrier_id = 1 + math_wg_idx;

  float acc0[kNumAccum];
  float acc1[kNumAccum];
  float final_acc[kNumAccum];
  // Two positions in the ring: the stage the next K block is issued from, and the next one to release.
  int issue_stage = 0, release_stage = 0;
  uint32_t issue_phase = 0;
  int sfb_buffer = 0;

  // Waits for the next stage and issues its 4 wgmma (one 128-wide K block) into acc, one group.
  auto issue = [&](float (&acc)[kNumAccum]) {
    ptx::mbarrier_wait(&full[issue_stage], issue_phase);
    const uint64_t desc_a =
        ptx::make_smem_desc_sw128(smem + layout.a_offset(issue_stage) + math_wg_idx * 64 * BLOCK_K);
    const uint64_t desc_b = ptx::make_smem_desc_sw128(smem + layout.b_offset(issue_stage));
#pragma unroll
    for (int i = 0; i < kNumAccum; ++i) ptx::wgmma_fence_operand(acc[i]);
    ptx::wgmma_fence();
#pragma unroll
    for (int k = 0; k < BLOCK_K / 32; ++k) {
      // 32 e4m3 = 32 bytes further along the swizzled 128-byte rows: start address += 32 >> 4.
      K::Mma::mma(acc, desc_a + k * 2, desc_b + k * 2, k > 0);
    }
    ptx::wgmma_commit_group();
#pragma unroll
    for (int i = 0; i < kNumAccum; ++i) ptx::wgmma_fence_operand(acc[i]);
    if (++issue_stage == layout.num_stages) {
      issue_stage = 0;
      issue_phase ^= 1;
    }
  };

  TileScheduler<kType, BLOCK_M, BLOCK_N> scheduler(p);
  Tile tile;
  bool has_tile = scheduler.next(tile);
  if (has_tile) load_b_scales_async<BLOCK_N>(p, tile, smem_sfb, thread_idx);
  while (has_tile) {
    // B scales of this tile landed for every thread; the previous tile's smem_d reads are done.
    ptx::cp_async_wait<0>();
    ptx::named_barrier_sync(named_barrier_id, kWarpgroupThreads);
    const float* sfb = smem_sfb + sfb_buffer * layout.sfb_floats_per_buffer();
    // Columns [0, boundary) of the tile use B scale row 0, the rest row 1.
    const int boundary = 128 - (tile.n_block_idx * BLOCK_N) % 128;

#pragma unroll
    for (int i = 0; i < kNumAccum; ++i) final_acc[i] = 0.0f;

    // K block k_block_idx (its group the oldest in flight, in acc) -> final_acc; frees its stage.
    auto promote = [&](float (&acc)[kNumAccum], int k_block_idx) {
#pragma unroll
      for (int i = 0; i < kNumAccum; ++i) ptx::wgmma_fence_operand(acc[i]);
      const float* smem_sfa = reinterpret_cast<const float*>(smem + layout.sfa_offset(release_stage));
      const float sa_lo = smem_sfa[sfa_row], sa_hi = smem_sfa[sfa_row + 8];
      // This warp's reads of the stage (scales above, wgmma operands) are complete.
      __syncwarp();
      if (lane_idx == 0) ptx::mbarrier_arrive(&empty[release_stage]);
      if (++release_stage == layout.num_stages) release_stage = 0;
      const float sb_first = sfb[k_block_idx], sb_second = sfb[p.num_k_blocks + k_block_idx];
      const float s_lo_first = sa_lo * sb_first, s_hi_first = sa_hi * sb_first;
      const float s_lo_second = sa_lo * sb_second, s_hi_second = sa_hi * sb_second;
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; ++j) {
        // boundary is a multiple of 16, so an 8-column group never straddles two scale blocks.
        const bool first = !K::kMayStraddle || j * 8 < boundary;
        const float s_lo = first ? s_lo_first : s_lo_second;
        const float s_hi = first ? s_hi_first : s_hi_second;
        final_acc[4 * j + 0] += acc[4 * j + 0] * s_lo;
        final_acc[4 * j + 1] += acc[4 * j + 1] * s_lo;
        final_acc[4 * j + 2] += acc[4 * j + 2] * s_hi;
        final_acc[4 * j + 3] += acc[4 * j + 3] * s_hi;
      }
    };

    if constexpr (K::kOverlapPromotion) {
      // Software pipeline over two accumulators: K block i + 1 runs on the tensor cores while the
      // CUDA cores promote K block i, so the wgmma queue never drains between K blocks.
      // NOTE: the loop is unrolled by two so that each accumulator is a fixed register array; a
      // loop whose body branches on which accumulator is in flight makes ptxas serialize every
      // wgmma (warning C7514; tests/test_build.py checks the SASS for it).
      issue(acc0);
      int k_block_idx = 0;
      for (; k_block_idx + 2 < p.num_k_blocks; k_block_idx += 2) {  // acc0 in flight at the top
        issue(acc1);
        ptx::wgmma_wait_group<1>();
        promote(acc0, k_block_idx);
        issue(acc0);
        ptx::wgmma_wait_group<1>();
        promote(acc1, k_block_idx + 1);
      }
      if (k_block_idx + 1 < p.num_k_blocks) {
        issue(acc1);
        ptx::wgmma_wait_group<1>();
        promote(acc0, k_block_idx);
        ptx::wgmma_wait_group<0>();
        promote(acc1, k_block_idx + 1);
      } else {
        ptx::wgmma_wait_group<0>();
        promote(acc0, k_block_idx);
      }
    } else {
      for (int k_block_idx = 0; k_block_idx < p.num_k_blocks; ++k_block_idx) {
        issue(acc0);
        ptx::wgmma_wait_group<0>();
        promote(acc0, k_block_idx);
      }
    }

    // Fetch the next tile's B scales into the other buffer while this tile is stored.
    Tile next_tile;
    const bool has_next = scheduler.next(next_tile);
    if (has_next) {
      load_b_scales_async<BLOCK_N>(p, next_tile, smem_sfb + (sfb_buffer ^ 1) * layout.sfb_floats_per_buffer(),
                                   thread_idx);
    }

    write_fragment<BLOCK_N, kOutFp32>(final_acc, smem_d, warp_idx, lane_idx);
    ptx::named_barrier_sync(named_barrier_id, kWarpgroupThreads);
    const int num_rows = min(64, tile.num_rows - math_wg_idx * 64);
    store_rows<BLOCK_N, kType, kOutFp32>(p, smem_d, tile.row + math_wg_idx * 64, num_rows,
                                         tile.n_block_idx * BLOCK_N, tile.group_idx, thread_idx);

    tile = next_tile;
    has_tile = has_next;
    sfb_buffer ^= 1;
  }
}

template <int BLOCK_M, int BLOCK_N, GemmType kType, bool kOutFp32>
__global__ void __launch_bounds__(Kernel<BLOCK_M, BLOCK_N, kType, kOutFp32>::kNumThreads, 1)
    sm90_fp8_gemm_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                         const __grid_constant__ CUtensorMap tmap_sfa, const GemmParams p, int num_stages) {
  using K = Kernel<BLOCK_M, BLOCK_N, kType, kOutFp32>;
  extern __shared__ __align__(1024) uint8_t smem[];
  const SmemLayout<BLOCK_M, BLOCK_N, kOutFp32> layout{num_stages, p.num_k_blocks};
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + layout.barrier_offset());
  uint64_t* empty = full + num_stages;
  const bool is_producer = threadIdx.x >= K::kNumMathThreads;

  if (threadIdx.x == K::kNumMathThreads) {
    // NOTE: the 128B-swizzle atoms (TMA writes, wgmma descriptors with base offset 0) assume a
    // 1024-byte aligned dynamic shared memory base.
    if ((static_cast<uint32_t>(__cvta_generic_to_shared(smem)) & 1023) != 0) __trap();
    ptx::tma_prefetch_descriptor(&tmap_a);
    ptx::tma_prefetch_descriptor(&tmap_b);
    ptx::tma_prefetch_descriptor(&tmap_sfa);
    for (int s = 0; s < num_stages; ++s) {
      ptx::mbarrier_init(&full[s], 1);
      ptx::mbarrier_init(&empty[s], K::kNumMathThreads / 32);  // lane 0 of every consumer warp
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();

  constexpr bool kReallocateRegisters = K::kNumMathWarpgroups == 2;
  if (is_producer) {
    if constexpr (kReallocateRegisters) ptx::setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == K::kNumMathThreads) {
      produce<BLOCK_M, BLOCK_N, kType, kOutFp32>(&tmap_a, &tmap_b, &tmap_sfa, p, smem, layout, full, empty);
    }
  } else {
    if constexpr (kReallocateRegisters) ptx::setmaxnreg_inc<kConsumerRegs>();
    consume<BLOCK_M, BLOCK_N, kType, kOutFp32>(p, smem, layout, full, empty);
  }
}

}  // namespace dso::gemm

// =============================================================================================
// Host side: tensor maps, tile configuration, dispatch.
namespace dso {
namespace {

using gemm::GemmParams;

// The block widths instantiated (each a multiple of 16 whose tiles touch at most 2 scale blocks).
// -DDSO_GEMM_BLOCK_NS=128 builds a single width (quick iteration on one variant).
#ifndef DSO_GEMM_BLOCK_NS
#define DSO_GEMM_BLOCK_NS 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 192
#endif
constexpr int kBlockNs[] = {DSO_GEMM_BLOCK_NS};

// A 2-D [outer, inner] row-major tensor with rows `row_stride` elements apart, read in boxes of
// [box_outer, box_inner]; out-of-bounds elements of a box read as zero.
CUtensorMap make_tensor_map_2d(const void* base, CUtensorMapDataType dtype, int elem_bytes, uint64_t inner,
                               uint64_t outer, uint64_t row_stride, uint32_t box_inner, uint32_t box_outer,
                               CUtensorMapSwizzle swizzle, const char* what) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {row_stride * elem_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult status = encode_tiled()(&map, dtype, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                                         CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS) {
    throw std::runtime_error(std::string("deepseek_ops: cuTensorMapEncodeTiled failed for ") + what + " (CUresult " +
                             std::to_string(static_cast<int>(status)) + ", dims " + std::to_string(inner) + " x " +
                             std::to_string(outer) + ", row stride " + std::to_string(row_stride) + ")");
  }
  return map;
}

struct DeviceInfo {
  int num_sms = 0;
  int max_smem = 0;
};

const DeviceInfo& device_info() {
  static DeviceInfo infos[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  int device = 0;
  DSO_CUDA_CHECK(cudaGetDevice(&device));
  once_per_device(once, [device] {
    DeviceInfo& info = infos[device % kMaxDevices];
    DSO_CUDA_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device));
    DSO_CUDA_CHECK(cudaDeviceGetAttribute(&info.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  });
  return infos[device % kMaxDevices];
}

int smem_bytes(int block_m, int block_n, bool out_fp32, int num_stages, int num_k_blocks) {
  // The layout depends on BLOCK_M, BLOCK_N and the output type only through these sizes.
  const int d_row = block_n * (out_fp32 ? 4 : 2) + 16;
  const int num_wg = block_m / 64;
  const int stage = block_m * 128 + block_n * 128 + block_m * 4;
  const int sfb = num_wg * 2 * 2 * num_k_blocks * 4;
  return (num_stages * stage + num_wg * 64 * d_row + sfb + 7) / 8 * 8 + 2 * num_stages * 8;
}

// NOTE: 10 stages at most. Letting narrow tiles fill shared memory (up to 20 stages of 64 x 32)
// changed no small-M time on the H200 (session 5): bytes in flight do not limit them.
int max_stages(int block_m, int block_n, bool out_fp32, int num_k_blocks, int max_smem) {
  constexpr int kMaxStages = 10;
  int stages = 0;
  while (stages < kMaxStages && smem_bytes(block_m, block_n, out_fp32, stages + 1, num_k_blocks) <= max_smem) {
    ++stages;
  }
  return stages;
}

int64_t num_tiles(const Fp8GemmProblem& p, int block_m, int block_n, int64_t rows_per_group) {
  const int64_t n_blocks = ceil_div<int64_t>(p.n, block_n);
  if (p.type == GemmType::kGroupedMasked) return p.num_groups * ceil_div<int64_t>(rows_per_group, block_m) * n_blocks;
  return ceil_div<int64_t>(p.m, block_m) * n_blocks;
}

// Tensor-core throughput of a full wave of BLOCK_M x BLOCK_N tiles relative to 128 x 128, measured
// on the H200 at full clocks: geomean over the issue's M = 4096 shapes of a sweep of every variant
// (L2 flushed; benchmarks/fp8_gemm_standalone.cu sweep). 128 x 128 is the sweet spot: its wgmma are
// m64n128 and it promotes one K block while the tensor cores run the next (two accumulators);
// BLOCK_N > 128 has registers for one accumulator only, and widths that do not divide 128 pay a
// per-column scale select.
double mma_efficiency(int block_m, int block_n) {
  struct Measured {
    int block_n;
    double block_m64, block_m128;
  };
  constexpr Measured kTable[] = {{16, 0.15, 0.25},  {32, 0.31, 0.47},  {48, 0.40, 0.60},  {64, 0.53, 0.71},
                                 {80, 0.55, 0.70},  {96, 0.62, 0.78},  {112, 0.63, 0.79}, {128, 0.75, 1.00},
                                 {144, 0.59, 0.71}, {160, 0.62, 0.76}, {192, 0.63, 0.88}};
  for (const Measured& row : kTable) {
    if (row.block_n == block_n) return block_m == 64 ? row.block_m64 : row.block_m128;
  }
  return 0.5;  // a width outside the table (a -DDSO_GEMM_BLOCK_NS build): rank it low
}

// Estimated time of a configuration: waves of tiles, each costing the slower of its tensor-core time
// and its operand ingest. Ingest mixes DRAM (the problem's unique bytes, shared by all SMs) and L2
// (operands re-read by other tiles). Constants fitted to the same sweep over M in {64, 128, 4096}:
// on its data the model picks within 2% of the best tile on 15 of the 18 shapes, at most 11% off
// (the picks at M = 4096 were confirmed on the H200; the small-M ones are the model's).
double estimate_seconds(const Fp8GemmProblem& p, int block_m, int block_n, int num_sms) {
  // A fitted rate, not a peak (128 x 128 tiles run ~1.2 PFLOP/s at full clocks): it also absorbs
  // per-tile costs.
  constexpr double kSmFlops = 0.9e15 / 132;
  constexpr double kSmL2BytesPerS = 80e9;
  constexpr double kDramBytesPerS = 3.0e12;
  const int64_t rows = p.type == GemmType::kGroupedMasked ? (p.expected_m > 0 ? std::min(p.expected_m, p.m) : p.m)
                                                          : p.m;
  const int64_t tiles = num_tiles(p, block_m, block_n, rows);
  const double waves = static_cast<double>(ceil_div<int64_t>(tiles, num_sms));
  const double compute = 2.0 * block_m * block_n * p.k / (kSmFlops * mma_efficiency(block_m, block_n));
  const int64_t total_rows = p.type == GemmType::kGroupedMasked ? rows * p.num_groups : p.m;
  const int64_t b_groups = p.type == GemmType::kNormal ? 1 : p.num_groups;
  const double unique_bytes = static_cast<double>(total_rows) * p.k + static_cast<double>(b_groups) * p.n * p.k +
                              static_cast<double>(total_rows) * p.n * (p.d_fp32 ? 4 : 2);
  const double tile_bytes = static_cast<double>(block_m + block_n) * p.k;
  const double dram_share = std::min(1.0, unique_bytes / (static_cast<double>(tiles) * tile_bytes));
  const double ingest = tile_bytes * (dram_share / (kDramBytesPerS / num_sms) + (1.0 - dram_share) / kSmL2BytesPerS);
  return waves * std::max(compute, ingest);
}

bool parse_config_override(Fp8GemmConfig& config) {
  const char* env = std::getenv("DSO_FP8_GEMM_CONFIG");
  if (env == nullptr || *env == '\0') return false;
  int bm = 0, bn = 0, stages = 0;
  const int parsed = std::sscanf(env, "%dx%dx%d", &bm, &bn, &stages);
  if (parsed < 2) {
    throw std::runtime_error(std::string("deepseek_ops: DSO_FP8_GEMM_CONFIG must be BLOCK_MxBLOCK_N[xSTAGES], got ") +
                             env);
  }
  config.block_m = bm;
  config.block_n = bn;
  config.num_stages = parsed == 3 ? stages : 0;
  return true;
}

}  // namespace

Fp8GemmConfig select_sm90_fp8_gemm_config(const Fp8GemmProblem& p) {
  const DeviceInfo& info = device_info();
  const int num_k_blocks = static_cast<int>(p.k / 128);
  Fp8GemmConfig config;
  if (!parse_config_override(config)) {
    double best = 0.0;
    for (const int block_m : {64, 128}) {
      // Contiguous groups are 128-row aligned; BLOCK_M = 128 is the instantiated variant.
      if (p.type == GemmType::kGroupedContiguous && block_m != 128) continue;
      for (const int block_n : kBlockNs) {
        if (block_n > align_up<int64_t>(p.n, 16) && block_n != 16) break;
        if (max_stages(block_m, block_n, p.d_fp32, num_k_blocks, info.max_smem) < 3) continue;
        const double t = estimate_seconds(p, block_m, block_n, info.num_sms);
        // Ties: the first, i.e. the smaller BLOCK_M and BLOCK_N, wins.
        if (config.block_m == 0 || t < best * 0.995) {
          best = t;
          config.block_m = block_m;
          config.block_n = block_n;
        }
      }
    }
  }
  if (config.block_m == 0) {
    throw std::runtime_error("deepseek_ops: fp8 gemm: no tile configuration fits in shared memory for K = " +
                             std::to_string(p.k));
  }
  const int stages_fit = max_stages(config.block_m, config.block_n, p.d_fp32, num_k_blocks, info.max_smem);
  if (config.num_stages == 0) config.num_stages = stages_fit;
  if (config.num_stages < 2 || config.num_stages > stages_fit) {
    throw std::runtime_error("deepseek_ops: fp8 gemm config " + std::to_string(config.block_m) + "x" +
                             std::to_string(config.block_n) + "x" + std::to_string(config.num_stages) +
                             " does not fit in shared memory for K = " + std::to_string(p.k) + " (at most " +
                             std::to_string(stages_fit) + " stages)");
  }
  const int64_t tiles = num_tiles(p, config.block_m, config.block_n, p.m);
  config.num_ctas = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tiles, info.num_sms)));
  return config;
}

namespace {

struct LaunchArgs {
  CUtensorMap tmap_a, tmap_b, tmap_sfa;
  GemmParams params;
  Fp8GemmConfig config;
  cudaStream_t stream;
};

template <int BLOCK_M, int BLOCK_N, GemmType kType, bool kOutFp32>
void launch_kernel(const LaunchArgs& args) {
  auto* kernel = &gemm::sm90_fp8_gemm_kernel<BLOCK_M, BLOCK_N, kType, kOutFp32>;
  using K = gemm::Kernel<BLOCK_M, BLOCK_N, kType, kOutFp32>;
  const gemm::SmemLayout<BLOCK_M, BLOCK_N, kOutFp32> layout{args.config.num_stages, args.params.num_k_blocks};
  const int smem = layout.total_bytes();
  static std::once_flag attribute_set[kMaxDevices];  // one per kernel instantiation
  once_per_device(attribute_set, [kernel] {
    DSO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, device_info().max_smem));
  });
  kernel<<<args.config.num_ctas, K::kNumThreads, smem, args.stream>>>(args.tmap_a, args.tmap_b, args.tmap_sfa,
                                                                       args.params, args.config.num_stages);
  DSO_LAUNCH_CHECK();
}

template <GemmType kType, bool kOutFp32, int BLOCK_M, int... BLOCK_Ns>
bool dispatch_block_n(const LaunchArgs& args) {
  return ((args.config.block_n == BLOCK_Ns ? (launch_kernel<BLOCK_M, BLOCK_Ns, kType, kOutFp32>(args), true)
                                           : false) ||
          ...);
}

template <GemmType kType, bool kOutFp32, int... BLOCK_Ms>
bool dispatch_block_m(const LaunchArgs& args) {
  return ((args.config.block_m == BLOCK_Ms ? dispatch_block_n<kType, kOutFp32, BLOCK_Ms, DSO_GEMM_BLOCK_NS>(args)
                                           : false) ||
          ...);
}

// The instantiated variants: dense bf16/fp32 output, grouped bf16 output.
bool dispatch(const LaunchArgs& args, GemmType type, bool out_fp32) {
  switch (type) {
    case GemmType::kNormal:
      return out_fp32 ? dispatch_block_m<GemmType::kNormal, true, 64, 128>(args)
                      : dispatch_block_m<GemmType::kNormal, false, 64, 128>(args);
    case GemmType::kGroupedContiguous:
      return !out_fp32 && dispatch_block_m<GemmType::kGroupedContiguous, false, 128>(args);
    case GemmType::kGroupedMasked:
      return !out_fp32 && dispatch_block_m<GemmType::kGroupedMasked, false, 64, 128>(args);
  }
  return false;
}

}  // namespace

void launch_sm90_fp8_gemm(const Fp8GemmProblem& p, cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0 || p.k <= 0 || p.k % 128 != 0 || p.n % 16 != 0) {
    throw std::runtime_error("deepseek_ops: launch_sm90_fp8_gemm needs m > 0, n a multiple of 16, k a multiple of 128");
  }
  LaunchArgs args;
  args.config = select_sm90_fp8_gemm_config(p);
  args.stream = stream;
  const int block_m = args.config.block_m, block_n = args.config.block_n;
  const bool masked = p.type == GemmType::kGroupedMasked;
  const int64_t a_rows = masked ? p.num_groups * p.m : p.m;
  const int64_t b_rows = p.type == GemmType::kNormal ? p.n : p.num_groups * p.n;
  const int64_t num_k_blocks = p.k / 128;
  args.tmap_a = make_tensor_map_2d(p.a, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, p.k, a_rows, p.lda, 128, block_m,
                                   CU_TENSOR_MAP_SWIZZLE_128B, "a");
  args.tmap_b = make_tensor_map_2d(p.b, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, p.k, b_rows, p.ldb, 128, block_n,
                                   CU_TENSOR_MAP_SWIZZLE_128B, "b");
  args.tmap_sfa = make_tensor_map_2d(p.a_scales, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, a_rows, num_k_blocks,
                                     p.a_scales_ld, block_m, 1, CU_TENSOR_MAP_SWIZZLE_NONE, "a_scales");
  args.params = GemmParams{p.b_scales,
                           p.d,
                           p.c,
                           p.m_indices,
                           p.masked_m,
                           p.ldd,
                           p.ldc,
                           static_cast<int>(p.m),
                           static_cast<int>(p.n),
                           static_cast<int>(num_k_blocks),
                           static_cast<int>(p.num_groups)};
  if (const char* verbose = std::getenv("DSO_FP8_GEMM_VERBOSE"); verbose != nullptr && *verbose == '1') {
    std::fprintf(stderr, "deepseek_ops fp8 gemm: type %d m %lld n %lld k %lld groups %lld -> BLOCK_M %d BLOCK_N %d "
                 "stages %d ctas %d\n", static_cast<int>(p.type), static_cast<long long>(p.m),
                 static_cast<long long>(p.n), static_cast<long long>(p.k), static_cast<long long>(p.num_groups),
                 block_m, block_n, args.config.num_stages, args.config.num_ctas);
  }
  if (!dispatch(args, p.type, p.d_fp32)) {
    throw std::runtime_error("deepseek_ops: no fp8 gemm kernel instantiated for BLOCK_M=" + std::to_string(block_m) +
                             ", BLOCK_N=" + std::to_string(block_n) + (p.d_fp32 ? ", fp32" : ", bf16") +
                             " output and this gemm type");
  }
}

}  // namespace dso
