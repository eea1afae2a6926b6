// CUDA adapters of the FP8 quantization ops (schemas in registration.cpp; kernels in sm90_fp8_quant.cu and,
// for transpose_quant_fp8 and swiglu_backward_quant_fp8, sm90_fp8_transpose_quant.cu and
// sm90_fp8_swiglu_backward_quant.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "sm90_fp8_quant.h"
#include "sm90_fp8_swiglu_backward_quant.h"
#include "sm90_fp8_transpose_quant.h"
#include "torch_utils.h"

namespace {

dso::FloatKind float_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return dso::FloatKind::kBF16;
    case at::kHalf: return dso::FloatKind::kFP16;
    case at::kFloat: return dso::FloatKind::kFP32;
    default: TORCH_CHECK(false, "deepseek_ops: unsupported dtype ", t.scalar_type());
  }
}

// fp32 [m, num_groups] scales, row-major or in the GEMMs' M-major layout (deepseek_ops/gemm.py).
at::Tensor empty_group_scales(const at::Tensor& like, int64_t m, int64_t num_groups, bool column_major) {
  if (!column_major) return at::empty({m, num_groups}, like.options().dtype(at::kFloat));
  const int64_t m_pad = dso::align_up<int64_t>(m, 4);
  return at::empty({num_groups, m_pad}, like.options().dtype(at::kFloat)).narrow(1, 0, m).t();
}

// A 2-D float input (its layout is established by dense_aligned16) whose columns split into whole groups.
void check_quant_input(const char* op, const char* name, const at::Tensor& t, int64_t group) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  float_kind(t);
  TORCH_CHECK(t.size(1) % group == 0, op, ": ", name, "'s columns must be a multiple of ", group, ", got ",
              t.size(1));
}

std::tuple<at::Tensor, at::Tensor> per_token_group_quant_fp8_cuda(const at::Tensor& x_arg, int64_t group_size,
                                                                  bool ue8m0, bool column_major_scales) {
  constexpr const char* op = "per_token_group_quant_fp8";
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, op, ": group_size must be 32, 64 or 128, got ",
              group_size);
  check_quant_input(op, "x", x_arg, group_size);
  const c10::cuda::CUDAGuard guard(x_arg.device());
  const at::Tensor x = dso::dense_aligned16(x_arg);
  const int64_t m = x.size(0), k = x.size(1), num_groups = k / group_size;
  auto x_fp8 = at::empty({m, k}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scales = empty_group_scales(x, m, num_groups, column_major_scales);
  if (m > 0) {
    dso::launch_per_token_group_quant_fp8(x.data_ptr(), float_kind(x), x_fp8.data_ptr(), scales.data_ptr<float>(),
                                          m, k, group_size, ue8m0, scales.stride(0), scales.stride(1),
                                          dso::current_stream());
  }
  return {x_fp8, scales};
}

std::tuple<at::Tensor, at::Tensor> silu_mul_quant_fp8_cuda(const at::Tensor& h_arg, bool ue8m0,
                                                           bool column_major_scales) {
  check_quant_input("silu_mul_quant_fp8", "h", h_arg, 256);
  const c10::cuda::CUDAGuard guard(h_arg.device());
  const at::Tensor h = dso::dense_aligned16(h_arg);
  const int64_t m = h.size(0), k = h.size(1) / 2;
  auto act_fp8 = at::empty({m, k}, h.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scales = empty_group_scales(h, m, k / 128, column_major_scales);
  if (m > 0) {
    dso::launch_silu_mul_quant_fp8(h.data_ptr(), float_kind(h), act_fp8.data_ptr(), scales.data_ptr<float>(), m, k,
                                   ue8m0, scales.stride(0), scales.stride(1), dso::current_stream());
  }
  return {act_fp8, scales};
}

std::tuple<at::Tensor, at::Tensor> per_block_quant_fp8_cuda(const at::Tensor& w_arg, int64_t block_size,
                                                            bool ue8m0) {
  TORCH_CHECK(block_size == 128, "per_block_quant_fp8: block_size must be 128, got ", block_size);
  check_quant_input("per_block_quant_fp8", "w", w_arg, block_size);
  const c10::cuda::CUDAGuard guard(w_arg.device());
  const at::Tensor w = dso::dense_aligned16(w_arg);
  const int64_t n = w.size(0), k = w.size(1);
  auto w_fp8 = at::empty({n, k}, w.options().dtype(at::kFloat8_e4m3fn));
  auto scales = at::empty({dso::ceil_div<int64_t>(n, block_size), dso::ceil_div<int64_t>(k, block_size)},
                          w.options().dtype(at::kFloat));
  if (n > 0 && k > 0) {
    dso::launch_per_block_quant_fp8(w.data_ptr(), float_kind(w), w_fp8.data_ptr(), scales.data_ptr<float>(), n, k,
                                    block_size, ue8m0, dso::current_stream());
  }
  return {w_fp8, scales};
}

at::Tensor dequant_fp8_block_cuda(const at::Tensor& w_arg, const at::Tensor& scales_arg, int64_t block_size,
                                  at::ScalarType out_dtype) {
  constexpr const char* op = "dequant_fp8_block";
  TORCH_CHECK(block_size == 128, op, ": block_size must be 128, got ", block_size);
  dso::check_operand(op, "w", w_arg, w_arg.device(), at::kFloat8_e4m3fn, {-1, -1});
  TORCH_CHECK(w_arg.size(1) % block_size == 0, op, ": w's columns must be a multiple of 128, got ", w_arg.size(1));
  dso::check_operand(op, "scales", scales_arg, w_arg.device(), at::kFloat,
                     {(w_arg.size(0) + block_size - 1) / block_size, w_arg.size(1) / block_size});
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf || out_dtype == at::kFloat, op,
              ": out_dtype must be bfloat16, float16 or float32, got ", out_dtype);
  const c10::cuda::CUDAGuard guard(w_arg.device());
  const at::Tensor w = dso::dense_aligned16(w_arg), scales = scales_arg.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  auto out = at::empty({n, k}, w.options().dtype(out_dtype));
  if (n > 0 && k > 0) {
    dso::launch_dequant_fp8_block(w.data_ptr(), scales.data_ptr<float>(), out.data_ptr(), float_kind(out), n, k,
                                  block_size, scales.size(1), dso::current_stream());
  }
  return out;
}

// x [T, C] -> (x^T [C, T_pad] e4m3, scales fp32 [C, T_pad / 128]), T_pad = T rounded up to 128.
std::tuple<at::Tensor, at::Tensor> transpose_quant_fp8_cuda(const at::Tensor& x_arg) {
  TORCH_CHECK(x_arg.dim() == 2, "transpose_quant_fp8: x must be 2-D, got shape ", x_arg.sizes());
  float_kind(x_arg);
  const c10::cuda::CUDAGuard guard(x_arg.device());
  const at::Tensor x = dso::dense_aligned16(x_arg);
  const int64_t t = x.size(0), c = x.size(1), t_pad = dso::align_up<int64_t>(t, 128);
  auto x_t = at::empty({c, t_pad}, x.options().dtype(at::kFloat8_e4m3fn));
  auto scales = at::empty({c, t_pad / 128}, x.options().dtype(at::kFloat));
  if (t > 0 && c > 0) {
    dso::launch_transpose_quant_fp8(x.data_ptr(), float_kind(x), x_t.data_ptr(), scales.data_ptr<float>(), t, c,
                                    dso::current_stream());
  }
  return {x_t, scales};
}

// dact [M, K], h [M, 2K] (gate | up) of one dtype -> (dh_fp8 [M, 2K] e4m3, scales fp32 [M, 2K / 128], dh_t
// [2K, M_pad] e4m3, scales fp32 [2K, M_pad / 128]), M_pad = M rounded up to 128 (0 unless transposed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> swiglu_backward_quant_fp8_cuda(const at::Tensor& dact_arg,
                                                                                          const at::Tensor& h_arg,
                                                                                          bool transposed) {
  constexpr const char* op = "swiglu_backward_quant_fp8";
  check_quant_input(op, "h", h_arg, 256);
  dso::check_operand(op, "dact", dact_arg, h_arg.device(), h_arg.scalar_type(), {h_arg.size(0), h_arg.size(1) / 2});
  const c10::cuda::CUDAGuard guard(h_arg.device());
  const at::Tensor dact = dso::dense_aligned16(dact_arg), h = dso::dense_aligned16(h_arg);
  const int64_t m = h.size(0), k2 = h.size(1), t_pad = transposed ? dso::align_up<int64_t>(m, 128) : 0;
  const auto fp8 = h.options().dtype(at::kFloat8_e4m3fn), fp32 = h.options().dtype(at::kFloat);
  auto dh_fp8 = at::empty({m, k2}, fp8);
  auto dh_scales = at::empty({m, k2 / 128}, fp32);
  auto dh_t = at::empty({k2, t_pad}, fp8);
  auto dh_t_scales = at::empty({k2, t_pad / 128}, fp32);
  if (m > 0) {
    dso::launch_swiglu_backward_quant_fp8(dact.data_ptr(), h.data_ptr(), float_kind(h), dh_fp8.data_ptr(),
                                          dh_scales.data_ptr<float>(), dh_t.data_ptr(), dh_t_scales.data_ptr<float>(),
                                          m, k2 / 2, transposed, dso::current_stream());
  }
  return {dh_fp8, dh_scales, dh_t, dh_t_scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_ops, CUDA, m) {
  m.impl("per_token_group_quant_fp8", &per_token_group_quant_fp8_cuda);
  m.impl("silu_mul_quant_fp8", &silu_mul_quant_fp8_cuda);
  m.impl("per_block_quant_fp8", &per_block_quant_fp8_cuda);
  m.impl("dequant_fp8_block", &dequant_fp8_block_cuda);
  m.impl("transpose_quant_fp8", &transpose_quant_fp8_cuda);
  m.impl("swiglu_backward_quant_fp8", &swiglu_backward_quant_fp8_cuda);
}
