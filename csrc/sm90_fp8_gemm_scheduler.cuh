// Persistent tile scheduler shared by the dense and grouped FP8 GEMMs.
//
// CTA b walks tiles b, b + gridDim.x, ... of one linear order. Producer and consumers of a CTA
// each run their own copy and see the same sequence. Dense and contiguous-grouped problems tile
// [m, n]; masked-grouped problems concatenate, group after group, the tiles of each group's
// ceil(masked_m[g] / BLOCK_M) row blocks (read from device memory: no host sync).
//
// Dense problems may run in clusters of two CTAs that share A: the pair walks pairs of tiles with the
// same row block and adjacent column blocks, each CTA loading half of A for both (TMA multicast). An
// odd last column block is covered at the end by pairs of row blocks that load their own A.
#pragma once
#include <cstdint>

#include "sm90_fp8_gemm.h"

namespace dso::gemm {

// Row blocks per band of the rasterization: consecutive tiles sweep kBandRows row blocks before
// moving to the next column block, so a wave of CTAs shares a few A and B panels in L2.
constexpr int kBandRows = 8;

// Kernel arguments besides the tensor maps (all sizes in elements).
struct GemmParams {
  const float* b_scales;  // [groups, num_n_scale_blocks, num_k_blocks]
  void* d;
  const float* c;
  const int32_t* m_indices;
  const int32_t* masked_m;
  int64_t ldd;
  int64_t ldc;
  int m;  // rows (masked: rows per group)
  int n;
  int num_k_blocks;
  int num_groups;
  const int32_t* k_block_offsets;  // k-grouped wgrad
  bool reduce_c_into_d;            // weight gradients, c == d: Fp8GemmConfig::reduce_c_into_d
  // Dense: Fp8GemmConfig::num_splits. Above 1, d is the fp32 partials [num_splits * m, n] and split s of
  // a tile writes its rows s * m + row.
  int num_splits;
};

struct Tile {
  int m_block_idx;
  int n_block_idx;
  int group_idx;
  int row;        // first row of the tile in D's row space, groups flattened
  int a_row;      // its first row in A's row space: `row`, except for k-grouped wgrad (A shared by groups)
  int k_begin;    // the tile's K blocks: [k_begin, k_begin + k_count), all of them except for k-grouped
  int k_count;    // wgrad and split K
  int num_rows;   // rows of the tile that hold valid output (<= BLOCK_M)
  bool multicast; // clusters: the peer CTA's tile has the same rows, and each loads half of A for both
};

__device__ __forceinline__ void rasterize(int tile_idx, int num_m_blocks, int num_n_blocks, int& m_block_idx,
                                          int& n_block_idx) {
  const int band_tiles = kBandRows * num_n_blocks;
  const int band_idx = tile_idx / band_tiles;
  const int first_m = band_idx * kBandRows;
  const int band_m_blocks = min(kBandRows, num_m_blocks - first_m);
  const int in_band = tile_idx - band_idx * band_tiles;
  m_block_idx = first_m + in_band % band_m_blocks;
  n_block_idx = in_band / band_m_blocks;
}

// kSplitK: the dense layout's tiles split over K (GemmParams::num_splits; only the kernel that may split
// carries the split arithmetic, Kernel::kSplitK).
template <GemmType kType, int BLOCK_M, int BLOCK_N, int kClusterSize = 1, bool kSplitK = false>
struct TileScheduler {
  static_assert(kClusterSize == 1 || (kClusterSize == 2 && kType == GemmType::kNormal),
                "clusters of two CTAs serve the dense layout");
  static_assert(!kSplitK || (kType == GemmType::kNormal && kClusterSize == 1), "split K: dense, no cluster");
  const GemmParams& p;
  int num_n_blocks;
  int num_m_blocks;  // dense / contiguous; masked: of the current group
  int next_tile_idx; // clusters: the next tile pair
  // Masked: tiles [group_begin, group_end) belong to group current_group.
  int current_group = -1;
  int group_begin = 0;
  int group_end = 0;

  __device__ __forceinline__ explicit TileScheduler(const GemmParams& params)
      : p(params), num_n_blocks((params.n + BLOCK_N - 1) / BLOCK_N),
        num_m_blocks((params.m + BLOCK_M - 1) / BLOCK_M), next_tile_idx(blockIdx.x / kClusterSize) {}

  // Clusters of two: pair pair_idx -> this CTA's tile (rank = blockIdx.x % 2 in a 1-D grid of clusters).
  __device__ __forceinline__ bool pair_tile(int pair_idx, Tile& tile) const {
    const int rank = blockIdx.x % 2;
    const int num_multicast_pairs = num_m_blocks * (num_n_blocks / 2);
    if (pair_idx < num_multicast_pairs) {
      int n_pair_idx;
      rasterize(pair_idx, num_m_blocks, num_n_blocks / 2, tile.m_block_idx, n_pair_idx);
      tile.n_block_idx = 2 * n_pair_idx + rank;
      tile.multicast = true;
    } else {
      // The odd last column block: row blocks 2q and 2q + 1; the last pair may have one tile only.
      const int q = pair_idx - num_multicast_pairs;
      if (num_n_blocks % 2 == 0 || 2 * q + rank >= num_m_blocks) return false;
      tile.m_block_idx = 2 * q + rank;
      tile.n_block_idx = num_n_blocks - 1;
      tile.multicast = false;
    }
    tile.row = tile.m_block_idx * BLOCK_M;
    tile.num_rows = min(BLOCK_M, p.m - tile.row);
    tile.group_idx = 0;
    return true;
  }

  // Rows of group g that are valid; device data is clamped so a bad masked_m never writes out of bounds.
  __device__ __forceinline__ int masked_rows(int g) const { return max(0, min(__ldg(p.masked_m + g), p.m)); }

  __device__ __forceinline__ bool next(Tile& tile) {
    const bool found = next_tile(tile);
    if constexpr (kType != GemmType::kKGroupedWgrad && !kSplitK) {
      tile.a_row = tile.row;
      tile.k_begin = 0;
      tile.k_count = p.num_k_blocks;
    }
    return found;
  }

 private:
  __device__ __forceinline__ bool next_tile(Tile& tile) {
    if constexpr (kClusterSize == 2) {
      const int pair_idx = next_tile_idx;
      next_tile_idx += gridDim.x / 2;
      return pair_tile(pair_idx, tile);
    }
    tile.multicast = false;
    while (true) {
      const int tile_idx = next_tile_idx;
      next_tile_idx += gridDim.x;
      if constexpr (kType == GemmType::kGroupedMasked) {
        while (tile_idx >= group_end) {
          if (++current_group >= p.num_groups) return false;
          num_m_blocks = (masked_rows(current_group) + BLOCK_M - 1) / BLOCK_M;
          group_begin = group_end;
          group_end += num_m_blocks * num_n_blocks;
        }
        rasterize(tile_idx - group_begin, num_m_blocks, num_n_blocks, tile.m_block_idx, tile.n_block_idx);
        tile.group_idx = current_group;
        tile.row = current_group * p.m + tile.m_block_idx * BLOCK_M;
        tile.num_rows = min(BLOCK_M, masked_rows(current_group) - tile.m_block_idx * BLOCK_M);
        return true;
      } else if constexpr (kType == GemmType::kKGroupedWgrad) {
        // Every group has the same tiles; group g contracts over its own K blocks (device data, clamped:
        // a bad offset never reads out of bounds; an empty range gives c or zeros).
        const int tiles_per_group = num_m_blocks * num_n_blocks;
        if (tile_idx >= p.num_groups * tiles_per_group) return false;
        tile.group_idx = tile_idx / tiles_per_group;
        rasterize(tile_idx - tile.group_idx * tiles_per_group, num_m_blocks, num_n_blocks, tile.m_block_idx,
                  tile.n_block_idx);
        tile.a_row = tile.m_block_idx * BLOCK_M;
        tile.row = tile.group_idx * p.m + tile.a_row;
        tile.num_rows = min(BLOCK_M, p.m - tile.a_row);
        tile.k_begin = min(max(__ldg(p.k_block_offsets + tile.group_idx), 0), p.num_k_blocks);
        tile.k_count = min(max(__ldg(p.k_block_offsets + tile.group_idx + 1), tile.k_begin), p.num_k_blocks) -
                       tile.k_begin;
        return true;
      } else if constexpr (kSplitK) {
        // Split K: the splits of a tile are adjacent in the order (they share A's rows and B's columns
        // in L2); split s takes K blocks [s * nkb / S, (s + 1) * nkb / S), at least one as S <= nkb.
        const int num_splits = p.num_splits;
        if (tile_idx >= num_m_blocks * num_n_blocks * num_splits) return false;
        const int split = tile_idx % num_splits;
        rasterize(tile_idx / num_splits, num_m_blocks, num_n_blocks, tile.m_block_idx, tile.n_block_idx);
        tile.a_row = tile.m_block_idx * BLOCK_M;
        tile.row = split * p.m + tile.a_row;
        tile.num_rows = min(BLOCK_M, p.m - tile.a_row);
        tile.group_idx = 0;
        tile.k_begin = split * p.num_k_blocks / num_splits;
        tile.k_count = (split + 1) * p.num_k_blocks / num_splits - tile.k_begin;
        return true;
      } else {
        if (tile_idx >= num_m_blocks * num_n_blocks) return false;
        rasterize(tile_idx, num_m_blocks, num_n_blocks, tile.m_block_idx, tile.n_block_idx);
        tile.row = tile.m_block_idx * BLOCK_M;
        tile.num_rows = min(BLOCK_M, p.m - tile.row);
        tile.group_idx = 0;
        if constexpr (kType == GemmType::kGroupedContiguous) {
          // A block belongs to the group of its first row (groups are BLOCK_M-aligned); blocks of
          // padding (-1) and out-of-range groups are skipped: their output rows stay untouched.
          tile.group_idx = __ldg(p.m_indices + tile.row);
          if (tile.group_idx < 0 || tile.group_idx >= p.num_groups) continue;
        }
        return true;
      }
    }
  }
};

}  // namespace dso::gemm
