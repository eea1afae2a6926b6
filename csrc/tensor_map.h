// Host side of TMA: the tensor-map builder every launcher uses (the driver's cuTensorMapEncodeTiled).
#pragma once
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <unordered_map>

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

// A 2-D [outer, inner] row-major tensor with rows `row_stride` elements apart, read in boxes of
// [box_outer, box_inner]; out-of-bounds elements of a box read as zero. `what` names the tensor in
// the error.
inline CUtensorMap encode_tensor_map_2d(const void* base, CUtensorMapDataType dtype, int elem_bytes, uint64_t inner,
                                        uint64_t outer, uint64_t row_stride, uint32_t box_inner, uint32_t box_outer,
                                        CUtensorMapSwizzle swizzle, const char* what) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {row_stride * elem_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult status = encode_tiled()(&map, dtype, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                                         CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS) {
    throw std::runtime_error(std::string("deepseek_ops: cuTensorMapEncodeTiled failed for ") + what + " (CUresult " +
                             std::to_string(static_cast<int>(status)) + ", dims " + std::to_string(inner) + " x " +
                             std::to_string(outer) + ", row stride " + std::to_string(row_stride) + ")");
  }
  return map;
}

// Every argument of encode_tensor_map_2d but the name.
struct TensorMap2dKey {
  const void* base;
  uint64_t inner, outer, row_stride;
  uint32_t box_inner, box_outer;
  int dtype, elem_bytes, swizzle;
  bool operator==(const TensorMap2dKey& o) const {
    return base == o.base && inner == o.inner && outer == o.outer && row_stride == o.row_stride &&
           box_inner == o.box_inner && box_outer == o.box_outer && dtype == o.dtype && elem_bytes == o.elem_bytes &&
           swizzle == o.swizzle;
  }
};

struct TensorMap2dKeyHash {
  size_t operator()(const TensorMap2dKey& key) const {
    size_t h = std::hash<const void*>()(key.base);
    for (const uint64_t v : {key.inner, key.outer, key.row_stride, uint64_t{key.box_inner} << 32 | key.box_outer,
                             static_cast<uint64_t>(key.dtype) << 32 | static_cast<uint64_t>(key.swizzle) << 8 |
                                 static_cast<uint64_t>(key.elem_bytes)}) {
      h = h * 1000003 ^ std::hash<uint64_t>()(v);
    }
    return h;
  }
};

// encode_tensor_map_2d, remembered per thread: a map is a pure function of these arguments, and a
// decode step's launches describe the same weights (and, through the caching allocator, mostly the
// same activation buffers) call after call, so the driver's encode runs once per distinct map.
inline CUtensorMap cached_tensor_map_2d(const void* base, CUtensorMapDataType dtype, int elem_bytes, uint64_t inner,
                                        uint64_t outer, uint64_t row_stride, uint32_t box_inner, uint32_t box_outer,
                                        CUtensorMapSwizzle swizzle, const char* what) {
  constexpr size_t kMaxEntries = 1024;  // bounded: prefill shapes and fresh buffers keep adding keys
  thread_local std::unordered_map<TensorMap2dKey, CUtensorMap, TensorMap2dKeyHash> cache;
  const TensorMap2dKey key{base,      inner,     outer, row_stride, box_inner, box_outer, static_cast<int>(dtype),
                           elem_bytes, static_cast<int>(swizzle)};
  if (const auto it = cache.find(key); it != cache.end()) return it->second;
  const CUtensorMap map =
      encode_tensor_map_2d(base, dtype, elem_bytes, inner, outer, row_stride, box_inner, box_outer, swizzle, what);
  if (cache.size() >= kMaxEntries) cache.clear();
  cache.emplace(key, map);
  return map;
}

}  // namespace dso
