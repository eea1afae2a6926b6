// The FP8 GEMM tile variants that are compiled (csrc/sm90_fp8_gemm.cu dispatches over them, the
// configuration heuristic chooses among them, and the extension reports them to the tests).
#pragma once
#include "sm90_fp8_gemm.h"

// Widths of 64- and 128-row tiles (multiples of 16 whose tiles touch at most 2 scale blocks).
// -DDSO_GEMM_BLOCK_NS=128 -DDSO_GEMM_WIDE_BLOCK_NS=128 builds a single width (quick iteration).
#ifndef DSO_GEMM_BLOCK_NS
#define DSO_GEMM_BLOCK_NS 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 192
#endif
// Widths of 256-row tiles (dense, bf16 output): two 64-row passes per warpgroup hold BLOCK_N
// fp32 results per thread, so BLOCK_N <= 128.
#ifndef DSO_GEMM_WIDE_BLOCK_NS
#define DSO_GEMM_WIDE_BLOCK_NS 64, 96, 112, 128
#endif
// Widths of weight-gradient tiles (fp32 output, B scaled per row), multiples of the 32-column staging
// atom: of 128-row tiles, and of 64-row tiles (one consumer warpgroup: no other warpgroup's wgmma hides
// the promotion of a tile wider than 128).
#ifndef DSO_GEMM_WGRAD_BLOCK_NS
#define DSO_GEMM_WGRAD_BLOCK_NS 64, 128, 160, 192
#endif
#ifndef DSO_GEMM_WGRAD_64_BLOCK_NS
#define DSO_GEMM_WGRAD_64_BLOCK_NS 64, 128
#endif

namespace dso::gemm {

constexpr int kBlockNs[] = {DSO_GEMM_BLOCK_NS};
constexpr int kWideBlockNs[] = {DSO_GEMM_WIDE_BLOCK_NS};
constexpr int kWgradBlockNs[] = {DSO_GEMM_WGRAD_BLOCK_NS};
constexpr int kWgrad64BlockNs[] = {DSO_GEMM_WGRAD_64_BLOCK_NS};

template <int kSize>
constexpr bool contains(const int (&values)[kSize], int value) {
  for (int v : values) {
    if (v == value) return true;
  }
  return false;
}

// Weight-gradient tiles (fp32 output): 64 and 128 rows, of their own widths.
constexpr bool wgrad_variant_instantiated(int block_m, int block_n) {
  return block_m == 128 ? contains(kWgradBlockNs, block_n) : block_m == 64 && contains(kWgrad64BlockNs, block_n);
}

// Contiguous groups are 128-row aligned, so that layout has 128-row tiles only; fp32 output and the
// grouped layouts have no 256-row tiles; the masked layout takes the same 64/128-row tiles as dense.
// Clusters of two CTAs sharing A serve the dense 256-row tiles.
constexpr bool variant_instantiated(GemmType type, bool out_fp32, int block_m, int block_n, int cluster_size) {
  if (cluster_size != 1 && (cluster_size != 2 || block_m != 256)) return false;
  if (is_wgrad(type)) {
    return out_fp32 && wgrad_variant_instantiated(block_m, block_n);
  }
  if (block_m == 256) return type == GemmType::kNormal && !out_fp32 && contains(kWideBlockNs, block_n);
  if (!contains(kBlockNs, block_n)) return false;
  switch (type) {
    case GemmType::kNormal:
      return block_m == 64 || block_m == 128;
    case GemmType::kGroupedContiguous:
      return !out_fp32 && block_m == 128;
    case GemmType::kGroupedMasked:
      return !out_fp32 && (block_m == 64 || block_m == 128);
    case GemmType::kWgrad:
    case GemmType::kKGroupedWgrad:
      return false;  // above
  }
  return false;
}

}  // namespace dso::gemm
