// CUDA adapters of the FP8 GEMM ops, fp8_gemm_wgrad included (schemas in registration.cpp; kernels in
// sm90_fp8_gemm.cu).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common.h"
#include "sm90_fp8_gemm.h"
#include "torch_utils.h"

namespace {

constexpr auto kFp8 = at::kFloat8_e4m3fn;

// TMA reads rows of K contiguous bytes: stride 1 along K, row strides a multiple of 16 bytes and >= K,
// a 16-byte aligned start.
void check_k_major(const char* op, const char* name, const at::Tensor& t) {
  const int64_t k = t.size(-1), rows = t.numel() / std::max<int64_t>(k, 1);
  TORCH_CHECK(k <= 1 || t.stride(-1) == 1, op, ": ", name, " must be K-major, got strides ", t.strides());
  TORCH_CHECK(rows <= 1 || (t.stride(-2) % 16 == 0 && t.stride(-2) >= k), op, ": ", name,
              " needs a row stride that is a multiple of 16 and >= K, got strides ", t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
              " must start at a 16-byte aligned address");
}

// The FP8 operands of every GEMM: a [(G,) M, K], b [(G,) N, K], their fp32 scales, all on a's device.
// Returns (N, K).
std::pair<int64_t, int64_t> check_gemm_operands(const char* op, const at::Tensor& a, const at::Tensor& a_scales,
                                                const at::Tensor& b, const at::Tensor& b_scales, bool grouped_a,
                                                bool grouped_b) {
  const at::Device dev = a.device();
  TORCH_CHECK(dev.is_cuda(), op, ": a must be a CUDA tensor, got ", dev);
  if (grouped_a) {
    dso::check_operand(op, "a", a, dev, kFp8, {-1, -1, -1});
  } else {
    dso::check_operand(op, "a", a, dev, kFp8, {-1, -1});
  }
  const int64_t k = a.size(-1);
  const int64_t groups = grouped_a ? a.size(0) : (grouped_b ? b.size(0) : 1);
  if (grouped_b) {
    dso::check_operand(op, "b", b, dev, kFp8, {grouped_a ? groups : -1, -1, k});
  } else {
    dso::check_operand(op, "b", b, dev, kFp8, {-1, k});
  }
  const int64_t n = b.size(-2);
  TORCH_CHECK(k > 0 && k % 128 == 0, op, ": K must be a positive multiple of 128, got ", k);
  TORCH_CHECK(n % 16 == 0, op, ": N must be a multiple of 16, got ", n);
  if (grouped_a) {
    dso::check_operand(op, "a_scales", a_scales, dev, at::kFloat, {groups, a.size(1), k / 128});
  } else {
    dso::check_operand(op, "a_scales", a_scales, dev, at::kFloat, {a.size(0), k / 128});
  }
  if (grouped_b) {
    dso::check_operand(op, "b_scales", b_scales, dev, at::kFloat, {b.size(0), (n + 127) / 128, k / 128});
    // Groups are addressed as rows of one [G * N, K] matrix.
    TORCH_CHECK(b.size(0) <= 1 || b.stride(0) == n * b.stride(1), op, ": b's groups must be stored back to back");
  } else {
    dso::check_operand(op, "b_scales", b_scales, dev, at::kFloat, {(n + 127) / 128, k / 128});
  }
  if (!grouped_a) check_k_major(op, "a", a);  // a grouped a is copied into a dense one first
  check_k_major(op, "b", b);
  return {n, k};
}

// a_scales [rows, k/128] (masked: [groups, rows, k/128]) in the M-major layout the GEMM kernels read
// (deepseek_ops/gemm.py describes it), and its ld. Any other layout is first copied into it (one
// small extra kernel).
std::pair<at::Tensor, int64_t> gemm_m_major_scales(const at::Tensor& scales) {
  const bool grouped = scales.dim() == 3;
  const int64_t rows = grouped ? scales.size(0) * scales.size(1) : scales.size(0);
  const int64_t num_k_blocks = scales.size(-1);
  const int64_t ld = scales.stride(-1);
  const bool rows_contiguous = scales.stride(-2) == 1 && (!grouped || scales.stride(0) == scales.size(1));
  const bool aligned = reinterpret_cast<uintptr_t>(scales.data_ptr()) % 16 == 0;
  if (rows_contiguous && aligned && (num_k_blocks == 1 || (ld >= rows && ld % 4 == 0))) {
    return {scales, num_k_blocks == 1 ? dso::align_up<int64_t>(rows, 4) : ld};
  }
  const int64_t padded = dso::align_up<int64_t>(rows, 4);
  auto m_major = at::empty({num_k_blocks, padded}, scales.options()).narrow(1, 0, rows).t();  // [rows, kb]
  m_major.copy_(scales.reshape({rows, num_k_blocks}));
  return {m_major, padded};
}

// Fills the operand fields of a GEMM problem; rows = a's rows (groups flattened).
dso::Fp8GemmProblem gemm_problem(dso::GemmType type, const at::Tensor& a, const at::Tensor& a_scales_m_major,
                                 int64_t a_scales_ld, const at::Tensor& b, const at::Tensor& b_scales,
                                 const at::Tensor& out) {
  dso::Fp8GemmProblem p;
  p.type = type;
  p.k = a.size(-1);
  p.n = b.size(-2);
  p.num_groups = b.dim() == 3 ? b.size(0) : 1;
  // A row stride is meaningless for a single row; the kernel's tensor map still needs a valid one.
  p.a = a.data_ptr();
  p.lda = a.size(-2) == 1 ? p.k : a.stride(-2);
  p.a_scales = a_scales_m_major.data_ptr<float>();
  p.a_scales_ld = a_scales_ld;
  p.b = b.data_ptr();
  p.ldb = b.stride(-2);
  p.b_scales = b_scales.data_ptr<float>();
  p.d = out.data_ptr();
  p.ldd = out.stride(-2);
  p.d_fp32 = out.scalar_type() == at::kFloat;
  return p;
}

void check_gemm_out_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, op, ": out must be bfloat16 or float32, got ", dtype);
}

// c, fp8_gemm's optional fp32 addend: [M, N] on a's device, dense.
void check_gemm_addend(const char* op, const std::optional<at::Tensor>& c, const at::Tensor& a, int64_t n) {
  if (!c.has_value()) return;
  dso::check_operand(op, "c", *c, a.device(), at::kFloat, {a.size(0), n});
  dso::check_dense16(op, "c", *c);
}

// d = a @ b^T (+ c) into out; every argument already checked.
void launch_fp8_gemm(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b, const at::Tensor& b_scales,
                     const std::optional<at::Tensor>& c, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.size(0) == 0 || b.size(0) == 0) return;
  const auto [sfa, sfa_ld] = gemm_m_major_scales(a_scales);
  const auto sfb = b_scales.contiguous();
  dso::Fp8GemmProblem p = gemm_problem(dso::GemmType::kNormal, a, sfa, sfa_ld, b, sfb, out);
  p.m = a.size(0);
  if (c.has_value()) {
    p.c = c->data_ptr<float>();
    p.ldc = c->stride(0);
  }
  // Split K writes fp32 partial sums first: from the caching allocator on this stream, so the memory
  // is reused only after the kernels that read it.
  at::Tensor split_partials;
  const dso::Fp8GemmConfig config = dso::select_sm90_fp8_gemm_config(p);
  if (config.num_splits > 1) {
    split_partials = at::empty({config.num_splits, p.m, p.n}, a.options().dtype(at::kFloat));
    p.split_partials = split_partials.data_ptr<float>();
  }
  dso::launch_sm90_fp8_gemm(p, config, dso::current_stream());
}

void fp8_gemm_out_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                       const at::Tensor& b_scales, const std::optional<at::Tensor>& c, at::Tensor& out) {
  constexpr const char* op = "fp8_gemm";
  const auto [n, k] = check_gemm_operands(op, a, a_scales, b, b_scales, false, false);
  check_gemm_out_dtype(op, out.scalar_type());
  dso::check_operand(op, "out", out, a.device(), out.scalar_type(), {a.size(0), n});
  dso::check_dense16(op, "out", out);
  check_gemm_addend(op, c, a, n);
  launch_fp8_gemm(a, a_scales, b, b_scales, c, out);
}

at::Tensor fp8_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                         const at::Tensor& b_scales, at::ScalarType out_dtype, const std::optional<at::Tensor>& c) {
  constexpr const char* op = "fp8_gemm";
  const auto [n, k] = check_gemm_operands(op, a, a_scales, b, b_scales, false, false);  // before sizing out by them
  check_gemm_out_dtype(op, out_dtype);
  check_gemm_addend(op, c, a, n);
  // A fresh allocation: [M, N] row-major, 16-byte aligned, what fp8_gemm_out_cuda checks of out.
  auto out = at::empty({a.size(0), n}, a.options().dtype(out_dtype));
  launch_fp8_gemm(a, a_scales, b, b_scales, c, out);
  return out;
}

// The operands of both weight-gradient ops: a [m, t] and b [n, t] e4m3, both scaled 1 x 128 along t
// (transpose_quant_fp8's outputs, t the tokens). Returns (m, t, n).
std::tuple<int64_t, int64_t, int64_t> check_wgrad_operands(const char* op, const at::Tensor& a,
                                                           const at::Tensor& a_scales, const at::Tensor& b,
                                                           const at::Tensor& b_scales) {
  const at::Device dev = a.device();
  TORCH_CHECK(dev.is_cuda(), op, ": a must be a CUDA tensor, got ", dev);
  dso::check_operand(op, "a", a, dev, kFp8, {-1, -1});
  const int64_t m = a.size(0), t = a.size(1);
  dso::check_operand(op, "b", b, dev, kFp8, {-1, t});
  const int64_t n = b.size(0);
  TORCH_CHECK(t % 128 == 0, op, ": T (a.shape[1]) must be a multiple of 128, got ", t);
  TORCH_CHECK(n % 16 == 0, op, ": b's rows must be a multiple of 16, got ", n);
  dso::check_operand(op, "a_scales", a_scales, dev, at::kFloat, {m, t / 128});
  dso::check_operand(op, "b_scales", b_scales, dev, at::kFloat, {n, t / 128});
  check_k_major(op, "a", a);
  check_k_major(op, "b", b);
  return {m, t, n};
}

// Launches a weight-gradient GEMM (t > 0) into out, with both operands' scales in the N-major layout.
void launch_wgrad(dso::GemmType type, const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                  const at::Tensor& b_scales, const std::optional<at::Tensor>& c, at::Tensor& out,
                  int64_t num_groups, const int32_t* k_block_offsets) {
  const auto [sfa, sfa_ld] = gemm_m_major_scales(a_scales);
  const auto [sfb, sfb_ld] = gemm_m_major_scales(b_scales);  // per row of b, as a's per row of a
  dso::Fp8GemmProblem p = gemm_problem(type, a, sfa, sfa_ld, b, sfb, out);
  p.b_scales_ld = sfb_ld;
  p.m = a.size(0);
  p.num_groups = num_groups;
  p.k_block_offsets = k_block_offsets;
  if (c.has_value()) {
    p.c = c->data_ptr<float>();
    p.ldc = b.size(0);  // c is dense [(G,) m, n]
  }
  dso::launch_sm90_fp8_gemm(p, dso::current_stream());
}

// c and out of a weight-gradient op: fp32, dense; out contiguous and 16-byte aligned (the kernel writes
// it by TMA). c may be out itself (accumulate in place: the kernel adds into it at L2, reading nothing
// of it) or lie elsewhere, but not overlap it otherwise.
void check_wgrad_c_out(const char* op, const std::optional<at::Tensor>& c, const at::Tensor& out,
                       std::initializer_list<int64_t> shape, const at::Device dev) {
  dso::check_operand(op, "out", out, dev, at::kFloat, shape);
  dso::check_dense16(op, "out", out);
  if (!c.has_value()) return;
  dso::check_operand(op, "c", *c, dev, at::kFloat, shape);
  dso::check_dense16(op, "c", *c);
  const bool same = c->data_ptr() == out.data_ptr();
  TORCH_CHECK(same || at::get_overlap_status(*c, out) == at::MemOverlapStatus::No,
              op, ": c must be out itself or not overlap it");
}

// dW = (a * a_scales) @ (b * b_scales)^T (+ c) -> out, fp32 [m, n].
void fp8_gemm_wgrad_out_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                             const at::Tensor& b_scales, const std::optional<at::Tensor>& c, at::Tensor& out) {
  constexpr const char* op = "fp8_gemm_wgrad";
  const auto [m, t, n] = check_wgrad_operands(op, a, a_scales, b, b_scales);
  check_wgrad_c_out(op, c, out, {m, n}, a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  if (m == 0 || n == 0) return;
  if (t == 0) {
    c.has_value() ? out.copy_(*c) : out.zero_();
    return;
  }
  launch_wgrad(dso::GemmType::kWgrad, a, a_scales, b, b_scales, c, out, 1, nullptr);
}

at::Tensor fp8_gemm_wgrad_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                               const at::Tensor& b_scales, const std::optional<at::Tensor>& c) {
  auto out = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kFloat));
  fp8_gemm_wgrad_out_cuda(a, a_scales, b, b_scales, c, out);
  return out;
}

// G, the experts of k_grouped_fp8_gemm_wgrad: group_offsets int32/int64 [G + 1], G >= 1, on dev.
int64_t k_grouped_wgrad_groups(const at::Tensor& group_offsets, const at::Device dev) {
  TORCH_CHECK(group_offsets.device() == dev && group_offsets.dim() == 1 && group_offsets.size(0) >= 2 &&
                  (group_offsets.scalar_type() == at::kInt || group_offsets.scalar_type() == at::kLong),
              "k_grouped_fp8_gemm_wgrad: group_offsets must be int32/int64 [G + 1] with G >= 1 on ", dev);
  return group_offsets.size(0) - 1;
}

// The weight gradients of all experts: out[g] = fp8_gemm_wgrad over the tokens [group_offsets[g],
// group_offsets[g + 1]) (+ c[g]), fp32 [G, m, n]. The offsets (multiples of 128, checked by the public
// function where it can read them) become K-block offsets; the kernel clamps them.
void k_grouped_fp8_gemm_wgrad_out_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                       const at::Tensor& b_scales, const at::Tensor& group_offsets,
                                       const std::optional<at::Tensor>& c, at::Tensor& out) {
  constexpr const char* op = "k_grouped_fp8_gemm_wgrad";
  const auto [m, t, n] = check_wgrad_operands(op, a, a_scales, b, b_scales);
  const at::Device dev = a.device();
  const int64_t groups = k_grouped_wgrad_groups(group_offsets, dev);
  check_wgrad_c_out(op, c, out, {groups, m, n}, dev);
  const c10::cuda::CUDAGuard guard(dev);
  if (m == 0 || n == 0) return;
  if (t == 0) {
    c.has_value() ? out.copy_(*c) : out.zero_();
    return;
  }
  const auto k_block_offsets = at::floor_divide(group_offsets, 128).to(at::kInt).contiguous();
  launch_wgrad(dso::GemmType::kKGroupedWgrad, a, a_scales, b, b_scales, c, out, groups,
               k_block_offsets.data_ptr<int32_t>());
}

at::Tensor k_grouped_fp8_gemm_wgrad_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                         const at::Tensor& b_scales, const at::Tensor& group_offsets,
                                         const std::optional<at::Tensor>& c) {
  const int64_t groups = k_grouped_wgrad_groups(group_offsets, a.device());
  auto out = at::empty({groups, a.size(0), b.size(0)}, a.options().dtype(at::kFloat));
  k_grouped_fp8_gemm_wgrad_out_cuda(a, a_scales, b, b_scales, group_offsets, c, out);
  return out;
}

void grouped_fp8_gemm_contiguous_out_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                          const at::Tensor& b_scales, const at::Tensor& m_indices, at::Tensor& out) {
  constexpr const char* op = "grouped_fp8_gemm_contiguous";
  const auto [n, k] = check_gemm_operands(op, a, a_scales, b, b_scales, false, true);
  const int64_t m = a.size(0);
  // The kernel reads m_indices and writes out per 128-row block.
  TORCH_CHECK(m % 128 == 0, op, ": a's rows must be a multiple of 128, got ", m);
  dso::check_operand(op, "m_indices", m_indices, a.device(), at::kInt, {m});
  TORCH_CHECK(m_indices.is_contiguous(), op, ": m_indices must be contiguous");
  dso::check_operand(op, "out", out, a.device(), at::kBFloat16, {m, n});
  dso::check_dense16(op, "out", out);
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.size(0) == 0 || b.size(0) == 0 || b.size(1) == 0) return;
  const auto [sfa, sfa_ld] = gemm_m_major_scales(a_scales);
  const auto sfb = b_scales.contiguous();
  dso::Fp8GemmProblem p = gemm_problem(dso::GemmType::kGroupedContiguous, a, sfa, sfa_ld, b, sfb, out);
  p.m = a.size(0);
  p.m_indices = m_indices.data_ptr<int32_t>();
  dso::launch_sm90_fp8_gemm(p, dso::current_stream());
}

at::Tensor grouped_fp8_gemm_contiguous_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                            const at::Tensor& b_scales, const at::Tensor& m_indices) {
  check_gemm_operands("grouped_fp8_gemm_contiguous", a, a_scales, b, b_scales, false, true);
  auto out = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kBFloat16));
  grouped_fp8_gemm_contiguous_out_cuda(a, a_scales, b, b_scales, m_indices, out);
  return out;
}

void grouped_fp8_gemm_masked_out_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                      const at::Tensor& b_scales, const at::Tensor& masked_m, int64_t expected_m,
                                      at::Tensor& out) {
  constexpr const char* op = "grouped_fp8_gemm_masked";
  const auto [n, k] = check_gemm_operands(op, a, a_scales, b, b_scales, true, true);
  dso::check_operand(op, "masked_m", masked_m, a.device(), at::kInt, {a.size(0)});
  TORCH_CHECK(masked_m.is_contiguous(), op, ": masked_m must be contiguous");
  dso::check_operand(op, "out", out, a.device(), at::kBFloat16, {a.size(0), a.size(1), n});
  dso::check_dense16(op, "out", out);
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.size(0) == 0 || a.size(1) == 0 || b.size(1) == 0) return;
  const auto [sfa, sfa_ld] = gemm_m_major_scales(a_scales);
  const auto sfb = b_scales.contiguous();
  // Groups are flattened into rows, so each group's rows must directly follow the previous group's.
  const auto a_flat = a.contiguous();
  check_k_major(op, "a", a_flat);
  dso::Fp8GemmProblem p = gemm_problem(dso::GemmType::kGroupedMasked, a_flat, sfa, sfa_ld, b, sfb, out);
  p.m = a.size(1);
  p.masked_m = masked_m.data_ptr<int32_t>();
  p.expected_m = expected_m;
  dso::launch_sm90_fp8_gemm(p, dso::current_stream());
}

at::Tensor grouped_fp8_gemm_masked_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                        const at::Tensor& b_scales, const at::Tensor& masked_m, int64_t expected_m) {
  check_gemm_operands("grouped_fp8_gemm_masked", a, a_scales, b, b_scales, true, true);
  auto out = at::empty({a.size(0), a.size(1), b.size(1)}, a.options().dtype(at::kBFloat16));
  grouped_fp8_gemm_masked_out_cuda(a, a_scales, b, b_scales, masked_m, expected_m, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_ops, CUDA, m) {
  m.impl("fp8_gemm", &fp8_gemm_cuda);
  m.impl("fp8_gemm_out", &fp8_gemm_out_cuda);
  m.impl("grouped_fp8_gemm_contiguous", &grouped_fp8_gemm_contiguous_cuda);
  m.impl("grouped_fp8_gemm_contiguous_out", &grouped_fp8_gemm_contiguous_out_cuda);
  m.impl("grouped_fp8_gemm_masked", &grouped_fp8_gemm_masked_cuda);
  m.impl("grouped_fp8_gemm_masked_out", &grouped_fp8_gemm_masked_out_cuda);
  m.impl("fp8_gemm_wgrad", &fp8_gemm_wgrad_cuda);
  m.impl("k_grouped_fp8_gemm_wgrad", &k_grouped_fp8_gemm_wgrad_cuda);
  m.impl("fp8_gemm_wgrad_out", &fp8_gemm_wgrad_out_cuda);
  m.impl("k_grouped_fp8_gemm_wgrad_out", &k_grouped_fp8_gemm_wgrad_out_cuda);
}
