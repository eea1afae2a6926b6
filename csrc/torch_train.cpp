// CUDA adapters of the FP8 training ops that have CUDA kernels (schemas in registration.cpp): the dgrad
// GEMMs. dx = dy @ W runs the NT FP8 GEMM ops (deepseek_ops::fp8_gemm, grouped_fp8_gemm_contiguous_out,
// csrc/torch_gemm.cpp, called through the dispatcher) on W^T [K, N] (csrc/sm90_fp8_dgrad.cu) with the
// block scales transposed alike: dy @ (W^T)^T. The GEMM's shape rules then hold for every shape the
// public functions accept: its contraction N a positive multiple of 128 (an empty one is a zero
// gradient, returned without a launch), its output width K a multiple of 128 (it needs 16).
// transpose_quant_fp8's adapter sits with the other quantizers (csrc/torch_quant.cpp).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <utility>

#include "sm90_fp8_dgrad.h"
#include "torch_utils.h"

namespace {

constexpr auto kFp8 = at::kFloat8_e4m3fn;

using Fp8GemmFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             at::ScalarType, const std::optional<at::Tensor>&);
using GroupedFp8GemmOutFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, at::Tensor&);

const c10::TypedOperatorHandle<Fp8GemmFn>& fp8_gemm_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("deepseek_ops::fp8_gemm", "").typed<Fp8GemmFn>();
  return op;
}

const c10::TypedOperatorHandle<GroupedFp8GemmOutFn>& grouped_fp8_gemm_contiguous_out_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("deepseek_ops::grouped_fp8_gemm_contiguous_out", "")
                             .typed<GroupedFp8GemmOutFn>();
  return op;
}

// The operands both dgrad ops share: dy [M, N] e4m3 with scales [M, N/128], w [(G,) N, K] e4m3 with
// block scales [(G,) N/128, K/128], all on dy's device. Returns (N, K).
std::pair<int64_t, int64_t> check_dgrad_operands(const char* op, const at::Tensor& dy, const at::Tensor& dy_scales,
                                                 const at::Tensor& w, const at::Tensor& w_scales, bool grouped) {
  const at::Device dev = dy.device();
  TORCH_CHECK(dev.is_cuda(), op, ": dy must be a CUDA tensor, got ", dev);
  if (grouped) {
    dso::check_operand(op, "w", w, dev, kFp8, {-1, -1, -1});
  } else {
    dso::check_operand(op, "w", w, dev, kFp8, {-1, -1});
  }
  const int64_t n = w.size(-2), k = w.size(-1);
  TORCH_CHECK(n % 128 == 0 && k % 128 == 0, op, ": w's N and K must be multiples of 128, got shape ", w.sizes());
  dso::check_operand(op, "dy", dy, dev, kFp8, {-1, n});
  dso::check_operand(op, "dy_scales", dy_scales, dev, at::kFloat, {dy.size(0), n / 128});
  if (grouped) {
    dso::check_operand(op, "w_scales", w_scales, dev, at::kFloat, {w.size(0), n / 128, k / 128});
  } else {
    dso::check_operand(op, "w_scales", w_scales, dev, at::kFloat, {n / 128, k / 128});
  }
  return {n, k};
}

// w [(G,) N, K] e4m3 -> W^T [(G,) K, N], contiguous.
at::Tensor transpose_weight(const at::Tensor& w) {
  const at::Tensor src = dso::dense_aligned16(w);
  const int64_t groups = w.dim() == 3 ? w.size(0) : 1, n = w.size(-2), k = w.size(-1);
  at::Tensor w_t = at::empty(w.transpose(-2, -1).sizes(), w.options());
  if (w.numel() > 0) dso::launch_transpose_fp8(src.data_ptr(), w_t.data_ptr(), groups, n, k, dso::current_stream());
  return w_t;
}

at::Tensor fp8_gemm_dgrad_cuda(const at::Tensor& dy, const at::Tensor& dy_scales, const at::Tensor& w,
                               const at::Tensor& w_scales, at::ScalarType out_dtype) {
  constexpr const char* op = "fp8_gemm_dgrad";
  const auto [n, k] = check_dgrad_operands(op, dy, dy_scales, w, w_scales, false);
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kFloat, op,
              ": out_dtype must be bfloat16 or float32, got ", out_dtype);
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t m = dy.size(0);
  if (m == 0 || n == 0 || k == 0) return at::zeros({m, k}, dy.options().dtype(out_dtype));
  return fp8_gemm_op().call(dso::dense_aligned16(dy), dy_scales, transpose_weight(w), w_scales.t(), out_dtype,
                            std::nullopt);
}

at::Tensor grouped_fp8_gemm_dgrad_contiguous_cuda(const at::Tensor& dy, const at::Tensor& dy_scales,
                                                  const at::Tensor& w, const at::Tensor& w_scales,
                                                  const at::Tensor& m_indices_arg) {
  constexpr const char* op = "grouped_fp8_gemm_dgrad_contiguous";
  const auto [n, k] = check_dgrad_operands(op, dy, dy_scales, w, w_scales, true);
  const int64_t m = dy.size(0);
  dso::check_operand(op, "m_indices", m_indices_arg, dy.device(), at::kInt, {m});
  // The GEMM's contiguous layout: a 128-row block holds one group's rows, then padding.
  TORCH_CHECK(m % 128 == 0, op, ": dy's rows must be a multiple of 128, got ", m);
  const c10::cuda::CUDAGuard guard(dy.device());
  auto out = at::empty({m, k}, dy.options().dtype(at::kBFloat16));
  if (m == 0 || k == 0) return out;
  if (n == 0) return out.zero_();
  const at::Tensor m_indices = m_indices_arg.contiguous();
  dso::launch_zero_ungrouped_rows(m_indices.data_ptr<int32_t>(), m, w.size(0), out.data_ptr(), k * out.element_size(),
                                  dso::current_stream());
  grouped_fp8_gemm_contiguous_out_op().call(dso::dense_aligned16(dy), dy_scales, transpose_weight(w),
                                            w_scales.transpose(-2, -1), m_indices, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_ops, CUDA, m) {
  m.impl("fp8_gemm_dgrad", &fp8_gemm_dgrad_cuda);
  m.impl("grouped_fp8_gemm_dgrad_contiguous", &grouped_fp8_gemm_dgrad_contiguous_cuda);
}
