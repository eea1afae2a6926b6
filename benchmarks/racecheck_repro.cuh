// The host side of the racecheck repro kernels (benchmarks/*_racecheck.cu): each variant is a one-CTA
// kernel that counts the loads that did not see the value its protocol promises.
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "common.h"

namespace dso::repro {

// Runs `kernel` (one CTA of `threads`), prints its mismatch count; 0 when there was none, else 1.
inline int run_variant(int variant, void (*kernel)(int*), int threads) {
  int* mismatches;
  DSO_CUDA_CHECK(cudaMalloc(&mismatches, sizeof(int)));
  DSO_CUDA_CHECK(cudaMemset(mismatches, 0, sizeof(int)));
  kernel<<<1, threads>>>(mismatches);
  DSO_CUDA_CHECK(cudaGetLastError());
  int host = 0;
  DSO_CUDA_CHECK(cudaMemcpy(&host, mismatches, sizeof(int), cudaMemcpyDeviceToHost));
  DSO_CUDA_CHECK(cudaFree(mismatches));
  std::printf("variant %d: %d mismatched loads\n", variant, host);
  return host == 0 ? 0 : 1;
}

// main() of a repro: runs the variant named by argv[1] (its index in `kernels`), or all of them; exit
// status 1 when any reader loaded a stale value.
template <int kNumVariants>
int run_selected(int argc, char** argv, void (*const (&kernels)[kNumVariants])(int*), int threads) {
  const int variant = argc > 1 ? std::atoi(argv[1]) : -1;
  int status = 0;
  for (int v = 0; v < kNumVariants; ++v) {
    if (variant < 0 || variant == v) status |= run_variant(v, kernels[v], threads);
  }
  return status;
}

}  // namespace dso::repro
