// CUDA adapters of the expert-parallel ops (schemas in registration.cpp; kernels in
// sm90_ep_permute.cu (one GPU) and sm90_ep_ipc_exchange.cu (CUDA IPC within a node)).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "sm90_ep_ipc_exchange.h"
#include "sm90_ep_permute.h"
#include "torch_utils.h"

namespace {

constexpr int64_t kMaxExperts = 4096;  // the kernels count per expert in shared memory (deepseek_ops/ep)
constexpr int64_t kMaxTopk = 32;  // and keep a token's pairs there

// topk_idx int64 [T, topk], dense; and the expert count the kernels size their shared memory by.
void check_routing(const char* op, const at::Tensor& topk_idx, int64_t num_experts) {
  TORCH_CHECK(topk_idx.is_cuda(), op, ": topk_idx must be a CUDA tensor");
  dso::check_operand(op, "topk_idx", topk_idx, topk_idx.device(), at::kLong, {-1, -1});
  TORCH_CHECK(topk_idx.is_contiguous(), op, ": topk_idx must be contiguous");
  TORCH_CHECK(num_experts > 0 && num_experts <= kMaxExperts, op, ": num_experts must be in [1, ", kMaxExperts,
              "], got ", num_experts);
  TORCH_CHECK(topk_idx.size(1) <= kMaxTopk, op, ": at most ", kMaxTopk, " experts per token, got ", topk_idx.size(1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ep_dispatch_layout_cuda(const at::Tensor& topk_idx, int64_t num_experts,
                                                                        int64_t num_ranks) {
  check_routing("ep_dispatch_layout", topk_idx, num_experts);
  TORCH_CHECK(num_ranks > 0, "ep_dispatch_layout: num_ranks must be positive, got ", num_ranks);
  const c10::cuda::CUDAGuard guard(topk_idx.device());
  const int64_t num_tokens = topk_idx.size(0);
  const auto int_options = topk_idx.options().dtype(at::kInt);
  auto num_tokens_per_rank = at::empty({num_ranks}, int_options);
  auto num_tokens_per_expert = at::empty({num_experts}, int_options);
  auto is_token_in_rank = at::empty({num_tokens, num_ranks}, topk_idx.options().dtype(at::kBool));
  dso::launch_ep_dispatch_layout(topk_idx.data_ptr<int64_t>(), num_tokens, static_cast<int>(topk_idx.size(1)),
                                 static_cast<int>(num_experts), static_cast<int>(num_ranks),
                                 num_tokens_per_rank.data_ptr<int>(), num_tokens_per_expert.data_ptr<int>(),
                                 is_token_in_rank.data_ptr<bool>(), dso::current_stream());
  return {num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_permute_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& x_scales, const std::optional<at::Tensor>& topk_weights,
    const at::Tensor& topk_idx, int64_t num_experts, int64_t alignment, int64_t num_rows) {
  constexpr const char* op = "ep_permute";
  check_routing(op, topk_idx, num_experts);
  const at::Device dev = topk_idx.device();
  const int64_t tokens = topk_idx.size(0), topk_size = topk_idx.size(1);
  TORCH_CHECK(x.device() == dev && x.dim() == 2 && x.size(0) == tokens, op, ": x must be [", tokens,
              ", H] on ", dev, ", got shape ", x.sizes(), " on ", x.device());
  TORCH_CHECK(x.size(1) * x.element_size() % 16 == 0, op, ": x's rows must be a multiple of 16 bytes");
  dso::check_dense16(op, "x", x);
  if (x_scales.has_value()) {
    dso::check_operand(op, "x_scales", *x_scales, dev, at::kFloat, {tokens, -1});
    TORCH_CHECK(x_scales->is_contiguous(), op, ": x_scales must be contiguous");
  }
  if (topk_weights.has_value()) {
    dso::check_operand(op, "topk_weights", *topk_weights, dev, at::kFloat, {tokens, topk_size});
    TORCH_CHECK(topk_weights->is_contiguous(), op, ": topk_weights must be contiguous");
  }
  TORCH_CHECK(alignment > 0, op, ": alignment must be positive, got ", alignment);
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
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
                         dso::current_stream());
  return {recv_x, recv_scales, recv_weights, m_indices, row_of, num_tokens_per_expert};
}

at::Tensor ep_combine_cuda(const at::Tensor& y, const at::Tensor& row_of, const at::Tensor& topk_weights) {
  constexpr const char* op = "ep_combine";
  TORCH_CHECK(y.is_cuda(), op, ": y must be a CUDA tensor");
  dso::check_operand(op, "y", y, y.device(), at::kBFloat16, {-1, -1});
  TORCH_CHECK(y.size(1) % 8 == 0, op, ": y's hidden size must be a multiple of 8, got ", y.size(1));
  dso::check_dense16(op, "y", y);
  dso::check_operand(op, "row_of", row_of, y.device(), at::kInt, {-1, -1});
  TORCH_CHECK(row_of.is_contiguous(), op, ": row_of must be contiguous");
  TORCH_CHECK(row_of.size(1) <= kMaxTopk, op, ": at most ", kMaxTopk, " pairs per token, got ", row_of.size(1));
  dso::check_operand(op, "topk_weights", topk_weights, y.device(), at::kFloat, {row_of.size(0), row_of.size(1)});
  TORCH_CHECK(topk_weights.is_contiguous(), op, ": topk_weights must be contiguous");
  const c10::cuda::CUDAGuard guard(y.device());
  auto out = at::empty({row_of.size(0), y.size(1)}, y.options());
  dso::launch_ep_combine(y.data_ptr(), y.size(0), row_of.data_ptr<int>(), topk_weights.data_ptr<float>(),
                         row_of.size(0), static_cast<int>(row_of.size(1)), y.size(1), out.data_ptr(),
                         dso::current_stream());
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

// The peers' buffer addresses int64 [world_size] and the error flag int32 [1], on the device. NOTE: the
// ipc ops write into peers' buffers at the offsets of `layout`, which no check here can validate: they
// are internal to deepseek_ops.ep.Buffer (its ranks agree on the layout before any buffer is shared).
void check_ipc_state(const char* op, const at::Tensor& peer_ptrs, const at::Tensor& error, int64_t rank) {
  TORCH_CHECK(peer_ptrs.is_cuda(), op, ": peer_ptrs must be a CUDA tensor");
  dso::check_operand(op, "peer_ptrs", peer_ptrs, peer_ptrs.device(), at::kLong, {-1});
  TORCH_CHECK(peer_ptrs.is_contiguous(), op, ": peer_ptrs must be contiguous");
  TORCH_CHECK(rank >= 0 && rank < peer_ptrs.size(0), op, ": rank ", rank, " out of [0, ", peer_ptrs.size(0), ")");
  dso::check_operand(op, "error", error, peer_ptrs.device(), at::kInt, {1});
}

dso::EpIpcLayout ep_ipc_layout(at::IntArrayRef f) {
  TORCH_CHECK(f.size() == dso::kEpIpcLayoutFields, "ep ipc: layout has ", dso::kEpIpcLayoutFields, " offsets");
  return dso::EpIpcLayout{f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10]};
}

void ep_ipc_barrier_cuda(const at::Tensor& peer_ptrs, at::IntArrayRef layout, int64_t rank, int64_t timeout_ns,
                         const at::Tensor& error, int64_t step) {
  check_ipc_state("ep_ipc_barrier", peer_ptrs, error, rank);
  const c10::cuda::CUDAGuard guard(peer_ptrs.device());
  dso::launch_ep_ipc_barrier(peer_ptrs.data_ptr<int64_t>(), ep_ipc_layout(layout), static_cast<int>(rank),
                             static_cast<int>(peer_ptrs.size(0)), timeout_ns, error.data_ptr<int>(),
                             static_cast<int>(step), dso::current_stream());
}

void ep_ipc_dispatch_send_cuda(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                               const at::Tensor& topk_idx, const at::Tensor& topk_weights, const at::Tensor& slot_of,
                               const at::Tensor& counts, const at::Tensor& peer_ptrs, at::IntArrayRef layout,
                               int64_t rank, int64_t num_local_experts, int64_t max_tokens, const at::Tensor& error) {
  constexpr const char* op = "ep_ipc_dispatch_send";
  check_ipc_state(op, peer_ptrs, error, rank);
  const at::Device dev = peer_ptrs.device();
  const int64_t world = peer_ptrs.size(0);
  dso::check_operand(op, "topk_idx", topk_idx, dev, at::kLong, {-1, -1});
  const int64_t tokens = topk_idx.size(0), topk_size = topk_idx.size(1);
  TORCH_CHECK(tokens <= max_tokens, op, ": ", tokens, " tokens, the buffer holds ", max_tokens);
  TORCH_CHECK(x.device() == dev && x.dim() == 2 && x.size(0) == tokens, op, ": x must be [", tokens, ", H] on ", dev);
  dso::check_dense16(op, "x", x);
  if (x_scales.has_value()) {
    dso::check_operand(op, "x_scales", *x_scales, dev, at::kFloat, {tokens, -1});
    TORCH_CHECK(x_scales->is_contiguous(), op, ": x_scales must be contiguous");
  }
  dso::check_operand(op, "topk_weights", topk_weights, dev, at::kFloat, {tokens, topk_size});
  dso::check_operand(op, "slot_of", slot_of, dev, at::kInt, {tokens, world});
  dso::check_operand(op, "counts", counts, dev, at::kInt, {world});
  TORCH_CHECK(topk_idx.is_contiguous() && topk_weights.is_contiguous() && slot_of.is_contiguous() &&
              counts.is_contiguous(), op, ": topk_idx, topk_weights, slot_of and counts must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  dso::launch_ep_ipc_dispatch_send(
      x.data_ptr(), x.size(1) * x.element_size(), x_scales.has_value() ? x_scales->data_ptr<float>() : nullptr,
      x_scales.has_value() ? static_cast<int>(x_scales->size(1)) : 0, topk_idx.data_ptr<int64_t>(),
      topk_weights.data_ptr<float>(), static_cast<int>(topk_idx.size(1)), slot_of.data_ptr<int>(),
      counts.data_ptr<int>(), topk_idx.size(0), peer_ptrs.data_ptr<int64_t>(), ep_ipc_layout(layout),
      static_cast<int>(rank), static_cast<int>(peer_ptrs.size(0)), static_cast<int>(num_local_experts), max_tokens,
      error.data_ptr<int>(), dso::current_stream());
}

void ep_ipc_dispatch_wait_cuda(const at::Tensor& peer_ptrs, at::IntArrayRef layout, int64_t rank, int64_t max_tokens,
                               int64_t topk, int64_t timeout_ns, const at::Tensor& error,
                               const at::Tensor& recv_counts) {
  check_ipc_state("ep_ipc_dispatch_wait", peer_ptrs, error, rank);
  dso::check_operand("ep_ipc_dispatch_wait", "recv_counts", recv_counts, peer_ptrs.device(), at::kInt,
                     {peer_ptrs.size(0)});
  const c10::cuda::CUDAGuard guard(peer_ptrs.device());
  dso::launch_ep_ipc_dispatch_wait(peer_ptrs.data_ptr<int64_t>(), ep_ipc_layout(layout), static_cast<int>(rank),
                                   static_cast<int>(peer_ptrs.size(0)), max_tokens, static_cast<int>(topk),
                                   timeout_ns, error.data_ptr<int>(), recv_counts.data_ptr<int>(), dso::current_stream());
}

void ep_ipc_combine_send_cuda(const at::Tensor& y, const at::Tensor& recv_row_of, const at::Tensor& recv_counts,
                              const at::Tensor& peer_ptrs, at::IntArrayRef layout, int64_t rank, int64_t max_tokens,
                              const at::Tensor& error) {
  constexpr const char* op = "ep_ipc_combine_send";
  check_ipc_state(op, peer_ptrs, error, rank);
  const at::Device dev = peer_ptrs.device();
  dso::check_operand(op, "y", y, dev, at::kBFloat16, {-1, -1});
  dso::check_dense16(op, "y", y);
  dso::check_operand(op, "recv_row_of", recv_row_of, dev, at::kInt, {peer_ptrs.size(0) * max_tokens, -1});
  TORCH_CHECK(recv_row_of.is_contiguous(), op, ": recv_row_of must be contiguous");
  dso::check_operand(op, "recv_counts", recv_counts, dev, at::kInt, {peer_ptrs.size(0)});
  const c10::cuda::CUDAGuard guard(y.device());
  dso::launch_ep_ipc_combine_send(y.data_ptr(), y.size(1), recv_row_of.data_ptr<int>(),
                                  static_cast<int>(recv_row_of.size(1)), recv_counts.data_ptr<int>(),
                                  peer_ptrs.data_ptr<int64_t>(), ep_ipc_layout(layout), static_cast<int>(rank),
                                  static_cast<int>(peer_ptrs.size(0)), max_tokens, error.data_ptr<int>(),
                                  dso::current_stream());
}

void ep_ipc_combine_wait_cuda(const at::Tensor& peer_ptrs, at::IntArrayRef layout, int64_t rank, int64_t timeout_ns,
                              const at::Tensor& error) {
  check_ipc_state("ep_ipc_combine_wait", peer_ptrs, error, rank);
  const c10::cuda::CUDAGuard guard(peer_ptrs.device());
  dso::launch_ep_ipc_combine_wait(peer_ptrs.data_ptr<int64_t>(), ep_ipc_layout(layout), static_cast<int>(rank),
                                  static_cast<int>(peer_ptrs.size(0)), timeout_ns, error.data_ptr<int>(),
                                  dso::current_stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_ops, CUDA, m) {
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
}
