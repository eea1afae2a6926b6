// The dgrad GEMMs' operand kernels. dx = dy @ W runs on the NT FP8 GEMM (csrc/sm90_fp8_gemm.cu) as
// dy @ (W^T)^T: wgmma reads FP8 operands K-major only, and dgrad contracts over W's rows, so W
// [N, K] is transposed to [K, N] first (transpose_fp8). The grouped GEMM leaves rows outside every
// group untouched; dgrad defines them as zero (zero_ungrouped_rows).
#include "common.h"
#include "memory.cuh"
#include "sm90_fp8_dgrad.h"

namespace dso {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 128;  // bytes along both axes of a transposed tile
constexpr int kRowWords = kTile / 4;
constexpr int kRowsPerThread = 16;  // input rows a thread turns into one 16-byte output chunk
constexpr int kThreadRowGroups = kTile / kRowsPerThread;
static_assert(kThreadRowGroups * kRowWords == kThreads, "one thread per (16 rows, 4 columns) of the tile");
// The contiguous grouped GEMM's BLOCK_M (csrc/sm90_fp8_gemm_variants.h): a 128-row block belongs to the
// group of its first row.
constexpr int kGroupRows = 128;

// Word (row, word) of the tile. NOTE: each 16-row group is shifted by 4 words, so the transposing
// reads (a warp: 8 rows 16 apart x 4 consecutive words) hit 32 distinct banks; the 16-byte row
// chunks stay aligned.
__device__ __forceinline__ int smem_word(int row, int word) { return row * kRowWords + (row / 16) * 4 + word; }

// A 4 x 4 byte block: rows[i] holds row i's 4 bytes; on return rows[j] holds column j (row 0's byte low).
__device__ __forceinline__ void transpose_4x4_bytes(uint32_t (&rows)[4]) {
  const uint32_t b01_lo = __byte_perm(rows[0], rows[1], 0x5140), b23_lo = __byte_perm(rows[2], rows[3], 0x5140);
  const uint32_t b01_hi = __byte_perm(rows[0], rows[1], 0x7362), b23_hi = __byte_perm(rows[2], rows[3], 0x7362);
  rows[0] = __byte_perm(b01_lo, b23_lo, 0x5410);
  rows[1] = __byte_perm(b01_lo, b23_lo, 0x7632);
  rows[2] = __byte_perm(b01_hi, b23_hi, 0x5410);
  rows[3] = __byte_perm(b01_hi, b23_hi, 0x7632);
}

// One CTA per 128 x 128 tile of one group: coalesced 16-byte row loads into shared memory, then each
// thread reads 4 columns of 16 rows, transposes them in registers and writes 4 output rows' 16
// bytes (a store instruction: 4 output rows, 128 contiguous bytes each).
__global__ void __launch_bounds__(kThreads) sm90_transpose_fp8_kernel(const uint8_t* __restrict__ in,
                                                                     uint8_t* __restrict__ out, int64_t rows,
                                                                     int64_t cols, int64_t num_col_tiles) {
  __shared__ __align__(16) uint32_t smem_tile[kTile * kRowWords + kTile / 16 * 4];
  const int64_t row_tile_idx = blockIdx.x / num_col_tiles, col_tile_idx = blockIdx.x % num_col_tiles;
  const int64_t group_offset = static_cast<int64_t>(blockIdx.y) * rows * cols;
  const uint8_t* src = in + group_offset + row_tile_idx * kTile * cols + col_tile_idx * kTile;
  uint8_t* dst = out + group_offset + col_tile_idx * kTile * rows + row_tile_idx * kTile;

  constexpr int kRowChunks = kTile / 16;
  constexpr int kLoads = kTile * kRowChunks / kThreads;
  int4 raw[kLoads];
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int chunk = threadIdx.x + u * kThreads;
    raw[u] = ptx::ld_nc_na_v4(src + chunk / kRowChunks * cols + chunk % kRowChunks * 16);
  }
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int chunk = threadIdx.x + u * kThreads;
    *reinterpret_cast<int4*>(smem_tile + smem_word(chunk / kRowChunks, chunk % kRowChunks * 4)) = raw[u];
  }
  __syncthreads();

  // This thread: input columns [4 word, 4 word + 4), input rows [16 row_group, 16 row_group + 16).
  const int lane_idx = threadIdx.x % 32;
  const int word = threadIdx.x / 32 * 4 + lane_idx % 4;
  const int row_group = lane_idx / 4;
  uint32_t chunks[4][4];  // [output row j][word a]: input rows 4a..4a+3 of column 4 word + j
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    uint32_t block[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) block[i] = smem_tile[smem_word(row_group * kRowsPerThread + 4 * a + i, word)];
    transpose_4x4_bytes(block);
#pragma unroll
    for (int j = 0; j < 4; ++j) chunks[j][a] = block[j];
  }
  // NOTE: plain stores (not evict-first): the GEMM reads W^T right after this kernel.
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    *reinterpret_cast<int4*>(dst + (4 * word + j) * rows + row_group * kRowsPerThread) =
        make_int4(chunks[j][0], chunks[j][1], chunks[j][2], chunks[j][3]);
  }
}

// A warp per row: the row is zeroed unless the grouped GEMM writes it (its index names a group in
// [0, num_groups), the same as its 128-row block's first row: csrc/sm90_fp8_gemm_scheduler.cuh).
__global__ void __launch_bounds__(kThreads) sm90_zero_ungrouped_rows_kernel(const int32_t* __restrict__ m_indices,
                                                                           int64_t num_rows, int64_t num_groups,
                                                                           uint8_t* __restrict__ out,
                                                                           int64_t row_bytes) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= num_rows) return;
  const int32_t group_idx = __ldg(m_indices + row / kGroupRows * kGroupRows);
  if (group_idx >= 0 && group_idx < num_groups && __ldg(m_indices + row) == group_idx) return;
  int4* dst = reinterpret_cast<int4*>(out + row * row_bytes);
  for (int64_t i = threadIdx.x % 32; i < row_bytes / 16; i += 32) dst[i] = make_int4(0, 0, 0, 0);
}

}  // namespace

void launch_transpose_fp8(const void* in, void* out, int64_t num_groups, int64_t rows, int64_t cols,
                          cudaStream_t stream) {
  if (rows % kTile != 0 || cols % kTile != 0) {
    throw std::invalid_argument("deepseek_ops: transpose_fp8 needs rows and cols that are multiples of 128");
  }
  const int64_t num_col_tiles = cols / kTile, num_tiles = rows / kTile * num_col_tiles;
  if (num_tiles > INT32_MAX || num_groups > 65535) {
    throw std::invalid_argument("deepseek_ops: transpose_fp8: too many tiles or groups for one launch");
  }
  const dim3 grid(static_cast<unsigned>(num_tiles), static_cast<unsigned>(num_groups));
  sm90_transpose_fp8_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(in),
                                                           static_cast<uint8_t*>(out), rows, cols, num_col_tiles);
  DSO_LAUNCH_CHECK();
}

void launch_zero_ungrouped_rows(const int32_t* m_indices, int64_t num_rows, int64_t num_groups, void* out,
                                int64_t row_bytes, cudaStream_t stream) {
  const int64_t grid = ceil_div<int64_t>(num_rows, kThreads / 32);
  if (grid > INT32_MAX) throw std::invalid_argument("deepseek_ops: zero_ungrouped_rows: too many rows");
  sm90_zero_ungrouped_rows_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      m_indices, num_rows, num_groups, static_cast<uint8_t*>(out), row_bytes);
  DSO_LAUNCH_CHECK();
}

}  // namespace dso
