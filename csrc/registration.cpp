// Every deepseek_ops schema, in one TORCH_LIBRARY block. The kernels behind them register
// elsewhere: CPU = the reference implementations (deepseek_ops/reference.py) and Meta = the shape
// functions, both from Python; CUDA = the adapters in csrc/torch_<family>.cpp (CUDA builds only),
// which translate tensors into the pointers, sizes and stream of the torch-free launchers.
//
// What a caller gets:
// - Through the public functions (deepseek_ops.fp8_gemm, ...): every argument validated before any
//   kernel runs (one checker per op, built on deepseek_ops/_checks.py), with errors that name the
//   argument, the expected and the actual value.
// - Calling torch.ops.deepseek_ops.* directly: memory safety only. The rule for every adapter: it
//   checks (TORCH_CHECK) or establishes (a copy into the layout its kernel reads) whatever keeps each
//   access inside the tensors it was given: devices, dtypes, the sizes and strides it indexes with,
//   16-byte alignment. It does not check values (the kernels clamp or skip bad indices, never
//   reading past a buffer) and does not repeat the public functions' messages.
#include <Python.h>
#include <torch/library.h>

#include <vector>

#ifdef DSO_WITH_CUDA
#include "sm90_fp8_gemm_variants.h"
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
// size) per variant (gemm type: 0 dense, 1 contiguous grouped, 2 masked grouped, 3 weight gradient, 4
// k-grouped weight gradient); empty without CUDA.
std::vector<int64_t> fp8_gemm_tile_configs() {
  std::vector<int64_t> configs;
#ifdef DSO_WITH_CUDA
  for (const dso::GemmType type :
       {dso::GemmType::kNormal, dso::GemmType::kGroupedContiguous, dso::GemmType::kGroupedMasked,
        dso::GemmType::kWgrad, dso::GemmType::kKGroupedWgrad}) {
    for (const bool out_fp32 : {false, true}) {
      auto add = [&](int block_m, int block_n, int cluster) {
        if (dso::gemm::variant_instantiated(type, out_fp32, block_m, block_n, cluster)) {
          configs.insert(configs.end(), {static_cast<int>(type), out_fp32, block_m, block_n, cluster});
        }
      };
      if (dso::is_wgrad(type)) {
        for (const int block_n : dso::gemm::kWgrad64BlockNs) add(64, block_n, 1);
        for (const int block_n : dso::gemm::kWgradBlockNs) add(128, block_n, 1);
      } else {
        for (const int block_m : {64, 128}) {
          for (const int block_n : dso::gemm::kBlockNs) add(block_m, block_n, 1);
        }
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
  // FP8 training (backward): operands quantized 1x128 along the token axis for the weight gradient;
  // dgrad reads the forward's FP8 weight [N, K] with its 128x128 block scales; the SwiGLU backward
  // writes both quantized operands of the gate/up projection's backward.
  m.def("transpose_quant_fp8(Tensor x) -> (Tensor, Tensor)");
  m.def("swiglu_backward_quant_fp8(Tensor dact, Tensor h, bool transposed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fp8_gemm_wgrad(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor? c) -> Tensor");
  m.def("k_grouped_fp8_gemm_wgrad(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor group_offsets,"
        " Tensor? c) -> Tensor");
  // The same into out; c may be out itself (accumulate in place).
  m.def("fp8_gemm_wgrad_out(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor? c, Tensor(a!) out) -> ()");
  m.def("k_grouped_fp8_gemm_wgrad_out(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor group_offsets,"
        " Tensor? c, Tensor(a!) out) -> ()");
  m.def("fp8_gemm_dgrad(Tensor dy, Tensor dy_scales, Tensor w, Tensor w_scales, ScalarType out_dtype) -> Tensor");
  m.def("grouped_fp8_gemm_dgrad_contiguous(Tensor dy, Tensor dy_scales, Tensor w, Tensor w_scales,"
        " Tensor m_indices) -> Tensor");
}

// Importing deepseek_ops._C runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
