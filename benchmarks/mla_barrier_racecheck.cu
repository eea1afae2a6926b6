// Repro for compute-sanitizer racecheck of the MLA decode's shared row bases and row sums (issue 19), no
// torch. racecheck reports RAW hazards between score_tile's row-base stores and rebase's loads (and the
// row sums of write_results), which named barrier 1 (the 256 consumer threads) orders in program order.
// racecheck passes a bare one-writer, two-reader bar.sync pattern (benchmarks/RESULTS.md), so this
// rebuilds the kernel's pattern and adds its other ingredients one variant at a time:
//   0  the pattern: per tile, warpgroup t % 2 writes slot t % 2 of the row bases (its lane_col 0
//      threads, rows 16 w + lane / 4 and + 8), bar.sync 1, 256, both warpgroups read the slot; at the
//      end each writes its row sums, bar.sync 1, 256, both read both. Warpgroup 2 exits at once.
//   1  + warp 8 stays: a full/empty mbarrier ring with the consumers, as the producer (warps 9-11 exit).
//   2  + setmaxnreg as the kernel (warpgroup 2 to 40, the consumers to 232).
//   3  + the scorer's warpgroup barrier (2 + warpgroup, 128 threads) before its stores, as score_tile.
// Each variant checks what its readers load (exit status 1 on a mismatch); racecheck's report says
// which variant, if any, it flags.
//
// Build and run (from the repository root; any sm_90 GPU):
//   nvcc -std=c++20 -O3 -gencode arch=compute_90a,code=sm_90a -Iptx -Icsrc benchmarks/mla_barrier_racecheck.cu \
//        -o mla_barrier_racecheck
//   for v in 0 1 2 3; do compute-sanitizer --tool racecheck --racecheck-report all ./mla_barrier_racecheck $v; done
#include <cuda_runtime.h>

#include <cstdint>

#include "barrier.cuh"
#include "mbarrier.cuh"
#include "racecheck_repro.cuh"
#include "warpgroup.cuh"

namespace {

constexpr int kConsumers = 256, kThreads = 384, kRows = 64, kTiles = 64;

template <int kVariant>
__global__ void __launch_bounds__(kThreads, 1) pattern_kernel(int* mismatches) {
  __shared__ float bases[2 * kRows];
  __shared__ float sums[2 * kRows];
  __shared__ uint64_t full[2], empty[2];
  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      dso::ptx::mbarrier_init(&full[s], 1);
      dso::ptx::mbarrier_init(&empty[s], kConsumers / 32);
    }
    dso::ptx::fence_mbarrier_init();
  }
  __syncthreads();

  if (threadIdx.x >= kConsumers) {
    if constexpr (kVariant >= 2) dso::ptx::warpgroup::setmaxnreg_dec<40>();
    if constexpr (kVariant < 1) return;
    if (threadIdx.x / 32 != kConsumers / 32) return;
    for (int t = 0; t < kTiles; ++t) {  // warp 8: the producer's handshake, no data
      dso::ptx::mbarrier_wait(&empty[t % 2], ((t / 2) & 1) ^ 1);
      if (threadIdx.x % 32 == 0) dso::ptx::mbarrier_arrive(&full[t % 2]);
    }
    return;
  }
  if constexpr (kVariant >= 2) dso::ptx::warpgroup::setmaxnreg_inc<232>();
  const int half = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  float sum = 0.0f;
  for (int t = 0; t < kTiles; ++t) {
    if constexpr (kVariant >= 1) dso::ptx::mbarrier_wait(&full[t % 2], (t / 2) & 1);
    float* slot = bases + (t % 2) * kRows;
    if (t % 2 == half) {
      if constexpr (kVariant >= 3) dso::ptx::named_barrier_sync(2 + half, 128);
      if (lane % 4 == 0) {
        for (int h = 0; h < 2; ++h) {
          const int row = 16 * warp + lane / 4 + 8 * h;
          slot[row] = static_cast<float>(t * kRows + row);
        }
      }
    }
    dso::ptx::named_barrier_sync(1, kConsumers);
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * warp + lane / 4 + 8 * h;
      const float base = slot[row];
      if (base != static_cast<float>(t * kRows + row)) atomicAdd(mismatches, 1);
      sum += base;
    }
    if constexpr (kVariant >= 1) {
      __syncwarp();
      if (lane == 0) dso::ptx::mbarrier_arrive(&empty[t % 2]);
    }
  }
  if (lane % 4 == 0) sums[half * kRows + 16 * warp + lane / 4] = sum;
  dso::ptx::named_barrier_sync(1, kConsumers);
  const int row = 16 * warp + lane / 4;
  if (sums[row] != sums[kRows + row]) atomicAdd(mismatches, 1);  // both warpgroups summed the same bases
}

}  // namespace

int main(int argc, char** argv) {
  void (*const kernels[])(int*) = {pattern_kernel<0>, pattern_kernel<1>, pattern_kernel<2>, pattern_kernel<3>};
  return dso::repro::run_selected(argc, argv, kernels, kThreads);
}
