// Host side of TMA: the driver's cuTensorMapEncodeTiled, shared by the launchers that build tensor maps.
#pragma once
#include <cuda.h>

#include "common.h"

namespace dso {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// NOTE: the driver API is fetched at run time: the extension does not link libcuda.
inline EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult query;
#if CUDART_VERSION >= 12050
    DSO_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &query));
#else
    DSO_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &query));
#endif
    if (query != cudaDriverEntryPointSuccess || ptr == nullptr) {
      throw std::runtime_error("deepseek_ops: the CUDA driver has no cuTensorMapEncodeTiled (needs CUDA 12+)");
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

}  // namespace dso
