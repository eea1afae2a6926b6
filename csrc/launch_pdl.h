// Kernel launches with programmatic dependent launch (PDL). No torch headers: .cu files include this.
#pragma once
#include <cstdlib>
#include <cstring>
#include <utility>

#include <cuda_runtime.h>

#include "common.h"

namespace dso {

// DSO_PDL=0 launches plainly (stream order only): the A/B switch for PDL.
inline bool pdl_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("DSO_PDL");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

// Launches with programmatic stream serialization: the kernel may start before the previous kernel
// of the stream has finished, and must griddep_wait before it touches what that kernel writes.
template <typename... Params, typename... Args>
void launch_with_pdl(void (*kernel)(Params...), dim3 grid, int num_threads, size_t smem, cudaStream_t stream,
                     Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = pdl_enabled() ? 1 : 0;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(num_threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  DSO_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace dso
