// Repro for compute-sanitizer racecheck of the FP8 GEMM's tile slots (issue 18), no torch. racecheck
// reports hazards between the scheduler warp's stores into a tile slot (header, B scales) and the
// consumers' loads of them, in both directions, although an mbarrier orders each pair: the 32 scheduler
// lanes store, then each arrives on full[slot] (count 32); every consumer thread waits on it, loads,
// then __syncwarp and lane 0 of each consumer warp arrives on empty[slot] (count 4), which the scheduler
// lanes wait on before they store into the slot again. Variants:
//   0  that protocol (csrc/sm90_fp8_gemm.cu's schedule / consume, without the GEMM).
//   1  every consumer lane arrives on empty[slot] (count 128): no __syncwarp between a lane's loads and
//      its warp's release.
// Each variant checks what its consumers load (exit status 1 on a mismatch); racecheck's report says
// which variant, if any, it flags. It flags variant 0 and not variant 1, with no mismatched load in either
// (benchmarks/RESULTS.md, session 30): racecheck does not take __syncwarp + one lane's arrival as ordering
// the other lanes' loads.
//
// Build and run (from the repository root; any sm_90 GPU):
//   nvcc -std=c++20 -O3 -gencode arch=compute_90a,code=sm_90a -Iptx -Icsrc benchmarks/gemm_slot_racecheck.cu \
//        -o gemm_slot_racecheck
//   for v in 0 1; do compute-sanitizer --tool racecheck --racecheck-report all ./gemm_slot_racecheck $v; done
#include <cuda_runtime.h>

#include <cstdint>

#include "mbarrier.cuh"
#include "racecheck_repro.cuh"

namespace {

constexpr int kSlots = 2, kTiles = 64, kScales = 112, kConsumers = 128, kThreads = 32 + kConsumers;

template <int kVariant>
__global__ void __launch_bounds__(kThreads, 1) slot_kernel(int* mismatches) {
  __shared__ int headers[kSlots];
  __shared__ float scales[kSlots][kScales];
  __shared__ uint64_t full[kSlots], empty[kSlots];
  constexpr int kEmptyArrivals = kVariant == 1 ? kConsumers : kConsumers / 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kSlots; ++s) {
      dso::ptx::mbarrier_init(&full[s], 32);
      dso::ptx::mbarrier_init(&empty[s], kEmptyArrivals);
    }
    dso::ptx::fence_mbarrier_init();
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  if (threadIdx.x >= kConsumers) {  // the scheduler warp
    for (int t = 0; t < kTiles; ++t) {
      const int slot = t % kSlots;
      dso::ptx::mbarrier_wait(&empty[slot], ((t / kSlots) & 1) ^ 1);
      if (lane == 0) headers[slot] = t;
      for (int i = lane; i < kScales; i += 32) scales[slot][i] = static_cast<float>(t * kScales + i);
      dso::ptx::mbarrier_arrive(&full[slot]);
    }
    return;
  }
  for (int t = 0; t < kTiles; ++t) {
    const int slot = t % kSlots;
    dso::ptx::mbarrier_wait(&full[slot], (t / kSlots) & 1);
    int bad = headers[slot] != t;
    for (int i = threadIdx.x % 8; i < kScales; i += 8) bad += scales[slot][i] != static_cast<float>(t * kScales + i);
    if (bad) atomicAdd(mismatches, bad);
    if constexpr (kVariant == 1) {
      dso::ptx::mbarrier_arrive(&empty[slot]);
    } else {
      __syncwarp();
      if (lane == 0) dso::ptx::mbarrier_arrive(&empty[slot]);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  void (*const kernels[])(int*) = {slot_kernel<0>, slot_kernel<1>};
  return dso::repro::run_selected(argc, argv, kernels, kThreads);
}
