// Every deepseek_ops schema, and the CUDA kernels behind them.
//
// The CPU kernels are the reference implementations (deepseek_ops/reference.py) and the
// fake kernels are shape functions; both are registered from Python. Argument checks live
// in Python (deepseek_ops/_checks.py) in front of every public op; the functions here only
// translate tensors into pointers, sizes and the current stream.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#ifdef DSO_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "sm90_fp8_quant.h"
// [registration: kernel headers]
#endif

namespace {

bool built_with_cuda() {
#ifdef DSO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(deepseek_ops, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);

  // FP8 quantization (DeepSeek-V3 recipe: 1x128 activation groups, 128x128 weight blocks).
  m.def("per_token_group_quant_fp8(Tensor x, int group_size, bool ue8m0, bool column_major_scales)"
        " -> (Tensor, Tensor)");
  m.def("per_block_quant_fp8(Tensor w, int block_size, bool ue8m0) -> (Tensor, Tensor)");
  m.def("dequant_fp8_block(Tensor w, Tensor scales, int block_size, ScalarType out_dtype) -> Tensor");
  // [registration: schemas]
}

#ifdef DSO_WITH_CUDA
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

dso::FloatKind float_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return dso::FloatKind::kBF16;
    case at::kHalf: return dso::FloatKind::kFP16;
    case at::kFloat: return dso::FloatKind::kFP32;
    default: TORCH_CHECK(false, "deepseek_ops: unsupported dtype ", t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> per_token_group_quant_fp8_cuda(const at::Tensor& x, int64_t group_size,
                                                                  bool ue8m0, bool column_major_scales) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1), num_groups = k / group_size;
  auto x_fp8 = at::empty({m, k}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scales;
  if (column_major_scales) {
    // Stored [num_groups, align(m, 4)] so that the GEMM's TMA reads M-contiguous rows of scales.
    const int64_t m_pad = dso::align_up<int64_t>(m, 4);
    scales = at::empty({num_groups, m_pad}, x.options().dtype(at::kFloat)).narrow(1, 0, m).t();
  } else {
    scales = at::empty({m, num_groups}, x.options().dtype(at::kFloat));
  }
  if (m > 0) {
    dso::launch_per_token_group_quant_fp8(x.data_ptr(), float_kind(x), x_fp8.data_ptr(), scales.data_ptr<float>(),
                                          m, k, group_size, ue8m0, scales.stride(0), scales.stride(1),
                                          current_stream());
  }
  return {x_fp8, scales};
}

std::tuple<at::Tensor, at::Tensor> per_block_quant_fp8_cuda(const at::Tensor& w, int64_t block_size, bool ue8m0) {
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.size(0), k = w.size(1);
  auto w_fp8 = at::empty({n, k}, w.options().dtype(at::kFloat8_e4m3fn));
  auto scales = at::empty({dso::ceil_div<int64_t>(n, block_size), dso::ceil_div<int64_t>(k, block_size)},
                          w.options().dtype(at::kFloat));
  if (n > 0 && k > 0) {
    dso::launch_per_block_quant_fp8(w.data_ptr(), float_kind(w), w_fp8.data_ptr(), scales.data_ptr<float>(), n, k,
                                    block_size, ue8m0, current_stream());
  }
  return {w_fp8, scales};
}

at::Tensor dequant_fp8_block_cuda(const at::Tensor& w, const at::Tensor& scales, int64_t block_size,
                                  at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.size(0), k = w.size(1);
  auto out = at::empty({n, k}, w.options().dtype(out_dtype));
  if (n > 0 && k > 0) {
    dso::launch_dequant_fp8_block(w.data_ptr(), scales.data_ptr<float>(), out.data_ptr(), float_kind(out), n, k,
                                  block_size, scales.size(1), current_stream());
  }
  return out;
}

// [registration: cuda wrappers]

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_ops, CUDA, m) {
  m.impl("per_token_group_quant_fp8", &per_token_group_quant_fp8_cuda);
  m.impl("per_block_quant_fp8", &per_block_quant_fp8_cuda);
  m.impl("dequant_fp8_block", &dequant_fp8_block_cuda);
  // [registration: cuda impls]
}
#endif  // DSO_WITH_CUDA

// Importing deepseek_ops._C runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
