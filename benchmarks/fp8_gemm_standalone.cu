// Standalone FP8 GEMM timing, no torch: the launcher of csrc/sm90_fp8_gemm.cu on raw device buffers.
//
// What the torch benchmark cannot show: the protocol's bench keeps the GPU busy for >= 200 ms per
// implementation, long enough for the H200 to reach its 700 W cap and drop the SM clock to
// ~1.4 GHz under FP8 GEMM; these short runs see full clocks, so they compare tile variants (and
// ablation builds) on the kernel's own merits.
//
//   sweep            every (BLOCK_M, BLOCK_N) on the 18 shapes of issue 3, L2 flushed before each of
//                    20 runs (median), beside the heuristic's pick; the data behind mma_efficiency().
//   time M N K [R]   median of R (default 30) back-to-back runs of one shape, heuristic tile or
//                    DSO_FP8_GEMM_CONFIG: R = 30 is a burst at full clocks, R = 3000 runs into the cap.
//
// Build (from the repository root, any machine with nvcc; run on the H200):
//   nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Iptx -Icsrc \
//        benchmarks/fp8_gemm_standalone.cu csrc/sm90_fp8_gemm.cu csrc/sm90_fp8_gemm_config.cpp \
//        -o fp8_gemm_standalone
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "sm90_fp8_gemm.h"
#include "sm90_fp8_gemm_variants.h"

namespace {

constexpr size_t kFlushBytes = 256u << 20;  // several times the 50 MB L2

// e4m3 values shaped like per-128-group quantized normals: a 2.8-sigma value maps to 448.
__global__ void fill_quantized_normal(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 13, x *= 0x5bd1e995u, x ^= x >> 15;
    uint32_t y = x * 747796405u + 2891336453u;
    y ^= y >> 16;
    const float u1 = ((x >> 8) + 1) * (1.0f / 16777217.0f), u2 = (y >> 8) * (1.0f / 16777216.0f);
    const float g = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2) * (448.0f / 2.8f);
    p[i] = __nv_fp8_e4m3(fminf(fmaxf(g, -448.0f), 448.0f)).__x;
  }
}

__global__ void fill_ones(float* p, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    p[i] = 1.0f;
  }
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// Device buffers large enough for every shape of the sweep (and any `time` shape up to them).
// Split K's partials: the heuristic splits only grids under one wave, so at most one partial tile per
// SM (132 tiles of <= 128 x 192) at a time; problem() refuses a forced split beyond that.
constexpr size_t kPartialsFloats = 132 * 128 * 192;

struct Buffers {
  uint8_t *a = nullptr, *b = nullptr;
  float *a_scales = nullptr, *b_scales = nullptr, *partials = nullptr;
  void *d = nullptr, *flush = nullptr;
  Buffers(size_t a_bytes, size_t b_bytes, size_t sa_floats, size_t sb_floats, size_t d_bytes) {
    check(cudaMalloc(&partials, kPartialsFloats * 4), "cudaMalloc partials");
    check(cudaMalloc(&a, a_bytes), "cudaMalloc a");
    check(cudaMalloc(&b, b_bytes), "cudaMalloc b");
    check(cudaMalloc(&a_scales, sa_floats * 4), "cudaMalloc a_scales");
    check(cudaMalloc(&b_scales, sb_floats * 4), "cudaMalloc b_scales");
    check(cudaMalloc(&d, d_bytes), "cudaMalloc d");
    check(cudaMalloc(&flush, kFlushBytes), "cudaMalloc flush");
    fill_quantized_normal<<<1024, 256>>>(a, a_bytes, 1);
    fill_quantized_normal<<<1024, 256>>>(b, b_bytes, 2);
    fill_ones<<<256, 256>>>(a_scales, sa_floats);
    fill_ones<<<256, 256>>>(b_scales, sb_floats);
    check(cudaDeviceSynchronize(), "fill");
  }
  dso::Fp8GemmProblem problem(int64_t m, int64_t n, int64_t k) const {
    dso::Fp8GemmProblem p;
    p.a = a, p.lda = k, p.a_scales = a_scales, p.a_scales_ld = (m + 3) / 4 * 4;
    p.b = b, p.ldb = k, p.b_scales = b_scales, p.d = d, p.ldd = n, p.split_partials = partials;
    p.m = m, p.n = n, p.k = k;
    const int splits = dso::select_sm90_fp8_gemm_config(p).num_splits;
    if (splits > 1 && static_cast<size_t>(splits) * m * n > kPartialsFloats) {
      throw std::runtime_error("split K: " + std::to_string(splits) + " x " + std::to_string(m) + " x " +
                               std::to_string(n) + " partials exceed this harness's buffer");
    }
    return p;
  }
};

// Median us of `runs` launches, each between CUDA events; with flush, the L2 is overwritten first.
double median_us(const dso::Fp8GemmProblem& p, const Buffers& buf, int runs, bool flush) {
  cudaEvent_t start, end;
  check(cudaEventCreate(&start), "event");
  check(cudaEventCreate(&end), "event");
  for (int i = 0; i < 3; ++i) dso::launch_sm90_fp8_gemm(p, nullptr);
  std::vector<float> times;
  for (int i = 0; i < runs; ++i) {
    if (flush) check(cudaMemsetAsync(buf.flush, i & 0xff, kFlushBytes), "flush");
    check(cudaEventRecord(start), "record");
    dso::launch_sm90_fp8_gemm(p, nullptr);
    check(cudaEventRecord(end), "record");
    check(cudaEventSynchronize(end), "sync");
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, start, end), "elapsed");
    times.push_back(ms);
  }
  check(cudaEventDestroy(start), "event");
  check(cudaEventDestroy(end), "event");
  std::sort(times.begin(), times.end());
  return times[times.size() / 2] * 1e3;
}

void warm_up(const Buffers& buf) {
  const dso::Fp8GemmProblem p = buf.problem(4096, 7168, 7168);
  for (int i = 0; i < 3000; ++i) dso::launch_sm90_fp8_gemm(p, nullptr);  // ~1 s: clocks up from idle
  check(cudaDeviceSynchronize(), "warm-up");
}

int sweep() {
  const int64_t ms[] = {64, 128, 4096};
  const int64_t nks[][2] = {{2112, 7168}, {24576, 1536}, {32768, 512}, {7168, 16384}, {4096, 7168}, {7168, 2048}};
  const Buffers buf(4096 * 16384, 32768 * 7168, 4096 * 128, 256 * 128, 4096 * 32768 * 2);
  warm_up(buf);
  std::printf("M N K | pick (us) | best (us) | every BLOCK_MxBLOCK_N: us\n");
  for (const int64_t m : ms) {
    for (const auto& nk : nks) {
      const dso::Fp8GemmProblem p = buf.problem(m, nk[0], nk[1]);
      unsetenv("DSO_FP8_GEMM_CONFIG");
      const dso::Fp8GemmConfig pick = dso::select_sm90_fp8_gemm_config(p);
      const double pick_us = median_us(p, buf, 20, true);
      double best_us = 1e30;
      char best[16] = "", line[2048] = "";
      for (const int block_m : {64, 128, 256}) {
        for (const int block_n : {DSO_GEMM_BLOCK_NS}) {
          if (block_n > nk[0] || !dso::gemm::variant_instantiated(p.type, false, block_m, block_n, 1)) continue;
          char config[16];
          std::snprintf(config, sizeof config, "%dx%d", block_m, block_n);
          setenv("DSO_FP8_GEMM_CONFIG", config, 1);
          double us = 0.0;
          try {
            us = median_us(p, buf, 20, true);
          } catch (const std::runtime_error&) {  // no stage count fits shared memory
            continue;
          }
          if (us < best_us) best_us = us, std::strcpy(best, config);
          std::snprintf(line + std::strlen(line), sizeof line - std::strlen(line), " %s:%.1f", config, us);
        }
      }
      std::printf("%lld %lld %lld | %dx%d %.1f | %s %.1f (pick %+.1f%%) |%s\n", static_cast<long long>(m),
                  static_cast<long long>(nk[0]), static_cast<long long>(nk[1]), pick.block_m, pick.block_n, pick_us,
                  best, best_us, (pick_us / best_us - 1.0) * 100.0, line);
      std::fflush(stdout);
    }
  }
  return 0;
}

int time_one(int64_t m, int64_t n, int64_t k, int runs) {
  const Buffers buf(m * k, n * k, (m + 3) / 4 * 4 * (k / 128), (n + 127) / 128 * (k / 128), m * n * 2);
  const dso::Fp8GemmProblem p = buf.problem(m, n, k);
  const dso::Fp8GemmConfig config = dso::select_sm90_fp8_gemm_config(p);
  // Clocks up from idle (they ramp within ~0.1 s), well before the power cap bites (~0.3 s).
  for (int i = 0; i < 20; ++i) dso::launch_sm90_fp8_gemm(p, nullptr);
  const double us = median_us(p, buf, runs, false);
  std::printf("%lld %lld %lld tile %dx%d, %d stages: median of %d back-to-back runs %.1f us, %.0f TFLOP/s\n",
              static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k), config.block_m,
              config.block_n, config.num_stages, runs, us, 2.0 * m * n * k / us * 1e-6);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 2 && std::strcmp(argv[1], "sweep") == 0) return sweep();
    if ((argc == 5 || argc == 6) && std::strcmp(argv[1], "time") == 0) {
      const int runs = argc == 6 ? std::atoi(argv[5]) : 30;
      return time_one(std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]), runs);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "usage: %s sweep | time M N K [runs]\n", argv[0]);
  return 2;
}
