// Torch-side helpers shared by the CUDA adapters (csrc/torch_<family>.cpp), which turn tensors into
// the pointers, sizes and stream of the torch-free launchers, and check what memory safety needs
// (the policy at the top of registration.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

namespace dso {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// `t` lives on `device`, holds `dtype` and has the given sizes (-1: any size in that dim).
inline void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Device& device,
                          at::ScalarType dtype, std::initializer_list<int64_t> sizes) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " is ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.dim() == static_cast<int64_t>(sizes.size()), op, ": ", name, " has shape ", t.sizes(), ", expected ",
              sizes.size(), " dims");
  int64_t d = 0;
  for (const int64_t size : sizes) {
    TORCH_CHECK(size < 0 || t.size(d) == size, op, ": ", name, " has shape ", t.sizes(), ", expected size ", size,
                " in dim ", d);
    ++d;
  }
}

// Row-major and starting at a 16-byte aligned address: the kernels index it densely with 16-byte vectors.
inline void check_dense16(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
              " must start at a 16-byte aligned address");
}

// t itself when row-major with a 16-byte aligned start (what the kernels' 16-byte vectors need), else a
// copy that is: the public functions pass such tensors; this keeps direct torch.ops callers memory-safe.
inline at::Tensor dense_aligned16(const at::Tensor& t) {
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (t.is_contiguous() && aligned) return t;
  return t.is_contiguous() ? t.clone() : t.contiguous();
}

}  // namespace dso
