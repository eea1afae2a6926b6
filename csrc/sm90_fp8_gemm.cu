// FP8 GEMM with DeepSeek-V3 fine-grained scaling on Hopper: d = (a * sa) @ (b * sb)^T (+ c).
//
// One kernel template serves the dense GEMM and both grouped (MoE) layouts; only the tile
// scheduler differs (sm90_fp8_gemm_scheduler.cuh). Per CTA (persistent, one per SM):
//   - a producer warpgroup, one thread of which issues TMA loads of A [BLOCK_M x 128],
//     B [BLOCK_N x 128] (128-byte swizzle) and A's scales [BLOCK_M] into a ring of stages
//     guarded by full/empty mbarriers, and a scheduler warp that hands each tile, with B's block
//     scales, to the consumers one tile ahead (a two-slot ring);
//   - consumer warpgroups (one for BLOCK_M = 64, else two, each owning BLOCK_M / 2 rows as one or
//     two 64-row wgmma passes): per 128-wide K block, 4 wgmma m64nBLOCK_Nk32 per pass into a fresh
//     fp32 accumulator, then promotion on CUDA cores, final += acc * a_scale[row] * b_scale[column
//     block] (the tensor cores keep ~14 mantissa bits of an FP8 product sum, so sums longer than
//     128 are formed in real fp32); weight gradients (GemmType::kWgrad, kKGroupedWgrad) scale B per row instead,
//     final += acc * a_scale[row] * b_scale[column], B's scales loaded per stage like A's;
//   - an epilogue per warpgroup: bf16 output goes through swizzled shared memory (stmatrix) and TMA
//     stores that run on while the warpgroup starts its next tile; rows the contract leaves untouched
//     (masked tails, contiguous padding) take bounded 16-byte stores instead. fp32 output (with the
//     optional addend c) uses padded shared memory and 16-byte stores; weight gradients instead load
//     their tile of c by TMA while the tile's K loop runs, add in shared memory and store by TMA.
// Split K (dense bf16 output, few tiles and long K): the fp32-output kernel writes each split's partial
// sums, and sm90_fp8_gemm_split_sum_kernel adds them into d.
#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>

#include "barrier.cuh"
#include "cache_policy.cuh"
#include "common.h"
#include "cp_async.cuh"
#include "fence.cuh"
#include "griddep.cuh"
#include "launch_pdl.h"
#include "mbarrier.cuh"
#include "sm90_fp8_gemm.h"
#include "sm90_fp8_gemm_layout.h"
#include "sm90_fp8_gemm_scheduler.cuh"
#include "sm90_fp8_gemm_variants.h"
#include "special_registers.cuh"
#include "stmatrix.cuh"
#include "tensor_map.h"
#include "tma.cuh"
#include "warpgroup.cuh"
#include "wgmma.cuh"
#include "wgmma_e4m3.cuh"

namespace dso::gemm {

constexpr int kWarpgroupThreads = 128;
// Registers per thread after setmaxnreg (two consumer warpgroups; 384 threads start with 168 each):
// the producer needs few; a consumer holds its fp32 results (BLOCK_N / 2 floats per pass) and one or
// two accumulators. 128 x 40 + 256 x 232 = 64512 <= 65536. With one consumer warpgroup (256
// threads) every thread may already have 255 registers, so that variant does not reallocate.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;

template <int BLOCK_M, int BLOCK_N, GemmType kType, bool kOutFp32, int CLUSTER_SIZE>
struct Kernel {
  static constexpr int kClusterSize = CLUSTER_SIZE;
  static_assert(BLOCK_M == 64 || BLOCK_M == 128 || BLOCK_M == 256, "BLOCK_M is 64, 128 or 256");
  static_assert(block_n_supported(BLOCK_N), "BLOCK_N: a multiple of 16 whose tiles touch <= 2 scale blocks");
  static_assert(!(BLOCK_M == 256 && BLOCK_N > 128), "256-row tiles hold 2 x BLOCK_N / 2 results: BLOCK_N <= 128");
  static_assert(!(BLOCK_M == 256 && kOutFp32), "fp32 output (and c) uses tiles of at most 128 rows");
  static_assert(kClusterSize == 1 || (kClusterSize == 2 && kType == GemmType::kNormal),
                "clusters of two CTAs (sharing A) serve the dense layout");
  static constexpr bool kBScalesPerRow = is_wgrad(kType);
  // Split K runs the dense fp32-output kernel into the partial sums: only that kernel's scheduler and
  // consumers offset a tile's K blocks, so the bf16 kernels stay as they are without it.
  static constexpr bool kSplitK = kType == GemmType::kNormal && kOutFp32 && kClusterSize == 1;
  // Weight gradients: one pass per warpgroup, fp32 output staged in 32-column atoms (kWgradAtomCols).
  static_assert(!kBScalesPerRow || (kOutFp32 && BLOCK_M <= 128 && BLOCK_N % kWgradAtomCols == 0 && BLOCK_N <= 192),
                "weight gradients: fp32 output, tiles of <= 128 x 192 with BLOCK_N a multiple of 32");
  using Mma = ptx::Wgmma<__nv_fp8_e4m3, BLOCK_N>;
  static constexpr int kNumConsumerWarpgroups = num_consumer_warpgroups(BLOCK_M);
  static constexpr int kNumConsumerThreads = kNumConsumerWarpgroups * kWarpgroupThreads;
  static constexpr int kNumThreads = kNumConsumerThreads + kWarpgroupThreads;
  static constexpr int kWgRows = BLOCK_M / kNumConsumerWarpgroups;
  static constexpr int kNumPasses = kWgRows / kWgmmaM;
  static constexpr int kNumAccum = Mma::kNumAccum;  // BLOCK_N / 2 floats per thread and pass
  // Two accumulators in flight (promote K block i while K block i + 1 runs) need
  // 3 x BLOCK_N / 2 registers: one pass and BLOCK_N <= 128. Otherwise a warpgroup promotes while the
  // other warpgroup's wgmma run.
  static constexpr bool kOverlapPromotion = kNumPasses == 1 && BLOCK_N <= 128;
  static constexpr int kSwizzleD = d_swizzle_bytes(BLOCK_N);
  static constexpr int kAtomCols = kSwizzleD / 2;  // bf16 columns of one TMA-store box
  static constexpr int kAHalfBytes = BLOCK_M / 2 * BLOCK_K;  // clusters: the rows each CTA loads for both
  static_assert(kNumAccum == BLOCK_N / 2, "m64nN f32 accumulator: 64 * N / 128 threads");
  static_assert(BLOCK_N % 16 == 0, "stmatrix x4 writes 16 columns at a time");

  __host__ __device__ static constexpr SmemLayout layout(int num_stages, int num_k_blocks) {
    return SmemLayout{BLOCK_M, BLOCK_N, kOutFp32, num_stages, num_k_blocks, kBScalesPerRow};
  }
};

// ---------------------------------------------------------------------------------------------
// Producer: one thread streams A, B, and A's scales for every (tile, K block) into the ring.

// A B tile read by at most this many tiles (the row blocks of its group) is streamed through L2 as
// evict-first: those tiles are consecutive in the rasterization, so they run in one wave and read it
// at about the same time, and then it is dead. It then replaces itself, not A (which every column
// block re-reads) nor dirty lines that would first have to be written back. Other B tiles load
// without a hint (an evict-normal hint read ~3% slower at M = 4096 on the H200).
constexpr int kMaxStreamedBReaders = 2;

template <int BLOCK_M, int BLOCK_N, GemmType kType, bool kOutFp32, int kClusterSize>
__device__ __forceinline__ void produce(const CUtensorMap* tmap_a, const CUtensorMap* tmap_b,
                                        const CUtensorMap* tmap_sfa, const CUtensorMap* tmap_sfb,
                                        const GemmParams& p, uint8_t* smem,
                                        const SmemLayout& layout, uint64_t* full, uint64_t* empty) {
  using K = Kernel<BLOCK_M, BLOCK_N, kType, kOutFp32, kClusterSize>;
  TileScheduler<kType, BLOCK_M, BLOCK_N, kClusterSize, K::kSplitK> scheduler(p);
  const uint64_t evict_first = ptx::l2_policy_evict_first();
  const uint32_t rank = kClusterSize == 2 ? ptx::read_cluster_ctarank() : 0;
  int stage = 0;
  uint32_t phase = 0;
  auto next_stage = [&]() {
    if (++stage == layout.num_stages) {
      stage = 0;
      phase ^= 1;
    }
  };
  Tile tile;
  while (scheduler.next(tile)) {
    // k-grouped wgrad: every group reads the same B rows (its own K blocks of them).
    const int b_row = (kType == GemmType::kKGroupedWgrad ? 0 : tile.group_idx * p.n) + tile.n_block_idx * BLOCK_N;
    const bool stream_b = scheduler.num_m_blocks <= kMaxStreamedBReaders;
    for (int k_block_idx = tile.k_begin; k_block_idx < tile.k_begin + tile.k_count; ++k_block_idx) {
      ptx::mbarrier_wait(&empty[stage], phase ^ 1);
      ptx::mbarrier_arrive_expect_tx(&full[stage], layout.stage_tx_bytes());
      if constexpr (kClusterSize == 2) {
        // A in halves of BLOCK_M / 2 rows (the tensor map's box): this CTA's half into both CTAs of the
        // pair, or both halves into this CTA alone.
        if (tile.multicast) {
          ptx::tma_load_2d_multicast(smem + layout.a_offset(stage) + rank * K::kAHalfBytes, tmap_a, &full[stage],
                                     k_block_idx * BLOCK_K, tile.row + rank * (BLOCK_M / 2), 0b11);
        } else {
          for (int half = 0; half < 2; ++half) {
            ptx::tma_load_2d(smem + layout.a_offset(stage) + half * K::kAHalfBytes, tmap_a, &full[stage],
                             k_block_idx * BLOCK_K, tile.row + half * (BLOCK_M / 2));
          }
        }
      } else {
        ptx::tma_load_2d(smem + layout.a_offset(stage), tmap_a, &full[stage], k_block_idx * BLOCK_K, tile.a_row);
      }
      if (stream_b) {
        ptx::tma_load_2d(smem + layout.b_offset(stage), tmap_b, &full[stage], k_block_idx * BLOCK_K, b_row,
                         evict_first);
      } else {
        ptx::tma_load_2d(smem + layout.b_offset(stage), tmap_b, &full[stage], k_block_idx * BLOCK_K, b_row);
      }
      ptx::tma_load_2d(smem + layout.sfa_offset(stage), tmap_sfa, &full[stage], tile.a_row, k_block_idx);
      if constexpr (K::kBScalesPerRow) {
        ptx::tma_load_2d(smem + layout.sfb_stage_offset(stage), tmap_sfb, &full[stage], tile.n_block_idx * BLOCK_N,
                         k_block_idx);
      }
      next_stage();
    }
  }
  if constexpr (kClusterSize == 2) {
    // The peer's consumers arrive on this CTA's empty barriers: the CTA may exit only after the last
    // release of every stage has landed.
    for (int i = 0; i < layout.num_stages; ++i) {
      ptx::mbarrier_wait(&empty[stage], phase ^ 1);
      next_stage();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Scheduler warp: one warp of the producer warpgroup walks the tile sequence one tile ahead of the
// consumers and hands each tile over in a slot of a two-slot ring (SmemLayout::tile_slot_offset),
// with B's scales of the tile for every K block (block-scaled B): [2][num_k_blocks], row 0 for the
// 128-column block holding the tile's first column, row 1 for the next block (clamped to the last
// one). The consumers' tile transition then has no scheduling arithmetic and no scale loads on it.
// After the last tile the warp writes a slot with valid == 0.

struct TileSlotHeader {
  Tile tile;
  int valid;
};
static_assert(sizeof(TileSlotHeader) <= kTileSlotHeaderBytes, "a tile slot's header holds the Tile");

// The same Tile in every lane, as lane 0's: values loaded from shared memory are not provably uniform,
// and ptxas must move the tile's TMA-store coordinates into uniform registers. For such per-lane values it
// emitted a first store whose column was never set (sm_90a, nvcc 13.0: wrong columns on the H100).
__device__ __forceinline__ Tile warp_uniform(const Tile& t) {
  Tile u;
  u.m_block_idx = __shfl_sync(0xffffffffu, t.m_block_idx, 0);
  u.n_block_idx = __shfl_sync(0xffffffffu, t.n_block_idx, 0);
  u.group_idx = __shfl_sync(0xffffffffu, t.group_idx, 0);
  u.row = __shfl_sync(0xffffffffu, t.row, 0);
  u.a_row = __shfl_sync(0xffffffffu, t.a_row, 0);
  u.k_begin = __shfl_sync(0xffffffffu, t.k_begin, 0);
  u.k_count = __shfl_sync(0xffffffffu, t.k_count, 0);
  u.num_rows = __shfl_sync(0xffffffffu, t.num_rows, 0);
  u.multicast = __shfl_sync(0xffffffffu, static_cast<int>(t.multicast), 0) != 0;
  return u;
}

template <int BLOCK_M, int BLOCK_N, GemmType kType, int kClusterSize, bool kSplitK>
__device__ __forceinline__ void schedule(const GemmParams& p, uint8_t* smem, const SmemLayout& layout,
                                         uint64_t* tile_full, uint64_t* tile_empty) {
  constexpr bool kBScalesPerRow = is_wgrad(kType);
  TileScheduler<kType, BLOCK_M, BLOCK_N, kClusterSize, kSplitK> scheduler(p);
  const int lane_idx = threadIdx.x % 32;
  const int num_n_scale_blocks = (p.n + 127) / 128;
  int slot = 0;
  uint32_t phase = 0;
  while (true) {
    Tile tile;
    const bool valid = scheduler.next(tile);
    ptx::mbarrier_wait(&tile_empty[slot], phase ^ 1);
    uint8_t* slot_base = smem + layout.tile_slot_offset(slot);
    if (lane_idx == 0) *reinterpret_cast<TileSlotHeader*>(slot_base) = TileSlotHeader{tile, valid};
    if (valid && !kBScalesPerRow) {
      float* smem_sfb = reinterpret_cast<float*>(slot_base + kTileSlotHeaderBytes);
      const int first_block = tile.n_block_idx * BLOCK_N / 128;
      const float* gmem_sfb = p.b_scales + static_cast<int64_t>(tile.group_idx) * num_n_scale_blocks * p.num_k_blocks;
      // Every lane's copies in flight at once and no registers held (the producer warpgroup has 40): a
      // CTA's first tile waits for them, and with one tile per CTA (small M) nothing hides that wait.
#pragma unroll 1
      for (int i = lane_idx; i < 2 * p.num_k_blocks; i += 32) {
        const int which = i >= p.num_k_blocks;
        const int n_scale_block = min(first_block + which, num_n_scale_blocks - 1);
        ptx::cp_async_ca_4(smem_sfb + i, gmem_sfb + n_scale_block * p.num_k_blocks + (i - which * p.num_k_blocks));
      }
      ptx::cp_async_mbarrier_arrive(&tile_full[slot]);  // the slot is full once this lane's copies land
    }
    ptx::mbarrier_arrive(&tile_full[slot]);  // every lane: each releases its own writes (lane 0: the header)
    if (!valid) return;
    if (++slot == kNumTileSlots) {
      slot = 0;
      phase ^= 1;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Consumers: promotion.

// Scales of one pass's two fragment rows (lo: row r, hi: row r + 8) for both B scale blocks.
struct PassScales {
  float lo_first, hi_first, lo_second, hi_second;
};

// final += acc * scale: 8-column groups [0, kNumFirstGroups) take B scale block 0, the others block 1.
template <int kNumFirstGroups, int kNumAccum>
__device__ __forceinline__ void promote(float (&final_acc)[kNumAccum], const float (&acc)[kNumAccum],
                                        const PassScales& s) {
#pragma unroll
  for (int j = 0; j < kNumAccum / 4; ++j) {
    const float s_lo = j < kNumFirstGroups ? s.lo_first : s.lo_second;
    const float s_hi = j < kNumFirstGroups ? s.hi_first : s.hi_second;
    final_acc[4 * j + 0] += acc[4 * j + 0] * s_lo;
    final_acc[4 * j + 1] += acc[4 * j + 1] * s_lo;
    final_acc[4 * j + 2] += acc[4 * j + 2] * s_hi;
    final_acc[4 * j + 3] += acc[4 * j + 3] * s_hi;
  }
}

// Weight gradients: final_acc += acc * a_scale[row] * b_scale[column], B's scales of the K block read
// from the stage (columns 8 j + 2 (lane % 4) + {0, 1} of the fragment).
// NOTE: multiplied in this order so that each product waits for its accumulator element; with the
// scale products first, ptxas hoisted all of them after the last K block and spilled (128 x 128,
// k-grouped).
template <int kNumAccum>
__device__ __forceinline__ void promote_per_column(float (&final_acc)[kNumAccum], const float (&acc)[kNumAccum],
                                                   float sa_lo, float sa_hi, const float* smem_sfb, int lane_idx) {
#pragma unroll
  for (int j = 0; j < kNumAccum / 4; ++j) {
    const float2 sb = *reinterpret_cast<const float2*>(smem_sfb + j * 8 + (lane_idx % 4) * 2);
    final_acc[4 * j + 0] += (acc[4 * j + 0] * sa_lo) * sb.x;
    final_acc[4 * j + 1] += (acc[4 * j + 1] * sa_lo) * sb.y;
    final_acc[4 * j + 2] += (acc[4 * j + 2] * sa_hi) * sb.x;
    final_acc[4 * j + 3] += (acc[4 * j + 3] * sa_hi) * sb.y;
  }
}

// Calls fn(std::integral_constant<int, G>) with G = num_first_groups, the 8-column groups of the tile
// left of its B scale boundary. G takes few values (multiples of gcd(BLOCK_N, 128) / 8), each a
// compile-time constant in its own copy of fn: the promotion then selects no scale at run time.
template <int BLOCK_N, int kCandidate = gcd(BLOCK_N, 128) / 8, typename Fn>
__device__ __forceinline__ void with_first_groups(int num_first_groups, Fn&& fn) {
  constexpr int kAll = BLOCK_N / 8;
  if constexpr (128 % BLOCK_N == 0 || kCandidate >= kAll) {
    fn(std::integral_constant<int, kAll>{});
  } else {
    if (num_first_groups == kCandidate) {
      fn(std::integral_constant<int, kCandidate>{});
    } else {
      with_first_groups<BLOCK_N, kCandidate + gcd(BLOCK_N, 128) / 8>(num_first_groups, fn);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Consumers: epilogue.

// fp32 output: the fragment of one 64 x BLOCK_N pass -> padded smem rows.
template <int BLOCK_N, int kNumAccum>
__device__ __forceinline__ void write_fragment_fp32(const float (&acc)[kNumAccum], uint8_t* smem_d, int row_bytes,
                                                    int warp_idx, int lane_idx) {
  const int row = warp_idx * 16 + lane_idx / 4;
#pragma unroll
  for (int j = 0; j < BLOCK_N / 8; ++j) {
    const int col = j * 8 + (lane_idx % 4) * 2;
    uint8_t* lo = smem_d + row * row_bytes;
    uint8_t* hi = lo + 8 * row_bytes;
    *reinterpret_cast<float2*>(lo + col * 4) = make_float2(acc[4 * j], acc[4 * j + 1]);
    *reinterpret_cast<float2*>(hi + col * 4) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
  }
}

// Byte offset of the 16-byte chunk (row, chunk) in a bf16 staging area of kWgRows rows: atoms of
// kSwizzle-byte rows, each atom a TMA box [kWgRows][kSwizzle / 2], with the TMA swizzle
// (chunk bits XOR-ed with bits 7.. of the linear offset).
template <int kSwizzle, int kWgRows>
__device__ __forceinline__ int swizzled_chunk_offset(int row, int chunk) {
  constexpr int kChunksPerAtomRow = kSwizzle / 16;
  const int atom = chunk / kChunksPerAtomRow;
  const int linear = row * kSwizzle + (chunk % kChunksPerAtomRow) * 16;
  return atom * kWgRows * kSwizzle + (linear ^ (((linear >> 7) & (kChunksPerAtomRow - 1)) << 4));
}

// bf16 output: one 64 x BLOCK_N pass (rows [64 pass, 64 pass + 64) of the warpgroup) -> swizzled smem.
template <int BLOCK_N, int kWgRows, int kNumAccum>
__device__ __forceinline__ void write_fragment_bf16(const float (&acc)[kNumAccum], uint8_t* smem_d, int pass,
                                                    int warp_idx, int lane_idx) {
  constexpr int kSwizzle = d_swizzle_bytes(BLOCK_N);
  // Lane l addresses row l % 8 of matrix l / 8: matrices 0/1 are rows 0-7 / 8-15 of the warp's 16
  // rows at columns 16j..16j+7, matrices 2/3 the same rows at columns 16j+8..16j+15.
  const int row = pass * kWgmmaM + warp_idx * 16 + (lane_idx % 8) + ((lane_idx / 8) % 2) * 8;
#pragma unroll
  for (int j = 0; j < BLOCK_N / 16; ++j) {
    const int chunk = 2 * j + lane_idx / 16;
    __nv_bfloat162 v[4] = {__floats2bfloat162_rn(acc[8 * j + 0], acc[8 * j + 1]),
                           __floats2bfloat162_rn(acc[8 * j + 2], acc[8 * j + 3]),
                           __floats2bfloat162_rn(acc[8 * j + 4], acc[8 * j + 5]),
                           __floats2bfloat162_rn(acc[8 * j + 6], acc[8 * j + 7])};
    ptx::stmatrix_x4(smem_d + swizzled_chunk_offset<kSwizzle, kWgRows>(row, chunk),
                     reinterpret_cast<uint32_t&>(v[0]), reinterpret_cast<uint32_t&>(v[1]),
                     reinterpret_cast<uint32_t&>(v[2]), reinterpret_cast<uint32_t&>(v[3]));
  }
}

// Staged rows -> global with 16-byte stores, a thread per chunk: rows < num_rows (and, kCheckRows,
// whose row_ok flag is set: contiguous layout, rows of the tile's group, so padding rows are left
// untouched), columns < n.
template <int BLOCK_N, int kWgRows, bool kOutFp32, bool kCheckRows>
__device__ __forceinline__ void store_rows(const GemmParams& p, const uint8_t* smem_d, const uint8_t* row_ok,
                                           int first_row, int num_rows, int first_col, int thread_idx) {
  constexpr int kElemBytes = kOutFp32 ? 4 : 2;
  constexpr int kChunksPerRow = BLOCK_N * kElemBytes / 16;
  constexpr int kElemsPerChunk = 16 / kElemBytes;
  constexpr int kFp32RowBytes = BLOCK_N * 4 + 16;
  for (int unit = thread_idx; unit < kWgRows * kChunksPerRow; unit += kWarpgroupThreads) {
    const int row = unit / kChunksPerRow;
    const int chunk = unit % kChunksPerRow;
    const int col = first_col + chunk * kElemsPerChunk;
    if (row >= num_rows || col >= p.n || (kCheckRows && !row_ok[row])) continue;
    const int64_t gmem_row = first_row + row;
    int4 v;
    if constexpr (kOutFp32) {
      v = *reinterpret_cast<const int4*>(smem_d + row * kFp32RowBytes + chunk * 16);
      if (p.c != nullptr) {
        const float4 c = *reinterpret_cast<const float4*>(p.c + gmem_row * p.ldc + col);
        float4& f = reinterpret_cast<float4&>(v);
        f.x += c.x, f.y += c.y, f.z += c.z, f.w += c.w;
      }
    } else {
      v = *reinterpret_cast<const int4*>(smem_d + swizzled_chunk_offset<d_swizzle_bytes(BLOCK_N), kWgRows>(row, chunk));
    }
    *reinterpret_cast<int4*>(static_cast<uint8_t*>(p.d) + (gmem_row * p.ldd + col) * kElemBytes) = v;
  }
}

// Epilogue of one consumer warpgroup's rows of a tile: final_acc -> staged shared memory -> global.
template <int BLOCK_M, int BLOCK_N, GemmType kType, bool kOutFp32, int kClusterSize, int kNumPasses, int kNumAccum>
__device__ __forceinline__ void store_tile(const CUtensorMap* tmap_d, const GemmParams& p, const SmemLayout& layout,
                                           const Tile& tile, const float (&final_acc)[kNumPasses][kNumAccum],
                                           uint8_t* smem_d, uint8_t* smem_row_ok, int consumer_wg_idx,
                                           int thread_idx) {
  using K = Kernel<BLOCK_M, BLOCK_N, kType, kOutFp32, kClusterSize>;
  constexpr int kWgRows = K::kWgRows;
  const int warp_idx = thread_idx / 32, lane_idx = thread_idx % 32;
  const uint32_t barrier_id = 1 + consumer_wg_idx;
  const int first_col = tile.n_block_idx * BLOCK_N;
  const int first_row = tile.row + consumer_wg_idx * kWgRows;
  const int num_rows = min(kWgRows, tile.num_rows - consumer_wg_idx * kWgRows);
  bool row_ok = true;
  if constexpr (kType == GemmType::kGroupedContiguous) {
    if (thread_idx < kWgRows) {
      row_ok = thread_idx < num_rows && __ldg(p.m_indices + first_row + thread_idx) == tile.group_idx;
    }
  }
  // The previous tile's TMA stores have read smem_d (its issuing thread waits, the barrier tells all),
  // and every thread's reads of smem_d and of the row flags in the previous tile's store are done.
  if (thread_idx == 0) ptx::tma_store_wait_read<0>();
  const bool all_rows_ok = ptx::named_barrier_sync_and(barrier_id, kWarpgroupThreads, row_ok);
  if (kType == GemmType::kGroupedContiguous && thread_idx < kWgRows) smem_row_ok[thread_idx] = row_ok;
  // TMA stores write whole boxes, clipped only at the tensor's edges: they serve the dense layout,
  // and grouped tiles whose rows all hold output. Others keep the rows the contract leaves untouched.
  const bool tma_store = !kOutFp32 && num_rows > 0 &&
                         (kType == GemmType::kNormal || (num_rows == kWgRows && all_rows_ok));
  if constexpr (kOutFp32) {
    write_fragment_fp32<BLOCK_N>(final_acc[0], smem_d, layout.d_fp32_row_bytes(), warp_idx, lane_idx);
  } else {
#pragma unroll
    for (int pass = 0; pass < kNumPasses; ++pass) {
      write_fragment_bf16<BLOCK_N, kWgRows>(final_acc[pass], smem_d, pass, warp_idx, lane_idx);
    }
    ptx::fence_proxy_async_shared();  // stmatrix writes -> TMA (async proxy) reads
  }
  ptx::named_barrier_sync(barrier_id, kWarpgroupThreads);
  if (tma_store) {
    if (thread_idx == 0) {
#pragma unroll
      for (int atom = 0; atom < BLOCK_N / K::kAtomCols; ++atom) {
        if (first_col + atom * K::kAtomCols < p.n) {
          ptx::tma_store_2d(tmap_d, smem_d + atom * kWgRows * K::kSwizzleD, first_col + atom * K::kAtomCols,
                            first_row);
        }
      }
      ptx::tma_store_commit();
    }
  } else if (num_rows > 0) {
    store_rows<BLOCK_N, kWgRows, kOutFp32, kType == GemmType::kGroupedContiguous>(
        p, smem_d, smem_row_ok, first_row, num_rows, first_col, thread_idx);
  }
}

// Weight gradients (fp32 output, optional addend c): a warpgroup's rows of the tile are staged in
// BLOCK_N / kWgradAtomCols atoms [kWgRows][32 floats] with the 128-byte swizzle, each one TMA box of the
// 3-D maps of c and d ([groups][m][n]: the edges clip a group's last row block at m and the last
// column block at n). c lands in the atoms while the tile's K loop runs, so its latency is hidden;
// the epilogue adds the results in place and stores the atoms by TMA, which runs on while the
// warpgroup starts its next tile. When c is d (accumulating in place), nothing is loaded: the atoms
// hold the results alone and TMA adds them into d.
template <int kWgRows>
constexpr int kWgradAtomBytes = kWgRows * kWgradAtomCols * 4;

// Atoms of the tile with columns < n (the others are neither loaded nor stored).
template <int BLOCK_N>
__device__ __forceinline__ int wgrad_num_atoms(const GemmParams& p, const Tile& tile) {
  return min(BLOCK_N, p.n - tile.n_block_idx * BLOCK_N + kWgradAtomCols - 1) / kWgradAtomCols;
}

// c is d itself (an in-place accumulation) and the host chose reduce-add: the epilogue adds the tile
// into d by TMA reduce-add (at L2) instead of loading c into the atoms first, so the SMs never read c.
// Otherwise c == d takes the load path, which is safe: only this tile reads or writes its region of d.
__device__ __forceinline__ bool wgrad_reduces_into_d(const GemmParams& p) { return p.reduce_c_into_d; }

// One thread of a warpgroup that has rows in the tile, p.c given and not reduced into d: c's tile -> the
// staging atoms.
template <int BLOCK_N, int kWgRows>
__device__ __forceinline__ void load_c_tile_async(const CUtensorMap* tmap_c, const GemmParams& p, const Tile& tile,
                                                  uint8_t* smem_d, uint64_t* c_full, int consumer_wg_idx) {
  const int num_atoms = wgrad_num_atoms<BLOCK_N>(p, tile);
  ptx::tma_store_wait_read<0>();  // the previous tile's stores (issued by this thread) have read the atoms
  ptx::mbarrier_arrive_expect_tx(c_full, num_atoms * kWgradAtomBytes<kWgRows>);
  for (int atom = 0; atom < num_atoms; ++atom) {
    ptx::tma_load_3d(smem_d + atom * kWgradAtomBytes<kWgRows>, tmap_c, c_full,
                     tile.n_block_idx * BLOCK_N + atom * kWgradAtomCols, tile.a_row + consumer_wg_idx * kWgRows,
                     tile.group_idx);
  }
}

// The epilogue of one consumer warpgroup's rows: final_acc (+ c, loaded by load_c_tile_async) -> d.
template <int BLOCK_N, int kWgRows, int kNumAccum>
__device__ __forceinline__ void store_tile_wgrad(const CUtensorMap* tmap_d, const GemmParams& p, const Tile& tile,
                                                 const float (&final_acc)[kNumAccum], uint8_t* smem_d,
                                                 uint64_t* c_full, uint32_t& c_phase, int consumer_wg_idx,
                                                 int thread_idx) {
  if (tile.num_rows <= consumer_wg_idx * kWgRows) return;  // no rows of this warpgroup: nothing loaded
  const uint32_t barrier_id = 1 + consumer_wg_idx;
  const bool reduce = wgrad_reduces_into_d(p);
  const bool add_c = p.c != nullptr && !reduce;
  if (add_c) {
    ptx::mbarrier_wait(c_full, c_phase);
    c_phase ^= 1;
  } else {
    // The previous tile's TMA stores have read the atoms (its issuing thread waits, the barrier tells all).
    if (thread_idx == 0) ptx::tma_store_wait_read<0>();
    ptx::named_barrier_sync(barrier_id, kWarpgroupThreads);
  }
  // Fragment rows r and r + 8, columns 8 j + 2 (lane % 4) + {0, 1}: a float2 at a time. A warp's 8 rows
  // x 4 lanes then cover each 16-byte chunk position of the 128-byte rows twice (the swizzle XORs the
  // chunk with row % 8): two wavefronts, no conflicts.
  const int lane_idx = thread_idx % 32;
  const int row = (thread_idx / 32) * 16 + lane_idx / 4;
#pragma unroll
  for (int j = 0; j < BLOCK_N / 8; ++j) {
    const int col = j * 8 + (lane_idx % 4) * 2;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float2* staged = reinterpret_cast<float2*>(
          smem_d + swizzled_chunk_offset<128, kWgRows>(row + 8 * half, col / 4) + (col % 4) * 4);
      float2 v = make_float2(final_acc[4 * j + 2 * half], final_acc[4 * j + 2 * half + 1]);
      if (add_c) {
        const float2 c = *staged;
        v.x += c.x;
        v.y += c.y;
      }
      *staged = v;
    }
  }
  ptx::fence_proxy_async_shared();  // st.shared -> TMA (async proxy) reads
  ptx::named_barrier_sync(barrier_id, kWarpgroupThreads);
  if (thread_idx == 0) {
    const int num_atoms = wgrad_num_atoms<BLOCK_N>(p, tile);
    for (int atom = 0; atom < num_atoms; ++atom) {
      const int col = tile.n_block_idx * BLOCK_N + atom * kWgradAtomCols, row = tile.a_row + consumer_wg_idx * kWgRows;
      if (reduce) {
        ptx::tma_reduce_add_3d(tmap_d, smem_d + atom * kWgradAtomBytes<kWgRows>, col, row, tile.group_idx);
      } else {
        ptx::tma_store_3d(tmap_d, smem_d + atom * kWgradAtomBytes<kWgRows>, col, row, tile.group_idx);
      }
    }
    ptx::tma_store_commit();
  }
}

// ---------------------------------------------------------------------------------------------
// Consumers: the pipeline.

// The stage ring as one consumer warpgroup sees it: waits for a stage's data, issues its wgmma, reads
// its scales and hands it back to the producer(s).
template <typename K>
struct ConsumerRing {
  static constexpr int kNumAccum = K::kNumAccum;
  const SmemLayout& layout;
  uint8_t* smem;
  uint64_t* full;
  uint64_t* empty;
  int a_row;        // the warpgroup's first row in a stage's A tile
  int sfa_row;      // pass 0's lo fragment row in a stage's A scales (hi: + 8; pass p: + 64 p)
  int lane_idx;
  uint32_t rank;    // clusters: this CTA's rank
  int num_k_blocks;
  const float* sfb = nullptr;  // the current tile's B scales from its first K block: rows of num_k_blocks
  int k_count = 0;             // the current tile's K blocks (all of them but for k-grouped wgrad)
  bool peer_half = false;      // clusters: the current tile's stages hold half of A from the peer
  // Two positions in the ring: the stage the next K block is issued from, and the next one to release.
  int issue_stage = 0, release_stage = 0;
  uint32_t issue_phase = 0;
  bool issue_stage_full = false;  // next_issue_stage's probe found issue_stage's data landed
  // issue_stage's wgmma descriptors (A at this warpgroup's first row, and B), set when the stage becomes
  // the next to issue, i.e. before the promotion that precedes the issue: no address arithmetic between
  // the promotion and the wgmma.
  uint64_t desc_a = 0, desc_b = 0;

  __device__ __forceinline__ void wait_full() const {
    if (!issue_stage_full) ptx::mbarrier_wait(&full[issue_stage], issue_phase);
  }

  // Moves to the next stage and probes its full barrier without waiting. The loops call this before
  // the promotion that precedes the next issue, so the barrier's round trip runs under the promotion's
  // FFMAs instead of between them and the next wgmma (ptxas does not hoist the wait across the loop's
  // back edge).
  __device__ __forceinline__ void next_issue_stage() {
    if (++issue_stage == layout.num_stages) {
      issue_stage = 0;
      issue_phase ^= 1;
    }
    issue_stage_full = ptx::mbarrier_test_wait(&full[issue_stage], issue_phase);
    set_descs();
  }

  __device__ __forceinline__ void set_descs() {
    desc_a = ptx::make_smem_desc_sw128(smem + layout.a_offset(issue_stage) + a_row * BLOCK_K);
    desc_b = ptx::make_smem_desc_sw128(smem + layout.b_offset(issue_stage));
  }

  // One pass (rows [64 pass, 64 pass + 64) of the warpgroup) of the K block in issue_stage: 4 wgmma
  // into acc, one group.
  __device__ __forceinline__ void issue(float (&acc)[kNumAccum], int pass) const {
    // A pass's rows start kWgmmaM rows (kWgmmaM * BLOCK_K bytes, >> 4 in the descriptor) further on.
    const uint64_t pass_desc_a = desc_a + pass * (kWgmmaM * BLOCK_K >> 4);
    ptx::warpgroup::fence_accumulators(acc);
    ptx::warpgroup::wgmma_fence();
#pragma unroll
    for (int k = 0; k < BLOCK_K / 32; ++k) {
      // 32 e4m3 = 32 bytes further along the swizzled 128-byte rows: start address += 32 >> 4.
      K::Mma::mma(acc, pass_desc_a + k * 2, desc_b + k * 2, k > 0);
    }
    ptx::warpgroup::wgmma_commit_group();
    ptx::warpgroup::fence_accumulators(acc);
  }

  __device__ __forceinline__ PassScales scales(int stage, int pass, int k_block_idx) const {
    const float* smem_sfa = reinterpret_cast<const float*>(smem + layout.sfa_offset(stage));
    const float sa_lo = smem_sfa[sfa_row + pass * kWgmmaM], sa_hi = smem_sfa[sfa_row + pass * kWgmmaM + 8];
    const float sb_first = sfb[k_block_idx], sb_second = sfb[num_k_blocks + k_block_idx];
    return PassScales{sa_lo * sb_first, sa_hi * sb_first, sa_lo * sb_second, sa_hi * sb_second};
  }

  // Weight gradients: acc (pass `pass` of the K block in `stage`) -> final_acc with the stage's per-row A
  // and per-column B scales. The caller releases the stage afterwards: the B scales are read here.
  __device__ __forceinline__ void promote_per_column_from(int stage, int pass, float (&final_acc)[kNumAccum],
                                                          const float (&acc)[kNumAccum]) const {
    const float* smem_sfa = reinterpret_cast<const float*>(smem + layout.sfa_offset(stage));
    const float* smem_sfb = reinterpret_cast<const float*>(smem + layout.sfb_stage_offset(stage));
    promote_per_column(final_acc, acc, smem_sfa[sfa_row + pass * kWgmmaM], smem_sfa[sfa_row + pass * kWgmmaM + 8],
                       smem_sfb, lane_idx);
  }

  // This warp's reads of the stage (scales, wgmma operands) are complete: the producer may refill it.
  // Clusters: each warp arrives twice, on both CTAs' barriers when the peer's producer writes half of
  // the stage, else twice on its own.
  __device__ __forceinline__ void release(int stage) const {
    __syncwarp();
    if constexpr (K::kClusterSize == 1) {
      if (lane_idx == 0) ptx::mbarrier_arrive(&empty[stage]);
    } else {
      if (lane_idx < 2) ptx::mbarrier_arrive_cluster(&empty[stage], peer_half ? lane_idx : rank);
    }
  }

  __device__ __forceinline__ void release_oldest() {
    release(release_stage);
    if (++release_stage == layout.num_stages) release_stage = 0;
  }
};

// The K loop of one tile -> final_acc (zeroed by the caller). kNumFirstGroups: see with_first_groups.
template <int kNumFirstGroups, typename K>
__device__ __forceinline__ void k_loop(ConsumerRing<K>& ring, float (&final_acc)[K::kNumPasses][K::kNumAccum],
                                       float (&acc0)[K::kNumAccum], float (&acc1)[K::kNumAccum]) {
  constexpr int kNumAccum = K::kNumAccum;
  constexpr int kNumPasses = K::kNumPasses;
  const int num_k_blocks = ring.k_count;
  if constexpr (K::kOverlapPromotion) {
    auto issue_next = [&](float (&acc)[kNumAccum]) {
      ring.wait_full();
      ring.issue(acc, 0);
      ring.next_issue_stage();
    };
    // Waits until K block k_block_idx (the oldest group in flight, in acc; `last`: the only one) has
    // landed, and promotes it into final_acc; frees its stage. Block-scaled B: the scales are read from
    // shared memory before the wait, so their latency runs under the wgmma instead of ahead of the FFMAs.
    auto wait_and_promote_oldest = [&](bool last, float (&acc)[kNumAccum], int k_block_idx) {
      auto wait = [last]() { last ? ptx::warpgroup::wgmma_wait_group<0>() : ptx::warpgroup::wgmma_wait_group<1>(); };
      if constexpr (K::kBScalesPerRow) {
        wait();
        ptx::warpgroup::fence_accumulators(acc);
        ring.promote_per_column_from(ring.release_stage, 0, final_acc[0], acc);
        ring.release_oldest();
      } else {
        const PassScales s = ring.scales(ring.release_stage, 0, k_block_idx);
        wait();
        ptx::warpgroup::fence_accumulators(acc);
        ring.release_oldest();
        promote<kNumFirstGroups>(final_acc[0], acc, s);
      }
    };
    // Software pipeline over two accumulators: K block i + 1 runs on the tensor cores while the
    // CUDA cores promote K block i, so the wgmma queue never drains between K blocks.
    // NOTE: the loop is unrolled by two so that each accumulator is a fixed register array; a
    // loop whose body branches on which accumulator is in flight makes ptxas serialize every
    // wgmma (warning C7514; tests/test_build.py checks the SASS for it).
    issue_next(acc0);
    int k_block_idx = 0;
    for (; k_block_idx + 2 < num_k_blocks; k_block_idx += 2) {  // acc0 in flight at the top
      issue_next(acc1);
      wait_and_promote_oldest(false, acc0, k_block_idx);
      issue_next(acc0);
      wait_and_promote_oldest(false, acc1, k_block_idx + 1);
    }
    if (k_block_idx + 1 < num_k_blocks) {
      issue_next(acc1);
      wait_and_promote_oldest(false, acc0, k_block_idx);
      wait_and_promote_oldest(true, acc1, k_block_idx + 1);
    } else {
      wait_and_promote_oldest(true, acc0, k_block_idx);
    }
  } else {
    // One accumulator: each pass is issued, waited for and promoted in turn; the tensor cores stay
    // busy with the other warpgroup's passes meanwhile.
    for (int k_block_idx = 0; k_block_idx < num_k_blocks; ++k_block_idx) {
      ring.wait_full();
      if constexpr (K::kBScalesPerRow) {
        // One pass; the promotion reads B's scales from the stage, so the stage is released after it.
        ring.issue(acc0, 0);
        ptx::warpgroup::wgmma_wait_group<0>();
        ring.promote_per_column_from(ring.issue_stage, 0, final_acc[0], acc0);
        ring.release_oldest();
        ring.next_issue_stage();
      } else {
        PassScales s[kNumPasses];
#pragma unroll
        for (int pass = 0; pass < kNumPasses; ++pass) s[pass] = ring.scales(ring.issue_stage, pass, k_block_idx);
#pragma unroll
        for (int pass = 0; pass < kNumPasses; ++pass) {
          ring.issue(acc0, pass);
          ptx::warpgroup::wgmma_wait_group<0>();
          if (pass == kNumPasses - 1) {
            ring.release_oldest();
            ring.next_issue_stage();
          }
          promote<kNumFirstGroups>(final_acc[pass], acc0, s[pass]);
        }
      }
    }
  }
}

template <int BLOCK_M, int BLOCK_N, GemmType kType, bool kOutFp32, int kClusterSize>
__device__ __forceinline__ void consume(const CUtensorMap* tmap_d, const CUtensorMap* tmap_c, const GemmParams& p,
                                        uint8_t* smem, const SmemLayout& layout, uint64_t* full, uint64_t* empty,
                                        uint64_t* tile_full, uint64_t* tile_empty) {
  using K = Kernel<BLOCK_M, BLOCK_N, kType, kOutFp32, kClusterSize>;
  // Warp-uniform (a shuffle from lane 0): the wgmma descriptors built from it stay in uniform registers.
  const int consumer_wg_idx = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kWarpgroupThreads, 0);
  const int thread_idx = threadIdx.x % kWarpgroupThreads;
  const int lane_idx = threadIdx.x % 32;
  uint8_t* smem_d = smem + layout.d_offset(consumer_wg_idx);
  uint8_t* smem_row_ok = smem + layout.row_ok_offset(consumer_wg_idx);
  uint64_t* c_full = reinterpret_cast<uint64_t*>(smem + layout.c_barrier_offset(consumer_wg_idx));
  uint32_t c_phase = 0;
  ConsumerRing<K> ring{layout,
                       smem,
                       full,
                       empty,
                       consumer_wg_idx * K::kWgRows,
                       consumer_wg_idx * K::kWgRows + (thread_idx / 32) * 16 + lane_idx / 4,
                       lane_idx,
                       kClusterSize == 2 ? ptx::read_cluster_ctarank() : 0,
                       p.num_k_blocks};
  ring.set_descs();

  float acc0[K::kNumAccum];
  float acc1[K::kNumAccum];
  float final_acc[K::kNumPasses][K::kNumAccum];
  int slot = 0;
  uint32_t slot_phase = 0;
  while (true) {
    ptx::mbarrier_wait(&tile_full[slot], slot_phase);
    const uint8_t* slot_base = smem + layout.tile_slot_offset(slot);
    const TileSlotHeader header = *reinterpret_cast<const TileSlotHeader*>(slot_base);
    if (!header.valid) break;
    const Tile tile = warp_uniform(header.tile);
    // The K loop counts the tile's K blocks from 0; the slot holds every K block's scales (split K: the
    // split's blocks start at k_begin).
    ring.sfb = reinterpret_cast<const float*>(slot_base + kTileSlotHeaderBytes) + (K::kSplitK ? tile.k_begin : 0);
    ring.peer_half = tile.multicast;
    ring.k_count = tile.k_count;
    if constexpr (K::kBScalesPerRow) {
      if (p.c != nullptr && !wgrad_reduces_into_d(p) && thread_idx == 0 &&
          tile.num_rows > consumer_wg_idx * K::kWgRows) {
        load_c_tile_async<BLOCK_N, K::kWgRows>(tmap_c, p, tile, smem_d, c_full, consumer_wg_idx);
      }
    }
#pragma unroll
    for (int pass = 0; pass < K::kNumPasses; ++pass) {
#pragma unroll
      for (int i = 0; i < K::kNumAccum; ++i) final_acc[pass][i] = 0.0f;
    }
    if constexpr (K::kBScalesPerRow) {
      // No B scale boundary inside the tile. A k-grouped group with no K blocks stores zeros (+ c).
      if (tile.k_count > 0) k_loop<BLOCK_N / 8>(ring, final_acc, acc0, acc1);
    } else {
      const int first_col = tile.n_block_idx * BLOCK_N;
      with_first_groups<BLOCK_N>(min(BLOCK_N, 128 - first_col % 128) / 8, [&](auto first_groups) {
        k_loop<decltype(first_groups)::value>(ring, final_acc, acc0, acc1);
      });
    }

    // This warp's reads of the slot (its B scales, in the promotions) are done: the scheduler warp may
    // refill it.
    __syncwarp();
    if (lane_idx == 0) ptx::mbarrier_arrive(&tile_empty[slot]);
    if (++slot == kNumTileSlots) {
      slot = 0;
      slot_phase ^= 1;
    }

    if constexpr (K::kBScalesPerRow) {
      store_tile_wgrad<BLOCK_N, K::kWgRows>(tmap_d, p, tile, final_acc[0], smem_d, c_full, c_phase, consumer_wg_idx,
                                            thread_idx);
    } else {
      store_tile<BLOCK_M, BLOCK_N, kType, kOutFp32, kClusterSize>(tmap_d, p, layout, tile, final_acc, smem_d,
                                                                     smem_row_ok, consumer_wg_idx, thread_idx);
    }
  }
  // Shared memory must outlive the reads of the last TMA stores.
  if (thread_idx == 0) ptx::tma_store_wait_read<0>();
}

template <int BLOCK_M, int BLOCK_N, GemmType kType, bool kOutFp32, int kClusterSize>
__global__ void __launch_bounds__(Kernel<BLOCK_M, BLOCK_N, kType, kOutFp32, kClusterSize>::kNumThreads, 1)
    sm90_fp8_gemm_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                         const __grid_constant__ CUtensorMap tmap_sfa, const __grid_constant__ CUtensorMap tmap_sfb,
                         const __grid_constant__ CUtensorMap tmap_d, const __grid_constant__ CUtensorMap tmap_c,
                         const GemmParams p, int num_stages) {
  using K = Kernel<BLOCK_M, BLOCK_N, kType, kOutFp32, kClusterSize>;
  extern __shared__ __align__(1024) uint8_t smem[];
  const SmemLayout layout = K::layout(num_stages, p.num_k_blocks);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + layout.barrier_offset());
  uint64_t* empty = full + num_stages;
  uint64_t* tile_full = empty + num_stages;
  uint64_t* tile_empty = tile_full + kNumTileSlots;
  const bool is_producer = threadIdx.x >= K::kNumConsumerThreads;

  if (threadIdx.x == K::kNumConsumerThreads) {
    // NOTE: the 128B-swizzle atoms (TMA writes, wgmma descriptors with base offset 0) assume a
    // 1024-byte aligned dynamic shared memory base.
    if ((static_cast<uint32_t>(__cvta_generic_to_shared(smem)) & 1023) != 0) __trap();
    ptx::tma_prefetch_descriptor(&tmap_a);
    ptx::tma_prefetch_descriptor(&tmap_b);
    ptx::tma_prefetch_descriptor(&tmap_sfa);
    if constexpr (K::kBScalesPerRow) ptx::tma_prefetch_descriptor(&tmap_sfb);
    if constexpr (!kOutFp32 || K::kBScalesPerRow) ptx::tma_prefetch_descriptor(&tmap_d);
    if constexpr (K::kBScalesPerRow) {
      if (p.c != nullptr) ptx::tma_prefetch_descriptor(&tmap_c);
      for (int wg = 0; wg < K::kNumConsumerWarpgroups; ++wg) {
        ptx::mbarrier_init(reinterpret_cast<uint64_t*>(smem + layout.c_barrier_offset(wg)), 1);
      }
    }
    for (int s = 0; s < num_stages; ++s) {
      ptx::mbarrier_init(&full[s], 1);
      // Every consumer warp of the cluster's CTAs, once per CTA (see consume's release).
      ptx::mbarrier_init(&empty[s], kClusterSize * K::kNumConsumerThreads / 32);
    }
    for (int slot = 0; slot < kNumTileSlots; ++slot) {
      ptx::mbarrier_init(&tile_full[slot], 32);                               // the scheduler warp's lanes
      ptx::mbarrier_init(&tile_empty[slot], K::kNumConsumerThreads / 32);  // every consumer warp
    }
    ptx::fence_mbarrier_init();
  }
  if constexpr (kClusterSize == 2) {
    ptx::cluster_sync();  // the peer's barriers are initialized before any multicast or remote arrival
  } else {
    __syncthreads();
  }

  constexpr bool kReallocateRegisters = K::kNumConsumerWarpgroups == 2;
  if (is_producer) {
    if constexpr (kReallocateRegisters) ptx::warpgroup::setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == K::kNumConsumerThreads) {
      produce<BLOCK_M, BLOCK_N, kType, kOutFp32, kClusterSize>(&tmap_a, &tmap_b, &tmap_sfa, &tmap_sfb, p, smem, layout,
                                                               full, empty);
    } else if (threadIdx.x / 32 == K::kNumConsumerThreads / 32 + 1) {
      schedule<BLOCK_M, BLOCK_N, kType, kClusterSize, K::kSplitK>(p, smem, layout, tile_full, tile_empty);
    }
  } else {
    if constexpr (kReallocateRegisters) ptx::warpgroup::setmaxnreg_inc<kConsumerRegs>();
    consume<BLOCK_M, BLOCK_N, kType, kOutFp32, kClusterSize>(&tmap_d, &tmap_c, p, smem, layout, full, empty,
                                                             tile_full, tile_empty);
  }
}

// Split K: d [m, n] (bf16, row stride ldd) = the sum over splits of partials [num_splits, m, n] (fp32),
// 8 columns a thread, the splits added in order (the result is the same bits every run).
constexpr int kSplitSumThreads = 256;

__global__ void __launch_bounds__(kSplitSumThreads) sm90_fp8_gemm_split_sum_kernel(
    const float* __restrict__ partials, __nv_bfloat16* __restrict__ d, int64_t ldd, int m, int n, int num_splits) {
  ptx::griddep_wait();  // launched with PDL behind the GEMM that writes the partials
  const int chunks_per_row = n / 8;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kSplitSumThreads + threadIdx.x;
  if (chunk >= static_cast<int64_t>(m) * chunks_per_row) return;
  const int64_t row = chunk / chunks_per_row;
  const int col = static_cast<int>(chunk % chunks_per_row) * 8;
  float sum[8] = {};
  for (int split = 0; split < num_splits; ++split) {
    const float4* src = reinterpret_cast<const float4*>(partials + (split * static_cast<int64_t>(m) + row) * n + col);
    const float4 lo = __ldcs(src), hi = __ldcs(src + 1);  // read once: streaming
    sum[0] += lo.x, sum[1] += lo.y, sum[2] += lo.z, sum[3] += lo.w;
    sum[4] += hi.x, sum[5] += hi.y, sum[6] += hi.z, sum[7] += hi.w;
  }
  __nv_bfloat162 out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = __floats2bfloat162_rn(sum[2 * i], sum[2 * i + 1]);
  *reinterpret_cast<int4*>(d + row * ldd + col) = *reinterpret_cast<const int4*>(out);
}

}  // namespace dso::gemm

// =============================================================================================
// Host side: tensor maps, dispatch. The tile configuration is chosen in sm90_fp8_gemm_config.cpp.
namespace dso {
namespace {

using gemm::GemmParams;

CUtensorMapSwizzle swizzle_mode(int bytes) {
  return bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_32B;
}

// DSO_FP8_GEMM_VERBOSE=1 prints every launch's configuration. Read once: getenv scans the whole
// environment, and the switch is for runs started with it.
bool verbose() {
  static const bool on = [] {
    const char* value = std::getenv("DSO_FP8_GEMM_VERBOSE");
    return value != nullptr && *value == '1';
  }();
  return on;
}

struct LaunchArgs {
  CUtensorMap tmap_a, tmap_b, tmap_sfa, tmap_sfb, tmap_d, tmap_c;
  GemmParams params;
  Fp8GemmConfig config;
  cudaStream_t stream;
};

template <int BLOCK_M, int BLOCK_N, GemmType kType, bool kOutFp32, int kClusterSize>
void launch_kernel(const LaunchArgs& args) {
  auto* kernel = &gemm::sm90_fp8_gemm_kernel<BLOCK_M, BLOCK_N, kType, kOutFp32, kClusterSize>;
  using K = gemm::Kernel<BLOCK_M, BLOCK_N, kType, kOutFp32, kClusterSize>;
  const int smem = K::layout(args.config.num_stages, args.params.num_k_blocks).total_bytes();
  static std::once_flag attribute_set[kMaxDevices];  // one per kernel instantiation
  once_per_device(attribute_set, [kernel] {
    int device = 0, max_smem = 0;
    DSO_CUDA_CHECK(cudaGetDevice(&device));
    DSO_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    DSO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
  });
  cudaLaunchConfig_t launch = {};
  launch.gridDim = dim3(args.config.num_ctas);
  launch.blockDim = dim3(K::kNumThreads);
  launch.dynamicSmemBytes = smem;
  launch.stream = args.stream;
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = kClusterSize;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  launch.attrs = &cluster;
  launch.numAttrs = kClusterSize > 1 ? 1 : 0;
  if constexpr (kClusterSize > 1) {
    // NOTE: the grid is persistent: clusters that cannot be resident at once would run their whole
    // share of tiles after the others. A cluster lives in one GPC, so fewer than num_sms / 2 pairs
    // may fit.
    static int max_clusters[kMaxDevices];
    static std::once_flag queried[kMaxDevices];
    int device = 0;
    DSO_CUDA_CHECK(cudaGetDevice(&device));
    once_per_device(queried, [&] {
      DSO_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&max_clusters[device % kMaxDevices], kernel, &launch));
    });
    const int resident = max_clusters[device % kMaxDevices] * kClusterSize;
    if (resident > 0 && static_cast<int>(launch.gridDim.x) > resident) launch.gridDim.x = resident;
    if (verbose()) {
      std::fprintf(stderr, "deepseek_ops fp8 gemm: at most %d clusters of %d resident, grid %u\n",
                   max_clusters[device % kMaxDevices], kClusterSize, launch.gridDim.x);
    }
  }
  DSO_CUDA_CHECK(cudaLaunchKernelEx(&launch, kernel, args.tmap_a, args.tmap_b, args.tmap_sfa, args.tmap_sfb,
                                    args.tmap_d, args.tmap_c, args.params, args.config.num_stages));
}

template <GemmType kType, bool kOutFp32, int BLOCK_M, int kClusterSize, int... BLOCK_Ns>
bool dispatch_block_n(const LaunchArgs& args) {
  return ((args.config.block_n == BLOCK_Ns
               ? (launch_kernel<BLOCK_M, BLOCK_Ns, kType, kOutFp32, kClusterSize>(args), true)
               : false) ||
          ...);
}

// Every variant gemm::variant_instantiated names (tests/test_fp8_gemm.py runs each one).
bool dispatch(const LaunchArgs& args, GemmType type, bool out_fp32) {
  const int block_m = args.config.block_m;
  const int cluster = args.config.cluster_size;
  if (cluster == 2) {
    return type == GemmType::kNormal && !out_fp32 && block_m == 256 &&
           dispatch_block_n<GemmType::kNormal, false, 256, 2, DSO_GEMM_WIDE_BLOCK_NS>(args);
  }
  if (cluster != 1) return false;
  switch (type) {
    case GemmType::kNormal:
      if (out_fp32) {
        return (block_m == 64 && dispatch_block_n<GemmType::kNormal, true, 64, 1, DSO_GEMM_BLOCK_NS>(args)) ||
               (block_m == 128 && dispatch_block_n<GemmType::kNormal, true, 128, 1, DSO_GEMM_BLOCK_NS>(args));
      }
      return (block_m == 64 && dispatch_block_n<GemmType::kNormal, false, 64, 1, DSO_GEMM_BLOCK_NS>(args)) ||
             (block_m == 128 && dispatch_block_n<GemmType::kNormal, false, 128, 1, DSO_GEMM_BLOCK_NS>(args)) ||
             (block_m == 256 && dispatch_block_n<GemmType::kNormal, false, 256, 1, DSO_GEMM_WIDE_BLOCK_NS>(args));
    case GemmType::kGroupedContiguous:
      return !out_fp32 && block_m == 128 &&
             dispatch_block_n<GemmType::kGroupedContiguous, false, 128, 1, DSO_GEMM_BLOCK_NS>(args);
    case GemmType::kGroupedMasked:
      return !out_fp32 &&
             ((block_m == 64 && dispatch_block_n<GemmType::kGroupedMasked, false, 64, 1, DSO_GEMM_BLOCK_NS>(args)) ||
              (block_m == 128 && dispatch_block_n<GemmType::kGroupedMasked, false, 128, 1, DSO_GEMM_BLOCK_NS>(args)));
    case GemmType::kWgrad:
      return out_fp32 &&
             ((block_m == 64 && dispatch_block_n<GemmType::kWgrad, true, 64, 1, DSO_GEMM_WGRAD_64_BLOCK_NS>(args)) ||
              (block_m == 128 && dispatch_block_n<GemmType::kWgrad, true, 128, 1, DSO_GEMM_WGRAD_BLOCK_NS>(args)));
    case GemmType::kKGroupedWgrad:
      return out_fp32 &&
             ((block_m == 64 &&
               dispatch_block_n<GemmType::kKGroupedWgrad, true, 64, 1, DSO_GEMM_WGRAD_64_BLOCK_NS>(args)) ||
              (block_m == 128 &&
               dispatch_block_n<GemmType::kKGroupedWgrad, true, 128, 1, DSO_GEMM_WGRAD_BLOCK_NS>(args)));
  }
  return false;
}

void check_problem(const Fp8GemmProblem& p) {
  if (p.m <= 0 || p.n <= 0 || p.k <= 0 || p.k % 128 != 0 || p.n % 16 != 0) {
    throw std::runtime_error("deepseek_ops: launch_sm90_fp8_gemm needs m > 0, n a multiple of 16, k a multiple of 128");
  }
  // NOTE: the epilogue writes 16-byte chunks (TMA stores or vector stores): d and its rows must be
  // 16-byte aligned.
  if (reinterpret_cast<uintptr_t>(p.d) % 16 != 0 || (p.ldd * (p.d_fp32 ? 4 : 2)) % 16 != 0) {
    throw std::runtime_error("deepseek_ops: launch_sm90_fp8_gemm needs d and its row stride 16-byte aligned");
  }
  // NOTE: the same for c, read in 16-byte chunks (fp32 output) or by TMA (weight gradients).
  if (p.c != nullptr && (reinterpret_cast<uintptr_t>(p.c) % 16 != 0 || (p.ldc * 4) % 16 != 0)) {
    throw std::runtime_error("deepseek_ops: launch_sm90_fp8_gemm needs c and its row stride 16-byte aligned");
  }
}

void launch_checked(const Fp8GemmProblem& p, const Fp8GemmConfig& config, cudaStream_t stream) {
  LaunchArgs args;
  args.config = config;
  args.stream = stream;
  // Split K: the GEMM writes fp32 partial sums [num_splits * m, n] (split s: rows s * m + row), then
  // sm90_fp8_gemm_split_sum_kernel adds them into d. complete() (sm90_fp8_gemm_config.cpp) holds the
  // rules for when a configuration may split; the workspace is the caller's.
  const int num_splits = args.config.num_splits;
  const bool split = num_splits > 1;
  if (split && p.split_partials == nullptr) {
    throw std::runtime_error("deepseek_ops: split-K fp8 gemm: split_partials is null (the caller allocates "
                             "[num_splits, m, n] fp32 when the configuration splits K)");
  }
  const int block_m = args.config.block_m, block_n = args.config.block_n;
  const bool masked = p.type == GemmType::kGroupedMasked;
  const int64_t a_rows = masked ? p.num_groups * p.m : p.m;
  const bool wgrad = is_wgrad(p.type);
  const int64_t b_rows = p.type == GemmType::kNormal || wgrad ? p.n : p.num_groups * p.n;
  const int64_t num_k_blocks = p.k / 128;
  // Clusters load A in halves (multicast to both CTAs of a pair, or both halves alone).
  args.tmap_a = cached_tensor_map_2d(p.a, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, p.k, a_rows, p.lda, 128,
                                   block_m / args.config.cluster_size, CU_TENSOR_MAP_SWIZZLE_128B, "a");
  args.tmap_b = cached_tensor_map_2d(p.b, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, p.k, b_rows, p.ldb, 128, block_n,
                                   CU_TENSOR_MAP_SWIZZLE_128B, "b");
  args.tmap_sfa = cached_tensor_map_2d(p.a_scales, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, a_rows, num_k_blocks,
                                     p.a_scales_ld, block_m, 1, CU_TENSOR_MAP_SWIZZLE_NONE, "a_scales");
  args.tmap_sfb = {};
  if (wgrad) {
    args.tmap_sfb = cached_tensor_map_2d(p.b_scales, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, p.n, num_k_blocks,
                                         p.b_scales_ld, block_n, 1, CU_TENSOR_MAP_SWIZZLE_NONE, "b_scales");
  }
  args.tmap_d = {};
  args.tmap_c = {};
  const int wg_rows = block_m / gemm::num_consumer_warpgroups(block_m);
  if (wgrad) {
    // d and c as [groups][m][n] in boxes of one staging atom [wg_rows][32 floats] (store_tile_wgrad).
    auto fp32_map = [&](const float* base, int64_t ld, const char* what) {
      const TensorMapShape shape{3, static_cast<uint64_t>(p.n), static_cast<uint64_t>(p.m), static_cast<uint64_t>(ld),
                                 gemm::kWgradAtomCols, static_cast<uint32_t>(wg_rows),
                                 static_cast<uint64_t>(p.num_groups), static_cast<uint64_t>(p.m * ld), 1};
      return cached_tensor_map(base, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, shape, CU_TENSOR_MAP_SWIZZLE_128B, what);
    };
    args.tmap_d = fp32_map(static_cast<const float*>(p.d), p.ldd, "d");
    if (p.c != nullptr) args.tmap_c = fp32_map(p.c, p.ldc, "c");
  } else if (!p.d_fp32 && !split) {
    // Each consumer warpgroup stores its rows in boxes of one swizzle atom's columns.
    const int swizzle = gemm::d_swizzle_bytes(block_n);
    args.tmap_d = cached_tensor_map_2d(p.d, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, p.n, a_rows, p.ldd, swizzle / 2,
                                     wg_rows, swizzle_mode(swizzle), "d");
  }
  args.params = GemmParams{p.b_scales,
                           split ? static_cast<void*>(p.split_partials) : p.d,
                           p.c,
                           p.m_indices,
                           p.masked_m,
                           split ? p.n : p.ldd,
                           p.ldc,
                           static_cast<int>(p.m),
                           static_cast<int>(p.n),
                           static_cast<int>(num_k_blocks),
                           static_cast<int>(p.num_groups),
                           p.k_block_offsets,
                           args.config.reduce_c_into_d,
                           num_splits};
  if (verbose()) {
    std::fprintf(stderr, "deepseek_ops fp8 gemm: type %d m %lld n %lld k %lld groups %lld -> BLOCK_M %d BLOCK_N %d "
                 "stages %d cluster %d splits %d ctas %d%s\n", static_cast<int>(p.type),
                 static_cast<long long>(p.m), static_cast<long long>(p.n), static_cast<long long>(p.k),
                 static_cast<long long>(p.num_groups), block_m, block_n, args.config.num_stages,
                 args.config.cluster_size, num_splits, args.config.num_ctas,
                 args.config.reduce_c_into_d ? " in-place reduce-add" : "");
  }
  if (!dispatch(args, p.type, p.d_fp32 || split)) {
    throw std::runtime_error("deepseek_ops: no fp8 gemm kernel instantiated for BLOCK_M=" + std::to_string(block_m) +
                             ", BLOCK_N=" + std::to_string(block_n) + ", cluster " +
                             std::to_string(args.config.cluster_size) + (p.d_fp32 ? ", fp32" : ", bf16") +
                             " output and this gemm type");
  }
  if (split) {
    const int64_t chunks = p.m * (p.n / 8);
    launch_with_pdl(gemm::sm90_fp8_gemm_split_sum_kernel,
                    dim3(static_cast<unsigned>((chunks + gemm::kSplitSumThreads - 1) / gemm::kSplitSumThreads)),
                    gemm::kSplitSumThreads, 0, stream, static_cast<const float*>(p.split_partials),
                    static_cast<__nv_bfloat16*>(p.d), p.ldd, static_cast<int>(p.m), static_cast<int>(p.n),
                    num_splits);
  }
}

}  // namespace

void launch_sm90_fp8_gemm(const Fp8GemmProblem& p, const Fp8GemmConfig& config, cudaStream_t stream) {
  check_problem(p);
  launch_checked(p, config, stream);
}

void launch_sm90_fp8_gemm(const Fp8GemmProblem& p, cudaStream_t stream) {
  check_problem(p);
  launch_checked(p, select_sm90_fp8_gemm_config(p), stream);
}

}  // namespace dso
