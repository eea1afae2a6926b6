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

// A 2-D [outer, inner] row-major tensor with rows `row_stride` elements apart, or (rank 3) `depth` such
// tensors `depth_stride` elements apart, read in boxes of [box_depth,] box_outer, box_inner;
// out-of-bounds elements of a box read as zero (and are not written by stores). `what` names the tensor
// in the error.
struct TensorMapShape {
  int rank;  // 2 or 3
  uint64_t inner, outer, row_stride;
  uint32_t box_inner, box_outer;
  uint64_t depth = 1, depth_stride = 0;  // rank 3
  uint32_t box_depth = 1;
  bool operator==(const TensorMapShape& o) const {
    return rank == o.rank && inner == o.inner && outer == o.outer && row_stride == o.row_stride &&
           box_inner == o.box_inner && box_outer == o.box_outer && depth == o.depth &&
           depth_stride == o.depth_stride && box_depth == o.box_depth;
  }
};

inline CUtensorMap encode_tensor_map(const void* base, CUtensorMapDataType dtype, int elem_bytes,
                                     const TensorMapShape& s, CUtensorMapSwizzle swizzle, const char* what) {
  CUtensorMap map{};
  const cuuint64_t dims[3] = {s.inner, s.outer, s.depth};
  const cuuint64_t strides[2] = {s.row_stride * elem_bytes, s.depth_stride * elem_bytes};
  const cuuint32_t box[3] = {s.box_inner, s.box_outer, s.box_depth};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult status = encode_tiled()(&map, dtype, s.rank, const_cast<void*>(base), dims, strides, box,
                                         elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                                         CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS) {
    throw std::runtime_error(std::string("deepseek_ops: cuTensorMapEncodeTiled failed for ") + what + " (CUresult " +
                             std::to_string(static_cast<int>(status)) + ", dims " +
                             (s.rank == 3 ? std::to_string(s.depth) + " x " : std::string()) +
                             std::to_string(s.outer) + " x " + std::to_string(s.inner) + ", row stride " +
                             std::to_string(s.row_stride) + ")");
  }
  return map;
}

inline CUtensorMap encode_tensor_map_2d(const void* base, CUtensorMapDataType dtype, int elem_bytes, uint64_t inner,
                                        uint64_t outer, uint64_t row_stride, uint32_t box_inner, uint32_t box_outer,
                                        CUtensorMapSwizzle swizzle, const char* what) {
  return encode_tensor_map(base, dtype, elem_bytes, TensorMapShape{2, inner, outer, row_stride, box_inner, box_outer},
                           swizzle, what);
}

// Every argument of encode_tensor_map but the name.
struct TensorMapKey {
  const void* base;
  TensorMapShape shape;
  int dtype, elem_bytes, swizzle;
  bool operator==(const TensorMapKey& o) const {
    return base == o.base && shape == o.shape && dtype == o.dtype && elem_bytes == o.elem_bytes &&
           swizzle == o.swizzle;
  }
};

struct TensorMapKeyHash {
  size_t operator()(const TensorMapKey& key) const {
    const TensorMapShape& s = key.shape;
    size_t h = std::hash<const void*>()(key.base);
    for (const uint64_t v : {s.inner, s.outer, s.row_stride, uint64_t{s.box_inner} << 32 | s.box_outer, s.depth,
                             s.depth_stride, uint64_t{s.box_depth} << 8 | static_cast<uint64_t>(s.rank),
                             static_cast<uint64_t>(key.dtype) << 32 | static_cast<uint64_t>(key.swizzle) << 8 |
                                 static_cast<uint64_t>(key.elem_bytes)}) {
      h = h * 1000003 ^ std::hash<uint64_t>()(v);
    }
    return h;
  }
};

// encode_tensor_map, remembered per thread: a map is a pure function of these arguments, and a
// decode step's launches describe the same weights (and, through the caching allocator, mostly the
// same activation buffers) call after call, so the driver's encode runs once per distinct map.
inline CUtensorMap cached_tensor_map(const void* base, CUtensorMapDataType dtype, int elem_bytes,
                                     const TensorMapShape& shape, CUtensorMapSwizzle swizzle, const char* what) {
  constexpr size_t kMaxEntries = 1024;  // bounded: prefill shapes and fresh buffers keep adding keys
  thread_local std::unordered_map<TensorMapKey, CUtensorMap, TensorMapKeyHash> cache;
  const TensorMapKey key{base, shape, static_cast<int>(dtype), elem_bytes, static_cast<int>(swizzle)};
  if (const auto it = cache.find(key); it != cache.end()) return it->second;
  const CUtensorMap map = encode_tensor_map(base, dtype, elem_bytes, shape, swizzle, what);
  if (cache.size() >= kMaxEntries) cache.clear();
  cache.emplace(key, map);
  return map;
}

inline CUtensorMap cached_tensor_map_2d(const void* base, CUtensorMapDataType dtype, int elem_bytes, uint64_t inner,
                                        uint64_t outer, uint64_t row_stride, uint32_t box_inner, uint32_t box_outer,
                                        CUtensorMapSwizzle swizzle, const char* what) {
  return cached_tensor_map(base, dtype, elem_bytes, TensorMapShape{2, inner, outer, row_stride, box_inner, box_outer},
                           swizzle, what);
}

}  // namespace dso
