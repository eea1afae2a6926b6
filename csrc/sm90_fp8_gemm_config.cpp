// Tile configuration of the FP8 GEMM (host only): which instantiated variant (gemm::variant_instantiated)
// and how many pipeline stages a problem runs with.
#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>

#include <cuda_runtime.h>

#include "common.h"
#include "sm90_fp8_gemm.h"
#include "sm90_fp8_gemm_layout.h"
#include "sm90_fp8_gemm_variants.h"

namespace dso {
namespace {

using gemm::kMaxStages;
using gemm::SmemLayout;

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

// Split K (Fp8GemmConfig::num_splits): only the dense bf16 GEMM without c splits, and its splits run
// the fp32-output kernel into the partial sums.
bool splittable(const Fp8GemmProblem& p) { return p.type == GemmType::kNormal && !p.d_fp32 && p.c == nullptr; }
bool kernel_out_fp32(const Fp8GemmProblem& p, int num_splits) { return p.d_fp32 || num_splits > 1; }

// NOTE: kMaxStages at most. Letting narrow tiles fill shared memory (up to 20 stages of 64 x 32)
// changed no small-M time on the H200: bytes in flight do not limit them.
int max_stages(const Fp8GemmProblem& p, int block_m, int block_n, int num_splits, int max_smem) {
  const int num_k_blocks = static_cast<int>(p.k / 128);
  const bool b_scales_per_row = is_wgrad(p.type);
  const bool out_fp32 = kernel_out_fp32(p, num_splits);
  int stages = 0;
  while (stages < kMaxStages &&
         SmemLayout{block_m, block_n, out_fp32, stages + 1, num_k_blocks, b_scales_per_row}.total_bytes() <= max_smem) {
    ++stages;
  }
  return stages;
}

int64_t num_tiles(const Fp8GemmProblem& p, int block_m, int block_n, int64_t rows_per_group) {
  const int64_t n_blocks = ceil_div<int64_t>(p.n, block_n);
  if (p.type == GemmType::kGroupedMasked) return p.num_groups * ceil_div<int64_t>(rows_per_group, block_m) * n_blocks;
  if (p.type == GemmType::kKGroupedWgrad) return p.num_groups * ceil_div<int64_t>(p.m, block_m) * n_blocks;
  return ceil_div<int64_t>(p.m, block_m) * n_blocks;
}

// Clusters of two walk pairs of tiles (sm90_fp8_gemm_scheduler.cuh): pairs of column blocks, then the
// odd last column block in pairs of row blocks.
int64_t num_tile_pairs(const Fp8GemmProblem& p, int block_m, int block_n) {
  const int64_t m_blocks = ceil_div<int64_t>(p.m, block_m), n_blocks = ceil_div<int64_t>(p.n, block_n);
  return m_blocks * (n_blocks / 2) + (n_blocks % 2 == 1 ? ceil_div<int64_t>(m_blocks, 2) : 0);
}

// Tensor-core throughput of a full wave of BLOCK_M x BLOCK_N tiles relative to 128 x 128. BLOCK_M 64
// and 128: a sweep of every variant on the H200 over the M = 4096 bench shapes (L2 flushed;
// benchmarks/fp8_gemm_standalone.cu sweep), when tiles of widths that do not divide 128 still chose
// their B scale at run time. 128 x 192 and the 256-row tiles: the same shapes in one A/B run on an
// H100 (benchmarks/ab_fp8_gemm.py, per-wave time of each against 128 x 128), with the scale boundary
// resolved at compile time; 256 x 64 was not measured (ranked below 256 x 96). 128 x 128 and 256-row
// tiles promote while the tensor cores run (two accumulators, or the other warpgroup's passes).
// Weight-gradient tiles (one accumulator, a scale per row and per column): 128 x 160 and 128 x 192 per
// wave against 128 x 128 at many waves, one A/B run on an H100 (benchmarks/ab_wgrad.py: (7168, 16384)
// and 8 x (4096, 7168) k-grouped, c accumulated).
double mma_efficiency(GemmType type, int block_m, int block_n) {
  if (is_wgrad(type)) {
    if (block_n == 160) return 0.99;
    if (block_n == 192) return 1.05;
    if (block_n > 128) return 0.5;
  }
  struct Measured {
    int block_n;
    double block_m64, block_m128, block_m256;
  };
  constexpr Measured kTable[] = {{16, 0.15, 0.25, 0.0},   {32, 0.31, 0.47, 0.0},   {48, 0.40, 0.60, 0.0},
                                 {64, 0.53, 0.71, 0.85},  {80, 0.55, 0.70, 0.0},   {96, 0.62, 0.78, 1.01},
                                 {112, 0.63, 0.79, 1.05}, {128, 0.75, 1.00, 1.125}, {144, 0.59, 0.71, 0.0},
                                 {160, 0.62, 0.76, 0.0},  {192, 0.63, 1.12, 0.0}};
  for (const Measured& row : kTable) {
    if (row.block_n == block_n) {
      const double e = block_m == 64 ? row.block_m64 : block_m == 128 ? row.block_m128 : row.block_m256;
      if (e > 0.0) return e;
    }
  }
  return 0.5;  // a width outside the table (a -DDSO_GEMM_BLOCK_NS build): rank it low
}

// Rates of the time estimate, fitted to a sweep over M in {64, 128, 4096}. kSmFlops is not a peak
// (128 x 128 tiles run ~1.2 PFLOP/s at full clocks): it also absorbs per-tile costs.
constexpr double kSmFlops = 0.9e15 / 132;
constexpr double kSmL2BytesPerS = 80e9;
constexpr double kDramBytesPerS = 3.0e12;
// Split K's sum kernel: its launch behind the GEMM and its tail (the partials' bytes are charged at DRAM
// rate on top). torch.profiler on an H100 (benchmarks/RESULTS.md, session 30): the sum kernel ran 1.9-2.2 us
// per call behind 2- and 4-split GEMMs of 128 x 2112 x 7168 and 64 x 2112 x 7168, and the call's span was the
// GEMM's time plus the sum's (nothing overlapped).
constexpr double kSplitSumFixedSeconds = 2e-6;

// Estimated time of a configuration: waves of tiles, each costing the slower of its tensor-core time
// and its operand ingest. Ingest mixes DRAM (the problem's unique bytes, shared by all SMs) and L2
// (operands re-read by other tiles). Split K: num_splits times the tiles, each over 1 / num_splits of
// K, then the sum of the fp32 partials (written once, read once) into d.
// busy_sms_share_dram: DRAM bandwidth divided among the SMs that have a tile, not all of them (see
// heuristic_tile: how split K is weighed); the fitted rates assume all.
double estimate_seconds(const Fp8GemmProblem& p, int block_m, int block_n, int num_splits, int num_sms,
                        bool busy_sms_share_dram = false) {
  const int64_t rows = p.type == GemmType::kGroupedMasked ? (p.expected_m > 0 ? std::min(p.expected_m, p.m) : p.m)
                                                          : p.m;
  const bool k_grouped = p.type == GemmType::kKGroupedWgrad;
  const int64_t tiles = num_tiles(p, block_m, block_n, rows) * num_splits;
  const double waves = static_cast<double>(ceil_div<int64_t>(tiles, num_sms));
  // k-grouped wgrad: the groups share the K blocks, a tile contracts over its group's (on average 1 / G).
  const double tile_k = static_cast<double>(p.k) / (k_grouped ? p.num_groups : num_splits);
  const double compute = 2.0 * block_m * block_n * tile_k / (kSmFlops * mma_efficiency(p.type, block_m, block_n));
  const int64_t total_rows = p.type == GemmType::kGroupedMasked ? rows * p.num_groups : p.m;
  const int64_t out_rows = k_grouped ? p.m * p.num_groups : total_rows;
  const int64_t b_groups = p.type == GemmType::kGroupedContiguous || p.type == GemmType::kGroupedMasked ? p.num_groups
                                                                                                        : 1;
  const double unique_bytes = static_cast<double>(total_rows) * p.k + static_cast<double>(b_groups) * p.n * p.k +
                              static_cast<double>(out_rows) * p.n * (p.d_fp32 ? 4 : 2);
  const double tile_bytes = static_cast<double>(block_m + block_n) * tile_k;
  const double dram_share = std::min(1.0, unique_bytes / (static_cast<double>(tiles) * tile_bytes));
  const double dram_sms = busy_sms_share_dram ? static_cast<double>(std::min<int64_t>(tiles, num_sms)) : num_sms;
  const double ingest = tile_bytes * (dram_share / (kDramBytesPerS / dram_sms) + (1.0 - dram_share) / kSmL2BytesPerS);
  const double split_sum = num_splits == 1 ? 0.0
                                           : kSplitSumFixedSeconds +
                                                 (2.0 * num_splits * 4 + 2) * static_cast<double>(p.m) * p.n /
                                                     kDramBytesPerS;
  return waves * std::max(compute, ingest) + split_sum;
}

bool parse_config_override(Fp8GemmConfig& config) {
  const char* env = std::getenv("DSO_FP8_GEMM_CONFIG");
  if (env == nullptr || *env == '\0') return false;
  int bm = 0, bn = 0, stages = 0, cluster = 1, splits = 1;
  const int parsed = std::sscanf(env, "%dx%dx%dx%dx%d", &bm, &bn, &stages, &cluster, &splits);
  if (parsed < 2) {
    throw std::runtime_error(
        std::string("deepseek_ops: DSO_FP8_GEMM_CONFIG must be BLOCK_MxBLOCK_N[xSTAGES[xCLUSTER[xSPLITS]]], got ") +
        env);
  }
  config.block_m = bm;
  config.block_n = bn;
  config.num_stages = parsed >= 3 ? stages : 0;
  config.cluster_size = parsed >= 4 ? cluster : 1;
  config.num_splits = parsed == 5 ? splits : 1;
  return true;
}

// The heuristic's pick for a problem shape, remembered: decode steps repeat the same few shapes, and
// the search costs about a microsecond of host time per call.
struct ShapeKey {
  int device;
  GemmType type;
  bool d_fp32;
  bool has_c;  // c rules out split K
  int64_t m, n, k, num_groups, expected_m;
  bool operator==(const ShapeKey& o) const {
    return device == o.device && type == o.type && d_fp32 == o.d_fp32 && has_c == o.has_c && m == o.m && n == o.n &&
           k == o.k && num_groups == o.num_groups && expected_m == o.expected_m;
  }
};

struct ShapeKeyHash {
  size_t operator()(const ShapeKey& key) const {
    size_t h = static_cast<size_t>(key.device) * 31 + static_cast<size_t>(key.type) * 7 + key.d_fp32 * 2 + key.has_c;
    for (const int64_t v : {key.m, key.n, key.k, key.num_groups, key.expected_m}) {
      h = h * 1000003 ^ std::hash<int64_t>()(v);
    }
    return h;
  }
};

// Split counts the heuristic considers, and the estimated gain a split must bring.
constexpr int kSplitCounts[] = {2, 3, 4, 6, 8};
constexpr double kSplitMinGain = 0.9;

// The heuristic's tile: the instantiated variant of least estimated time.
Fp8GemmConfig heuristic_tile(const Fp8GemmProblem& p, const DeviceInfo& info) {
  Fp8GemmConfig config;
  double best = 0.0;
  const bool wgrad = is_wgrad(p.type);
  // Tiles wider than N only add columns to skip, but the narrowest width a layout has serves any N.
  auto min_of = [](const auto& widths) { return *std::min_element(std::begin(widths), std::end(widths)); };
  const int narrowest = wgrad ? std::min(min_of(gemm::kWgradBlockNs), min_of(gemm::kWgrad64BlockNs))
                              : min_of(gemm::kBlockNs);
  // Split K must beat the best unsplit tile's estimate by kSplitMinGain (its sum kernel's cost is a
  // guess): admit bounds the estimate a candidate may have.
  double admit = std::numeric_limits<double>::infinity();
  bool busy_sms_share_dram = false;
  auto consider = [&](int block_m, int block_n, int num_splits) {
    if (!gemm::variant_instantiated(p.type, kernel_out_fp32(p, num_splits), block_m, block_n, 1)) return;
    if (block_n > align_up<int64_t>(p.n, 16) && block_n != narrowest) return;
    if (max_stages(p, block_m, block_n, num_splits, info.max_smem) < 3) return;
    const double t = estimate_seconds(p, block_m, block_n, num_splits, info.num_sms, busy_sms_share_dram);
    // Ties: the first, i.e. the smaller BLOCK_M and BLOCK_N, unsplit, wins.
    if (t < admit && (config.block_m == 0 || t < best * 0.995)) {
      best = t;
      config.block_m = block_m;
      config.block_n = block_n;
      config.num_splits = num_splits;
    }
  };
  if (wgrad) {
    for (const int block_n : gemm::kWgrad64BlockNs) consider(64, block_n, 1);
    for (const int block_n : gemm::kWgradBlockNs) consider(128, block_n, 1);
    return config;
  }
  for (const int block_m : {64, 128}) {
    for (const int block_n : gemm::kBlockNs) consider(block_m, block_n, 1);
  }
  for (const int block_n : gemm::kWideBlockNs) consider(256, block_n, 1);
  // Split K where a tile grid under one wave leaves SMs idle; each split keeps >= 2 K blocks. Splits
  // change how many SMs stream operands, which the all-SM DRAM share cannot weigh: under it a
  // memory-bound grid of 128 tiles looks faster than one of 112, but is not (H100: 64 x 7168 x 16384
  // split 2-way over 64 x 112 tiles ran 5% slower than 64 x 64 unsplit, estimated 13% faster). So
  // splits and the unsplit pick are compared with DRAM shared by the busy SMs.
  if (splittable(p) && config.block_m != 0) {
    busy_sms_share_dram = true;
    best = estimate_seconds(p, config.block_m, config.block_n, 1, info.num_sms, busy_sms_share_dram);
    admit = best * kSplitMinGain;
    for (const int block_m : {64, 128}) {
      for (const int block_n : gemm::kBlockNs) {
        for (const int num_splits : kSplitCounts) {
          if (num_splits * 2 <= p.k / 128 && num_tiles(p, block_m, block_n, p.m) * num_splits <= info.num_sms) {
            consider(block_m, block_n, num_splits);
          }
        }
      }
    }
  }
  return config;
}

// Checks a tile (chosen or forced) and completes it: the stage count (as many as fit unless forced)
// and the grid.
Fp8GemmConfig complete(Fp8GemmConfig config, const Fp8GemmProblem& p, const DeviceInfo& info) {
  if (config.block_m == 0) {
    throw std::runtime_error("deepseek_ops: fp8 gemm: no tile configuration fits in shared memory for K = " +
                             std::to_string(p.k));
  }
  // Above one split the partials' rows (splits * M) are int-indexed in the kernel.
  if (config.num_splits < 1 ||
      (config.num_splits > 1 && (!splittable(p) || config.cluster_size != 1 || config.num_splits > p.k / 128 ||
                                 config.num_splits * p.m > INT32_MAX))) {
    throw std::runtime_error("deepseek_ops: fp8 gemm config: " + std::to_string(config.num_splits) +
                             " splits of K need 1 <= splits <= K / 128 = " + std::to_string(p.k / 128) +
                             ", and above 1 the dense layout with bf16 output, no c, no cluster and "
                             "splits * M < 2^31");
  }
  const bool out_fp32 = kernel_out_fp32(p, config.num_splits);
  if (!gemm::variant_instantiated(p.type, out_fp32, config.block_m, config.block_n, config.cluster_size)) {
    throw std::runtime_error("deepseek_ops: no fp8 gemm kernel instantiated for BLOCK_M=" +
                             std::to_string(config.block_m) + ", BLOCK_N=" + std::to_string(config.block_n) +
                             ", cluster " + std::to_string(config.cluster_size) + (out_fp32 ? ", fp32" : ", bf16") +
                             " output and this gemm type");
  }
  const int stages_fit = max_stages(p, config.block_m, config.block_n, config.num_splits, info.max_smem);
  if (config.num_stages == 0) config.num_stages = stages_fit;
  if (config.num_stages < 2 || config.num_stages > stages_fit) {
    throw std::runtime_error("deepseek_ops: fp8 gemm config " + std::to_string(config.block_m) + "x" +
                             std::to_string(config.block_n) + "x" + std::to_string(config.num_stages) +
                             " does not fit in shared memory for K = " + std::to_string(p.k) + " (at most " +
                             std::to_string(stages_fit) + " stages)");
  }
  if (config.cluster_size == 2) {
    const int64_t pairs = num_tile_pairs(p, config.block_m, config.block_n);
    config.num_ctas = static_cast<int>(2 * std::max<int64_t>(1, std::min<int64_t>(pairs, info.num_sms / 2)));
  } else {
    const int64_t tiles = num_tiles(p, config.block_m, config.block_n, p.m) * config.num_splits;
    config.num_ctas = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tiles, info.num_sms)));
  }
  return config;
}

// Tokens per group (a weight gradient's contraction, k / groups) from which an in-place accumulation
// adds its tiles into d by TMA reduce-add rather than loading c first. Both move c once through DRAM;
// reduce-add keeps it out of the SMs but serializes the read-modify-write at L2, which costs where the
// output's traffic is the whole cost. Both paths forced in one A/B run on an H100 (benchmarks/ab_wgrad.py
// --in-place-paths, N 7168, K 2048): at 2048 tokens per group reduce-add was 4% faster, at 1024 the load
// path 7% faster; at 4096 (dense and 8 experts) reduce-add led by up to 4%.
constexpr int64_t kReduceMinTokensPerGroup = 2048;

bool reduce_c_into_d(const Fp8GemmProblem& p) {
  const bool in_place = is_wgrad(p.type) && p.c != nullptr &&
                        static_cast<const void*>(p.c) == p.d && p.ldc == p.ldd;
  if (!in_place) return false;
  const char* env = std::getenv("DSO_FP8_GEMM_IN_PLACE");
  if (env != nullptr && *env != '\0') {
    const std::string path(env);
    if (path != "reduce" && path != "load") {
      throw std::runtime_error("deepseek_ops: DSO_FP8_GEMM_IN_PLACE must be reduce or load, got " + path);
    }
    return path == "reduce";
  }
  return p.k / p.num_groups >= kReduceMinTokensPerGroup;
}

}  // namespace

Fp8GemmConfig select_sm90_fp8_gemm_config(const Fp8GemmProblem& p) {
  const DeviceInfo& info = device_info();
  Fp8GemmConfig forced;
  if (parse_config_override(forced)) {
    forced = complete(forced, p, info);
    forced.reduce_c_into_d = reduce_c_into_d(p);
    return forced;
  }
  static std::mutex mutex;
  static std::unordered_map<ShapeKey, Fp8GemmConfig, ShapeKeyHash> picks;
  int device = 0;
  DSO_CUDA_CHECK(cudaGetDevice(&device));
  const ShapeKey key{device, p.type, p.d_fp32, p.c != nullptr, p.m, p.n, p.k, p.num_groups, p.expected_m};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = picks.find(key);
  if (it == picks.end()) {
    if (picks.size() >= 4096) picks.clear();  // bounded: shapes that vary every call (prefill lengths)
    it = picks.emplace(key, complete(heuristic_tile(p, info), p, info)).first;
  }
  Fp8GemmConfig config = it->second;
  config.reduce_c_into_d = reduce_c_into_d(p);  // not in the key: it depends on c's address
  return config;
}

}  // namespace dso
