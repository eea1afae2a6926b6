// Host-side helpers shared by every launcher. No torch headers: .cu files include this.
#pragma once
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <mutex>
#include <string>
#include <utility>

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

namespace dso {

constexpr int kMaxDevices = 64;

// Calls fn() once per CUDA device (the current one) for each flags array: kernel attributes such
// as the shared-memory opt-in are per device, and setting them on every launch costs host time on
// the decode path. Give each kernel its own flags (a static in its launcher).
template <typename Fn>
void once_per_device(std::once_flag (&flags)[kMaxDevices], Fn&& fn) {
  int device = 0;
  DSO_CUDA_CHECK(cudaGetDevice(&device));
  std::call_once(flags[device % kMaxDevices], std::forward<Fn>(fn));
}

}  // namespace dso
