// Every deepseek_ops schema, and the CUDA kernels behind them.
//
// The CPU kernels are the reference implementations (deepseek_ops/reference.py) and the
// fake kernels are shape functions; both are registered from Python. Argument checks live
// in Python (deepseek_ops/_checks.py) in front of every public op; the functions here only
// translate tensors into pointers, sizes and the current stream.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

#ifdef DSO_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "sm90_fp8_quant.h"
#include "sm90_bf16_mla_decode.h"
#include "ep_local.h"
#include "ep_ipc.h"
#include "sm90_fp8_gemm.h"
#include "sm90_fp8_gemm_variants.h"
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

// The compiled FP8 GEMM tile variants, flattened as (gemm type, fp32 output, BLOCK_M, BLOCK_N, cluster
// size) per variant (gemm type: 0 dense, 1 contiguous grouped, 2 masked grouped); empty without CUDA.
std::vector<int64_t> fp8_gemm_tile_configs() {
  std::vector<int64_t> configs;
#ifdef DSO_WITH_CUDA
  for (const dso::GemmType type :
       {dso::GemmType::kNormal, dso::GemmType::kGroupedContiguous, dso::GemmType::kGroupedMasked}) {
    for (const bool out_fp32 : {false, true}) {
      auto add = [&](int block_m, int block_n, int cluster) {
        if (dso::gemm::variant_instantiated(type, out_fp32, block_m, block_n, cluster)) {
          configs.insert(configs.end(), {static_cast<int>(type), out_fp32, block_m, block_n, cluster});
        }
      };
      for (const int block_m : {64, 128}) {
        for (const int block_n : dso::gemm::kBlockNs) add(block_m, block_n, 1);
      }
      for (const int cluster : {1, 2}) {
        for (const int block_n : dso::gemm::kWideBlockNs) add(256, block_n, cluster);
      }
    }
  }
#endif
  return configs;
}

}  // namespace

TORCH_LIBRARY(deepseek_ops, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("fp8_gemm_tile_configs() -> int[]", &fp8_gemm_tile_configs);

  // FP8 quantization (DeepSeek-V3 recipe: 1x128 activation groups, 128x128 weight blocks).
  m.def("per_token_group_quant_fp8(Tensor x, int group_size, bool ue8m0, bool column_major_scales)"
        " -> (Tensor, Tensor)");
  m.def("silu_mul_quant_fp8(Tensor h, bool ue8m0, bool column_major_scales) -> (Tensor, Tensor)");
  m.def("per_block_quant_fp8(Tensor w, int block_size, bool ue8m0) -> (Tensor, Tensor)");
  m.def("dequant_fp8_block(Tensor w, Tensor scales, int block_size, ScalarType out_dtype) -> Tensor");
  // MLA decode on a paged latent cache (bf16 [num_blocks, 64, 1, 576] or packed FP8 uint8 [.., 656]).
  m.def("get_mla_metadata(Tensor cache_seqlens, int num_sm_parts) -> (Tensor, Tensor)");
  m.def("mla_decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor cache_seqlens, float softmax_scale,"
        " bool causal, Tensor tile_sched, Tensor split_offsets, Tensor(a!) out) -> Tensor");
  m.def("quantize_mla_kv(Tensor kv) -> Tensor");
  m.def("mla_cache_append(Tensor(a!) kv_cache, Tensor block_table, Tensor positions, Tensor c_kv, Tensor k_pe) -> ()");
  // Expert parallelism (deepseek_ops.ep): layout counts, dispatch permutation, weighted combine.
  m.def("ep_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks) -> (Tensor, Tensor, Tensor)");
  m.def("ep_permute(Tensor x, Tensor? x_scales, Tensor? topk_weights, Tensor topk_idx, int num_experts,"
        " int alignment, int num_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ep_combine(Tensor y, Tensor row_of, Tensor topk_weights) -> Tensor");
  // Intranode expert parallelism over CUDA IPC (CUDA only; `like` names the device). The send ops
  // write into peers' buffers, outside anything a schema can describe: eager use only.
  m.def("ep_ipc_alloc(Tensor like, int num_bytes) -> Tensor");
  m.def("ep_ipc_handle(Tensor buffer) -> Tensor");
  m.def("ep_ipc_open(Tensor like, Tensor handle, int num_bytes) -> Tensor");
  m.def("ep_ipc_barrier(Tensor peer_ptrs, int[] layout, int rank, int timeout_ns, Tensor(a!) error, int step) -> ()");
  m.def("ep_ipc_dispatch_send(Tensor x, Tensor? x_scales, Tensor topk_idx, Tensor topk_weights, Tensor slot_of,"
        " Tensor counts, Tensor peer_ptrs, int[] layout, int rank, int num_local_experts, int max_tokens,"
        " Tensor error) -> ()");
  m.def("ep_ipc_dispatch_wait(Tensor peer_ptrs, int[] layout, int rank, int max_tokens, int topk, int timeout_ns,"
        " Tensor(a!) error, Tensor(b!) recv_counts) -> ()");
  m.def("ep_ipc_combine_send(Tensor y, Tensor recv_row_of, Tensor recv_counts, Tensor peer_ptrs, int[] layout,"
        " int rank, int max_tokens, Tensor error) -> ()");
  m.def("ep_ipc_combine_wait(Tensor peer_ptrs, int[] layout, int rank, int timeout_ns, Tensor(a!) error) -> ()");
  // FP8 GEMMs, d = (a * a_scales) @ (b * b_scales)^T (+ c); the *_out variants write `out`.
  m.def("fp8_gemm(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, ScalarType out_dtype, Tensor? c) -> Tensor");
  m.def("fp8_gemm_out(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor? c, Tensor(a!) out) -> ()");
  m.def("grouped_fp8_gemm_contiguous(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor m_indices)"
        " -> Tensor");
  m.def("grouped_fp8_gemm_contiguous_out(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor m_indices,"
        " Tensor(a!) out) -> ()");
  m.def("grouped_fp8_gemm_masked(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor masked_m,"
        " int expected_m) -> Tensor");
  m.def("grouped_fp8_gemm_masked_out(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor masked_m,"
        " int expected_m, Tensor(a!) out) -> ()");
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

// The quantization kernels read 16-byte vectors from row-major rows: a strided view, or a
// contiguous one whose storage offset is not 16-byte aligned, is copied first (the public Python
// functions pass contiguous tensors, but torch.ops.deepseek_ops.* can be called directly).
at::Tensor dense_aligned16(const at::Tensor& t) {
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (t.is_contiguous() && aligned) return t;
  return t.is_contiguous() ? t.clone() : t.contiguous();
}

// fp32 [m, num_groups] scales, row-major or stored [num_groups, align(m, 4)] (M-contiguous) so that
// the GEMM's TMA reads M-contiguous rows of scales.
at::Tensor empty_group_scales(const at::Tensor& like, int64_t m, int64_t num_groups, bool column_major) {
  if (!column_major) return at::empty({m, num_groups}, like.options().dtype(at::kFloat));
  const int64_t m_pad = dso::align_up<int64_t>(m, 4);
  return at::empty({num_groups, m_pad}, like.options().dtype(at::kFloat)).narrow(1, 0, m).t();
}

std::tuple<at::Tensor, at::Tensor> per_token_group_quant_fp8_cuda(const at::Tensor& x_arg, int64_t group_size,
                                                                  bool ue8m0, bool column_major_scales) {
  const c10::cuda::CUDAGuard guard(x_arg.device());
  const at::Tensor x = dense_aligned16(x_arg);
  const int64_t m = x.size(0), k = x.size(1), num_groups = k / group_size;
  auto x_fp8 = at::empty({m, k}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scales = empty_group_scales(x, m, num_groups, column_major_scales);
  if (m > 0) {
    dso::launch_per_token_group_quant_fp8(x.data_ptr(), float_kind(x), x_fp8.data_ptr(), scales.data_ptr<float>(),
                                          m, k, group_size, ue8m0, scales.stride(0), scales.stride(1),
                                          current_stream());
  }
  return {x_fp8, scales};
}

std::tuple<at::Tensor, at::Tensor> silu_mul_quant_fp8_cuda(const at::Tensor& h_arg, bool ue8m0,
                                                           bool column_major_scales) {
  const c10::cuda::CUDAGuard guard(h_arg.device());
  const at::Tensor h = dense_aligned16(h_arg);
  const int64_t m = h.size(0), k = h.size(1) / 2;
  auto act_fp8 = at::empty({m, k}, h.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scales = empty_group_scales(h, m, k / 128, column_major_scales);
  if (m > 0) {
    dso::launch_silu_mul_quant_fp8(h.data_ptr(), float_kind(h), act_fp8.data_ptr(), scales.data_ptr<float>(), m, k,
                                   ue8m0, scales.stride(0), scales.stride(1), current_stream());
  }
  return {act_fp8, scales};
}

std::tuple<at::Tensor, at::Tensor> per_block_quant_fp8_cuda(const at::Tensor& w_arg, int64_t block_size,
                                                            bool ue8m0) {
  const c10::cuda::CUDAGuard guard(w_arg.device());
  const at::Tensor w = dense_aligned16(w_arg);
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

at::Tensor dequant_fp8_block_cuda(const at::Tensor& w_arg, const at::Tensor& scales_arg, int64_t block_size,
                                  at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(w_arg.device());
  const at::Tensor w = dense_aligned16(w_arg), scales = scales_arg.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  auto out = at::empty({n, k}, w.options().dtype(out_dtype));
  if (n > 0 && k > 0) {
    dso::launch_dequant_fp8_block(w.data_ptr(), scales.data_ptr<float>(), out.data_ptr(), float_kind(out), n, k,
                                  block_size, scales.size(1), current_stream());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> get_mla_metadata_cuda(const at::Tensor& cache_seqlens, int64_t num_sm_parts) {
  const c10::cuda::CUDAGuard guard(cache_seqlens.device());
  const int64_t batch = cache_seqlens.size(0);
  auto opts = cache_seqlens.options().dtype(at::kInt);
  auto tile_sched = at::empty({num_sm_parts, dso::kMlaSchedCols}, opts);
  auto split_offsets = at::empty({batch + 1}, opts);
  dso::launch_mla_metadata(cache_seqlens.data_ptr<int>(), static_cast<int>(batch), static_cast<int>(num_sm_parts),
                           tile_sched.data_ptr<int>(), split_offsets.data_ptr<int>(), current_stream());
  return {tile_sched, split_offsets};
}

at::Tensor mla_decode_cuda(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                           const at::Tensor& cache_seqlens, double softmax_scale, bool causal,
                           const at::Tensor& tile_sched, const at::Tensor& split_offsets, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0), s_q = q.size(1), h_q = q.size(2), num_parts = tile_sched.size(0);
  auto lse = at::empty({batch, h_q, s_q}, q.options().dtype(at::kFloat));
  if (batch == 0) return lse;
  // Split workspaces: a part shares at most one request with the next, so batch + num_parts splits at most.
  auto o_accum = at::empty({batch + num_parts, s_q * h_q, dso::kMlaHeadDimV}, q.options().dtype(at::kFloat));
  auto lse_accum = at::empty({batch + num_parts, s_q * h_q}, q.options().dtype(at::kFloat));
  dso::MlaDecodeArgs args{};
  args.q = q.data_ptr();
  args.kv_cache = kv_cache.data_ptr();
  args.block_table = block_table.data_ptr<int>();
  args.cache_seqlens = cache_seqlens.data_ptr<int>();
  args.tile_sched = tile_sched.data_ptr<int>();
  args.split_offsets = split_offsets.data_ptr<int>();
  args.out = out.data_ptr();
  args.lse = lse.data_ptr<float>();
  args.o_accum = o_accum.data_ptr<float>();
  args.lse_accum = lse_accum.data_ptr<float>();
  args.batch = static_cast<int>(batch);
  args.s_q = static_cast<int>(s_q);
  args.h_q = static_cast<int>(h_q);
  args.num_blocks = static_cast<int>(kv_cache.size(0));
  args.max_blocks = static_cast<int>(block_table.size(1));
  args.block_table_stride = static_cast<int>(block_table.stride(0));
  args.num_parts = static_cast<int>(num_parts);
  args.softmax_scale = static_cast<float>(softmax_scale);
  args.causal = causal;
  args.fp8_cache = kv_cache.scalar_type() == at::kByte;
  dso::launch_mla_decode(args, current_stream());
  return lse;
}

at::Tensor quantize_mla_kv_cuda(const at::Tensor& kv) {
  const c10::cuda::CUDAGuard guard(kv.device());
  auto sizes = kv.sizes().vec();
  sizes.back() = dso::kMlaFp8TokenBytes;
  auto packed = at::empty(sizes, kv.options().dtype(at::kByte));
  const int64_t num_tokens = kv.numel() / dso::kMlaHeadDimQK;
  if (num_tokens > 0) dso::launch_mla_quantize_kv(kv.data_ptr(), packed.data_ptr(), num_tokens, current_stream());
  return packed;
}

void mla_cache_append_cuda(at::Tensor& kv_cache, const at::Tensor& block_table, const at::Tensor& positions,
                           const at::Tensor& c_kv, const at::Tensor& k_pe) {
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const int64_t batch = c_kv.size(0), tokens_per_req = c_kv.size(1);
  if (batch * tokens_per_req == 0) return;
  dso::launch_mla_cache_append(kv_cache.data_ptr(), kv_cache.scalar_type() == at::kByte,
                               static_cast<int>(kv_cache.size(0)), block_table.data_ptr<int>(),
                               static_cast<int>(block_table.size(1)), static_cast<int>(block_table.stride(0)),
                               positions.data_ptr<int>(), c_kv.data_ptr(), k_pe.data_ptr(), static_cast<int>(batch),
                               static_cast<int>(tokens_per_req), current_stream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ep_dispatch_layout_cuda(const at::Tensor& topk_idx, int64_t num_experts,
                                                                        int64_t num_ranks) {
  const c10::cuda::CUDAGuard guard(topk_idx.device());
  const int64_t num_tokens = topk_idx.size(0);
  const auto int_options = topk_idx.options().dtype(at::kInt);
  auto num_tokens_per_rank = at::empty({num_ranks}, int_options);
  auto num_tokens_per_expert = at::empty({num_experts}, int_options);
  auto is_token_in_rank = at::empty({num_tokens, num_ranks}, topk_idx.options().dtype(at::kBool));
  dso::launch_ep_dispatch_layout(topk_idx.data_ptr<int64_t>(), num_tokens, static_cast<int>(topk_idx.size(1)),
                                 static_cast<int>(num_experts), static_cast<int>(num_ranks),
                                 num_tokens_per_rank.data_ptr<int>(), num_tokens_per_expert.data_ptr<int>(),
                                 is_token_in_rank.data_ptr<bool>(), current_stream());
  return {num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_permute_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& x_scales, const std::optional<at::Tensor>& topk_weights,
    const at::Tensor& topk_idx, int64_t num_experts, int64_t alignment, int64_t num_rows) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t num_tokens = topk_idx.size(0), topk = topk_idx.size(1);
  const int64_t num_groups = x_scales.has_value() ? x_scales->size(1) : 0;
  const auto int_options = x.options().dtype(at::kInt);
  const auto float_options = x.options().dtype(at::kFloat);
  auto recv_x = at::empty({num_rows, x.size(1)}, x.options());
  auto recv_scales = at::empty({num_rows, num_groups}, float_options);
  auto recv_weights = at::empty({topk_weights.has_value() ? num_rows : 0}, float_options);
  auto m_indices = at::empty({num_rows}, int_options);
  auto row_of = at::empty({num_tokens, topk}, int_options);
  auto num_tokens_per_expert = at::empty({num_experts}, int_options);
  auto workspace = at::empty({dso::ep_permute_workspace_ints(num_tokens, static_cast<int>(topk),
                                                             static_cast<int>(num_experts))}, int_options);
  dso::launch_ep_permute(x.data_ptr(), x.size(1) * x.element_size(),
                         x_scales.has_value() ? x_scales->data_ptr<float>() : nullptr, static_cast<int>(num_groups),
                         topk_weights.has_value() ? topk_weights->data_ptr<float>() : nullptr,
                         topk_idx.data_ptr<int64_t>(), num_tokens, static_cast<int>(topk),
                         static_cast<int>(num_experts), static_cast<int>(alignment), num_rows, recv_x.data_ptr(),
                         x_scales.has_value() ? recv_scales.data_ptr<float>() : nullptr,
                         topk_weights.has_value() ? recv_weights.data_ptr<float>() : nullptr, m_indices.data_ptr<int>(),
                         row_of.data_ptr<int>(), num_tokens_per_expert.data_ptr<int>(), workspace.data_ptr<int>(),
                         current_stream());
  return {recv_x, recv_scales, recv_weights, m_indices, row_of, num_tokens_per_expert};
}

at::Tensor ep_combine_cuda(const at::Tensor& y, const at::Tensor& row_of, const at::Tensor& topk_weights) {
  const c10::cuda::CUDAGuard guard(y.device());
  auto out = at::empty({row_of.size(0), y.size(1)}, y.options());
  dso::launch_ep_combine(y.data_ptr(), row_of.data_ptr<int>(), topk_weights.data_ptr<float>(), row_of.size(0),
                         static_cast<int>(row_of.size(1)), y.size(1), out.data_ptr(), current_stream());
  return out;
}

// ---- FP8 GEMMs -------------------------------------------------------------------------------

// a_scales [rows, k/128] (masked: [groups, rows, k/128]) in the M-major layout the GEMM kernels read,
// element (row, kb) at kb * ld + row with ld % 4 == 0 (what per_token_group_quant_fp8 writes with
// column_major_scales=True). Any other layout is first copied into it (one small extra kernel).
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

void fp8_gemm_out_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                       const at::Tensor& b_scales, const std::optional<at::Tensor>& c, at::Tensor& out) {
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
  dso::launch_sm90_fp8_gemm(p, current_stream());
}

at::Tensor fp8_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                         const at::Tensor& b_scales, at::ScalarType out_dtype, const std::optional<at::Tensor>& c) {
  auto out = at::empty({a.size(0), b.size(0)}, a.options().dtype(out_dtype));
  fp8_gemm_out_cuda(a, a_scales, b, b_scales, c, out);
  return out;
}

void grouped_fp8_gemm_contiguous_out_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                          const at::Tensor& b_scales, const at::Tensor& m_indices, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.size(0) == 0 || b.size(0) == 0 || b.size(1) == 0) return;
  const auto [sfa, sfa_ld] = gemm_m_major_scales(a_scales);
  const auto sfb = b_scales.contiguous();
  dso::Fp8GemmProblem p = gemm_problem(dso::GemmType::kGroupedContiguous, a, sfa, sfa_ld, b, sfb, out);
  p.m = a.size(0);
  p.m_indices = m_indices.data_ptr<int32_t>();
  dso::launch_sm90_fp8_gemm(p, current_stream());
}

at::Tensor grouped_fp8_gemm_contiguous_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                            const at::Tensor& b_scales, const at::Tensor& m_indices) {
  auto out = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kBFloat16));
  grouped_fp8_gemm_contiguous_out_cuda(a, a_scales, b, b_scales, m_indices, out);
  return out;
}

void grouped_fp8_gemm_masked_out_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                      const at::Tensor& b_scales, const at::Tensor& masked_m, int64_t expected_m,
                                      at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.size(0) == 0 || a.size(1) == 0 || b.size(1) == 0) return;
  const auto [sfa, sfa_ld] = gemm_m_major_scales(a_scales);
  const auto sfb = b_scales.contiguous();
  // Groups are flattened into rows, so each group's rows must directly follow the previous group's.
  const auto a_flat = a.contiguous();
  dso::Fp8GemmProblem p = gemm_problem(dso::GemmType::kGroupedMasked, a_flat, sfa, sfa_ld, b, sfb, out);
  p.m = a.size(1);
  p.masked_m = masked_m.data_ptr<int32_t>();
  p.expected_m = expected_m;
  dso::launch_sm90_fp8_gemm(p, current_stream());
}

at::Tensor grouped_fp8_gemm_masked_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                                        const at::Tensor& b_scales, const at::Tensor& masked_m, int64_t expected_m) {
  auto out = at::empty({a.size(0), a.size(1), b.size(1)}, a.options().dtype(at::kBFloat16));
  grouped_fp8_gemm_masked_out_cuda(a, a_scales, b, b_scales, masked_m, expected_m, out);
  return out;
}

at::Tensor ep_ipc_alloc_cuda(const at::Tensor& like, int64_t num_bytes) {
  const c10::cuda::CUDAGuard guard(like.device());
  void* ptr = dso::ep_ipc_malloc(num_bytes);
  return at::from_blob(ptr, {num_bytes}, [](void* p) { dso::ep_ipc_free(p); },
                       like.options().dtype(at::kByte));
}

at::Tensor ep_ipc_handle_cuda(const at::Tensor& buffer) {
  const c10::cuda::CUDAGuard guard(buffer.device());
  auto handle = at::empty({dso::kEpIpcHandleBytes}, at::TensorOptions().dtype(at::kByte));
  dso::ep_ipc_get_handle(buffer.data_ptr(), handle.data_ptr<uint8_t>());
  return handle;
}

at::Tensor ep_ipc_open_cuda(const at::Tensor& like, const at::Tensor& handle, int64_t num_bytes) {
  const c10::cuda::CUDAGuard guard(like.device());
  TORCH_CHECK(handle.numel() == dso::kEpIpcHandleBytes && handle.is_cpu(), "ep_ipc_open: a CPU handle of ",
              dso::kEpIpcHandleBytes, " bytes");
  void* ptr = dso::ep_ipc_open(handle.contiguous().data_ptr<uint8_t>());
  // Dropping the tensor closes the mapping.
  return at::from_blob(ptr, {num_bytes}, [](void* p) { dso::ep_ipc_close(p); }, like.options().dtype(at::kByte));
}

dso::EpIpcLayout ep_ipc_layout(at::IntArrayRef f) {
  TORCH_CHECK(f.size() == dso::kEpIpcLayoutFields, "ep ipc: layout has ", dso::kEpIpcLayoutFields, " offsets");
  return dso::EpIpcLayout{f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10]};
}

void ep_ipc_barrier_cuda(const at::Tensor& peer_ptrs, at::IntArrayRef layout, int64_t rank, int64_t timeout_ns,
                         const at::Tensor& error, int64_t step) {
  const c10::cuda::CUDAGuard guard(peer_ptrs.device());
  dso::launch_ep_ipc_barrier(peer_ptrs.data_ptr<int64_t>(), ep_ipc_layout(layout), static_cast<int>(rank),
                             static_cast<int>(peer_ptrs.size(0)), timeout_ns, error.data_ptr<int>(),
                             static_cast<int>(step), current_stream());
}

void ep_ipc_dispatch_send_cuda(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                               const at::Tensor& topk_idx, const at::Tensor& topk_weights, const at::Tensor& slot_of,
                               const at::Tensor& counts, const at::Tensor& peer_ptrs, at::IntArrayRef layout,
                               int64_t rank, int64_t num_local_experts, int64_t max_tokens, const at::Tensor& error) {
  const c10::cuda::CUDAGuard guard(x.device());
  dso::launch_ep_ipc_dispatch_send(
      x.data_ptr(), x.size(1) * x.element_size(), x_scales.has_value() ? x_scales->data_ptr<float>() : nullptr,
      x_scales.has_value() ? static_cast<int>(x_scales->size(1)) : 0, topk_idx.data_ptr<int64_t>(),
      topk_weights.data_ptr<float>(), static_cast<int>(topk_idx.size(1)), slot_of.data_ptr<int>(),
      counts.data_ptr<int>(), topk_idx.size(0), peer_ptrs.data_ptr<int64_t>(), ep_ipc_layout(layout),
      static_cast<int>(rank), static_cast<int>(peer_ptrs.size(0)), static_cast<int>(num_local_experts), max_tokens,
      error.data_ptr<int>(), current_stream());
}

void ep_ipc_dispatch_wait_cuda(const at::Tensor& peer_ptrs, at::IntArrayRef layout, int64_t rank, int64_t max_tokens,
                               int64_t topk, int64_t timeout_ns, const at::Tensor& error,
                               const at::Tensor& recv_counts) {
  const c10::cuda::CUDAGuard guard(peer_ptrs.device());
  dso::launch_ep_ipc_dispatch_wait(peer_ptrs.data_ptr<int64_t>(), ep_ipc_layout(layout), static_cast<int>(rank),
                                   static_cast<int>(peer_ptrs.size(0)), max_tokens, static_cast<int>(topk),
                                   timeout_ns, error.data_ptr<int>(), recv_counts.data_ptr<int>(), current_stream());
}

void ep_ipc_combine_send_cuda(const at::Tensor& y, const at::Tensor& recv_row_of, const at::Tensor& recv_counts,
                              const at::Tensor& peer_ptrs, at::IntArrayRef layout, int64_t rank, int64_t max_tokens,
                              const at::Tensor& error) {
  const c10::cuda::CUDAGuard guard(y.device());
  dso::launch_ep_ipc_combine_send(y.data_ptr(), y.size(1), recv_row_of.data_ptr<int>(),
                                  static_cast<int>(recv_row_of.size(1)), recv_counts.data_ptr<int>(),
                                  peer_ptrs.data_ptr<int64_t>(), ep_ipc_layout(layout), static_cast<int>(rank),
                                  static_cast<int>(peer_ptrs.size(0)), max_tokens, error.data_ptr<int>(),
                                  current_stream());
}

void ep_ipc_combine_wait_cuda(const at::Tensor& peer_ptrs, at::IntArrayRef layout, int64_t rank, int64_t timeout_ns,
                              const at::Tensor& error) {
  const c10::cuda::CUDAGuard guard(peer_ptrs.device());
  dso::launch_ep_ipc_combine_wait(peer_ptrs.data_ptr<int64_t>(), ep_ipc_layout(layout), static_cast<int>(rank),
                                  static_cast<int>(peer_ptrs.size(0)), timeout_ns, error.data_ptr<int>(),
                                  current_stream());
}

// [registration: cuda wrappers]

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_ops, CUDA, m) {
  m.impl("per_token_group_quant_fp8", &per_token_group_quant_fp8_cuda);
  m.impl("silu_mul_quant_fp8", &silu_mul_quant_fp8_cuda);
  m.impl("per_block_quant_fp8", &per_block_quant_fp8_cuda);
  m.impl("dequant_fp8_block", &dequant_fp8_block_cuda);
  m.impl("get_mla_metadata", &get_mla_metadata_cuda);
  m.impl("mla_decode", &mla_decode_cuda);
  m.impl("quantize_mla_kv", &quantize_mla_kv_cuda);
  m.impl("mla_cache_append", &mla_cache_append_cuda);
  m.impl("ep_dispatch_layout", &ep_dispatch_layout_cuda);
  m.impl("ep_permute", &ep_permute_cuda);
  m.impl("ep_combine", &ep_combine_cuda);
  m.impl("ep_ipc_alloc", &ep_ipc_alloc_cuda);
  m.impl("ep_ipc_handle", &ep_ipc_handle_cuda);
  m.impl("ep_ipc_open", &ep_ipc_open_cuda);
  m.impl("ep_ipc_barrier", &ep_ipc_barrier_cuda);
  m.impl("ep_ipc_dispatch_send", &ep_ipc_dispatch_send_cuda);
  m.impl("ep_ipc_dispatch_wait", &ep_ipc_dispatch_wait_cuda);
  m.impl("ep_ipc_combine_send", &ep_ipc_combine_send_cuda);
  m.impl("ep_ipc_combine_wait", &ep_ipc_combine_wait_cuda);
  m.impl("fp8_gemm", &fp8_gemm_cuda);
  m.impl("fp8_gemm_out", &fp8_gemm_out_cuda);
  m.impl("grouped_fp8_gemm_contiguous", &grouped_fp8_gemm_contiguous_cuda);
  m.impl("grouped_fp8_gemm_contiguous_out", &grouped_fp8_gemm_contiguous_out_cuda);
  m.impl("grouped_fp8_gemm_masked", &grouped_fp8_gemm_masked_cuda);
  m.impl("grouped_fp8_gemm_masked_out", &grouped_fp8_gemm_masked_out_cuda);
  // [registration: cuda impls]
}
#endif  // DSO_WITH_CUDA

// Importing deepseek_ops._C runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
