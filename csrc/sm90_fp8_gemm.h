// Launcher of the FP8 GEMM kernels (csrc/sm90_fp8_gemm.cu): dense and grouped (MoE) variants of
// d = (a * a_scales) @ (b * b_scales)^T (+ c), DeepSeek-V3 scaling (1 x 128 on a, 128 x 128 on b).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace dso {

enum class GemmType : int {
  kNormal = 0,             // a [m, k], b [n, k], d [m, n]
  kGroupedContiguous = 1,  // a [m, k] with rows grouped by expert, b [groups, n, k]; m_indices[row] = group or -1
  kGroupedMasked = 2,      // a [groups, m, k], b [groups, n, k], d [groups, m, n]; only masked_m[g] rows valid
  kWgrad = 3,              // a [m, k], b [n, k], both scaled 1 x 128 along k (weight gradients); fp32 d [m, n]
  kKGroupedWgrad = 4,      // kWgrad per group g over the K blocks [k_block_offsets[g], [g + 1]); d [groups, m, n]
};

// Weight gradients: B scaled 1 x 128 (per row) like A, fp32 output; the other types scale B per 128 x 128 block.
constexpr bool is_wgrad(GemmType type) { return type == GemmType::kWgrad || type == GemmType::kKGroupedWgrad; }

struct Fp8GemmProblem {
  GemmType type = GemmType::kNormal;
  // e4m3, K-major; row stride `lda` in elements (bytes), a multiple of 16. Masked: [groups * m, k].
  const void* a = nullptr;
  int64_t lda = 0;
  // fp32, M-major (the layout deepseek_ops/gemm.py describes): (row, k_block) at
  // a_scales[k_block * a_scales_ld + row].
  // Masked: rows are flattened like a's, row = group * m + row_in_group.
  const float* a_scales = nullptr;
  int64_t a_scales_ld = 0;
  // e4m3, K-major [groups * n, k] with row stride `ldb`; b_scales fp32 [groups, ceil(n / 128), k / 128] contiguous.
  // kWgrad: b_scales per row, [n, k / 128] in the N-major layout of a_scales: (row, k_block) at
  // b_scales[k_block * b_scales_ld + row], ld a multiple of 4.
  const void* b = nullptr;
  int64_t ldb = 0;
  const float* b_scales = nullptr;
  int64_t b_scales_ld = 0;
  // Output [rows, n] with row stride `ldd` (a multiple of 8 elements), bf16 or fp32.
  void* d = nullptr;
  int64_t ldd = 0;
  bool d_fp32 = false;
  // Optional fp32 addend [rows, n] with row stride `ldc` (fp32 output only); may alias d.
  const float* c = nullptr;
  int64_t ldc = 0;
  const int32_t* m_indices = nullptr;  // contiguous: [m], group of each row, -1 for padding rows
  const int32_t* masked_m = nullptr;   // masked: [groups], valid rows of each group (on the device)
  // k-grouped wgrad: [groups + 1] K-block offsets (on the device; clamped to [0, k / 128], non-decreasing).
  const int32_t* k_block_offsets = nullptr;
  int64_t m = 0;                       // rows (masked: rows per group, M_max)
  int64_t n = 0;                       // a multiple of 16
  int64_t k = 0;                       // a positive multiple of 128
  int64_t num_groups = 1;
  int64_t expected_m = 0;              // masked: rows per group to tune for (a hint)
  // Dense bf16 output without c, when the configuration splits K (Fp8GemmConfig::num_splits > 1): fp32
  // workspace [num_splits, m, n], contiguous, for the splits' partial sums. The caller allocates it on
  // the launch's stream (select_sm90_fp8_gemm_config says whether and how large).
  float* split_partials = nullptr;
};

// Tile configuration. Chosen by a heuristic (csrc/sm90_fp8_gemm_config.cpp) unless the environment
// variable DSO_FP8_GEMM_CONFIG="BLOCK_MxBLOCK_N[xSTAGES[xCLUSTER[xSPLITS]]]" forces one (STAGES 0: as
// many as fit; used by tests to cover every variant); DSO_FP8_GEMM_VERBOSE=1 prints the configuration
// of every launch to stderr (for tuning).
struct Fp8GemmConfig {
  int block_m = 0;
  int block_n = 0;
  int num_stages = 0;
  int cluster_size = 1;  // 2: pairs of CTAs share A through TMA multicast (dense)
  // Split K (dense, bf16 output, no c): each tile's K blocks are shared by num_splits CTAs, which write
  // fp32 partial sums into Fp8GemmProblem::split_partials; a second kernel adds them into d. For few
  // tiles and long K (small M), where the unsplit grid leaves SMs idle or re-reads A from L2 per tile.
  int num_splits = 1;
  int num_ctas = 0;
  // Weight gradients with c == d (accumulated in place): add each tile into d by TMA reduce-add (true),
  // or load c's tile into shared memory first and store the sum (false). Chosen per call
  // (reduce_c_into_d in csrc/sm90_fp8_gemm_config.cpp) unless DSO_FP8_GEMM_IN_PLACE=reduce|load forces it.
  bool reduce_c_into_d = false;
};

// The configuration launch_sm90_fp8_gemm would use (no launch).
Fp8GemmConfig select_sm90_fp8_gemm_config(const Fp8GemmProblem& problem);

// Requires m > 0 (callers return early for empty outputs). Throws std::runtime_error on bad config.
void launch_sm90_fp8_gemm(const Fp8GemmProblem& problem, cudaStream_t stream);
// The same with the configuration select_sm90_fp8_gemm_config returned for this problem, for callers
// that read it first (to size the split-K workspace): one selection a call, not two.
void launch_sm90_fp8_gemm(const Fp8GemmProblem& problem, const Fp8GemmConfig& config, cudaStream_t stream);

}  // namespace dso
