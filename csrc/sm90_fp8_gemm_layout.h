// Tile geometry and shared-memory layout of the FP8 GEMM (csrc/sm90_fp8_gemm.cu), one definition for
// the kernel and for the host code that sizes the pipeline (csrc/sm90_fp8_gemm_config.cpp).
#pragma once

#ifdef __CUDACC__
#define DSO_HOST_DEVICE __host__ __device__
#else
#define DSO_HOST_DEVICE
#endif

namespace dso::gemm {

constexpr int BLOCK_K = 128;  // one scale per 128 K: a K block is exactly one scale block
constexpr int kWgmmaM = 64;   // rows of one wgmma; a warpgroup owns one or two such passes
constexpr int kMaxStages = 10;
// The scheduler warp runs one tile ahead of the consumers: tiles pass through a ring of two slots.
constexpr int kNumTileSlots = 2;
constexpr int kTileSlotHeaderBytes = 64;  // the Tile and its valid flag; the tile's B scales follow

constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

// A BLOCK_N-wide tile starts at a multiple of gcd(BLOCK_N, 128), so it touches at most two of B's
// 128-row scale blocks when BLOCK_N - gcd(BLOCK_N, 128) <= 128.
constexpr bool block_n_supported(int block_n) {
  return block_n % 16 == 0 && block_n >= 16 && block_n <= 256 && block_n - gcd(block_n, 128) <= 128;
}

// BLOCK_M = 64: one consumer warpgroup; 128: two of 64 rows; 256: two of 128 rows (two wgmma passes).
constexpr int num_consumer_warpgroups(int block_m) { return block_m == 64 ? 1 : 2; }

// bf16 output is staged for TMA stores in atoms of kSwizzle-byte rows (the widest swizzle that
// divides a row of the tile): a warp's stmatrix rows then land on distinct banks.
constexpr int d_swizzle_bytes(int block_n) {
  return (block_n * 2) % 128 == 0 ? 128 : (block_n * 2) % 64 == 0 ? 64 : 32;
}

constexpr int align_1024(int bytes) { return (bytes + 1023) / 1024 * 1024; }

// Weight gradients (B scaled per row) stage fp32 output in atoms of 32 columns: TMA boxes
// [wg_rows][32 floats] of c and d with the 128-byte swizzle.
constexpr int kWgradAtomCols = 32;

// [stages x A tile][stages x B tile][stages x A scales][stages x B scales: per-row B scales only][per
// warpgroup: D staging][2 tile slots: the tile and its B block scales][per warpgroup: a flag per
// row][full, empty barriers][tile full, tile empty barriers][per warpgroup: the barrier of its c tile
// (weight gradients)]. A and B tiles and D atoms start on 1024-byte boundaries (128-byte swizzle
// atoms).
struct SmemLayout {
  int block_m, block_n;
  bool out_fp32;
  int num_stages, num_k_blocks;
  bool b_scales_per_row = false;  // GemmType::kWgrad: B's scales are 1 x 128 per row, loaded per stage

  DSO_HOST_DEVICE constexpr int num_warpgroups() const { return num_consumer_warpgroups(block_m); }
  DSO_HOST_DEVICE constexpr int wg_rows() const { return block_m / num_warpgroups(); }
  DSO_HOST_DEVICE constexpr int a_bytes() const { return block_m * BLOCK_K; }  // e4m3: a byte an element
  DSO_HOST_DEVICE constexpr int b_bytes() const { return block_n * BLOCK_K; }
  DSO_HOST_DEVICE constexpr int sfa_bytes() const { return block_m * 4; }
  DSO_HOST_DEVICE constexpr int sfb_stage_bytes() const { return b_scales_per_row ? block_n * 4 : 0; }
  DSO_HOST_DEVICE constexpr int stage_tx_bytes() const {
    return a_bytes() + b_bytes() + sfa_bytes() + sfb_stage_bytes();
  }
  // fp32 output: rows padded by 16 bytes (the 8 rows a warp writes at once land on distinct banks);
  // weight gradients: swizzled atoms of kWgradAtomCols columns, unpadded.
  DSO_HOST_DEVICE constexpr int d_fp32_row_bytes() const { return block_n * 4 + 16; }
  DSO_HOST_DEVICE constexpr int d_bytes_per_warpgroup() const {
    return b_scales_per_row ? wg_rows() * block_n * 4
                            : out_fp32 ? wg_rows() * d_fp32_row_bytes() : align_1024(wg_rows() * block_n * 2);
  }
  // A tile slot: the tile (kTileSlotHeaderBytes) and, block-scaled B, its B scales [2 column blocks][num_k_blocks].
  DSO_HOST_DEVICE constexpr int tile_slot_bytes() const {
    return kTileSlotHeaderBytes + (b_scales_per_row ? 0 : 2 * num_k_blocks * 4);
  }
  DSO_HOST_DEVICE constexpr int a_offset(int stage) const { return stage * a_bytes(); }
  DSO_HOST_DEVICE constexpr int b_offset(int stage) const { return num_stages * a_bytes() + stage * b_bytes(); }
  DSO_HOST_DEVICE constexpr int sfa_offset(int stage) const {
    return num_stages * (a_bytes() + b_bytes()) + stage * sfa_bytes();
  }
  DSO_HOST_DEVICE constexpr int sfb_stage_offset(int stage) const {
    return num_stages * (a_bytes() + b_bytes() + sfa_bytes()) + stage * sfb_stage_bytes();
  }
  DSO_HOST_DEVICE constexpr int d_offset(int warpgroup) const {
    return align_1024(num_stages * stage_tx_bytes()) + warpgroup * d_bytes_per_warpgroup();
  }
  DSO_HOST_DEVICE constexpr int tile_slot_offset(int slot) const {
    return d_offset(num_warpgroups()) + slot * tile_slot_bytes();
  }
  // Per warpgroup, one byte per row: whether the row belongs to the tile (contiguous layout).
  DSO_HOST_DEVICE constexpr int row_ok_offset(int warpgroup) const {
    return tile_slot_offset(kNumTileSlots) + warpgroup * wg_rows();
  }
  // full[stages], empty[stages], tile_full[slots], tile_empty[slots]: 8 bytes each.
  DSO_HOST_DEVICE constexpr int barrier_offset() const { return (row_ok_offset(num_warpgroups()) + 7) / 8 * 8; }
  DSO_HOST_DEVICE constexpr int c_barrier_offset(int warpgroup) const {
    return barrier_offset() + 2 * (num_stages + kNumTileSlots) * 8 + warpgroup * 8;
  }
  DSO_HOST_DEVICE constexpr int total_bytes() const { return c_barrier_offset(num_warpgroups()); }
};

}  // namespace dso::gemm
