// Host-side helpers shared by every launcher. No torch headers: .cu files include this.
#pragma once
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

namespace dso {

// Launch errors become C++ exceptions; registration.cpp turns them into Python errors.
inline void check_cuda(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("deepseek_ops: ") + what + " failed at " + file + ":" +
                             std::to_string(line) + ": " + cudaGetErrorString(status));
  }
}

template <typename T>
constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

template <typename T>
constexpr T align_up(T a, T b) { return ceil_div(a, b) * b; }

}  // namespace dso

#define DSO_CUDA_CHECK(expr) ::dso::check_cuda((expr), #expr, __FILE__, __LINE__)
#define DSO_LAUNCH_CHECK() ::dso::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
