// CUDA adapters of the MLA ops (schemas in registration.cpp; kernels in sm90_mla_decode.cu and
// sm90_mla_cache.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "sm90_mla_cache.h"
#include "sm90_mla_decode.h"
#include "torch_utils.h"

namespace {

// The paged cache: bf16 [num_blocks, 64, 1, 576] or packed FP8 uint8 [num_blocks, 64, 1, 656], dense.
void check_cache(const char* op, const at::Tensor& kv_cache, const at::Device& device) {
  const bool fp8 = kv_cache.scalar_type() == at::kByte;
  dso::check_operand(op, "kv_cache", kv_cache, device, fp8 ? at::kByte : at::kBFloat16,
                     {-1, dso::kMlaPageSize, 1, fp8 ? dso::kMlaFp8TokenBytes : dso::kMlaHeadDimQK});
  dso::check_dense16(op, "kv_cache", kv_cache);
}

// block_table int32 [batch, max_blocks]: rows may be strided (block_table_stride), columns may not.
void check_block_table(const char* op, const at::Tensor& block_table, const at::Device& device, int64_t batch) {
  dso::check_operand(op, "block_table", block_table, device, at::kInt, {batch, -1});
  TORCH_CHECK(block_table.size(1) <= 1 || block_table.stride(1) == 1, op, ": block_table columns must be dense");
  TORCH_CHECK(block_table.size(0) <= 1 || block_table.stride(0) >= block_table.size(1), op,
              ": block_table rows overlap");
}

std::tuple<at::Tensor, at::Tensor> get_mla_metadata_cuda(const at::Tensor& cache_seqlens, int64_t num_sm_parts) {
  constexpr const char* op = "get_mla_metadata";
  TORCH_CHECK(cache_seqlens.is_cuda(), op, ": cache_seqlens must be a CUDA tensor");
  dso::check_operand(op, "cache_seqlens", cache_seqlens, cache_seqlens.device(), at::kInt, {-1});
  TORCH_CHECK(cache_seqlens.is_contiguous(), op, ": cache_seqlens must be contiguous");
  TORCH_CHECK(num_sm_parts > 0, op, ": num_sm_parts must be positive, got ", num_sm_parts);
  const c10::cuda::CUDAGuard guard(cache_seqlens.device());
  const int64_t batch = cache_seqlens.size(0);
  auto opts = cache_seqlens.options().dtype(at::kInt);
  auto tile_sched = at::empty({num_sm_parts, dso::kMlaSchedCols}, opts);
  auto split_offsets = at::empty({batch + 1}, opts);
  dso::launch_mla_metadata(cache_seqlens.data_ptr<int>(), static_cast<int>(batch), static_cast<int>(num_sm_parts),
                           tile_sched.data_ptr<int>(), split_offsets.data_ptr<int>(), dso::current_stream());
  return {tile_sched, split_offsets};
}

at::Tensor mla_decode_cuda(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                           const at::Tensor& cache_seqlens, double softmax_scale, bool causal,
                           const at::Tensor& tile_sched, const at::Tensor& split_offsets, at::Tensor& out) {
  constexpr const char* op = "mla_decode";
  const at::Device dev = q.device();
  TORCH_CHECK(dev.is_cuda(), op, ": q must be a CUDA tensor, got ", dev);
  dso::check_operand(op, "q", q, dev, at::kBFloat16, {-1, -1, -1, dso::kMlaHeadDimQK});
  dso::check_dense16(op, "q", q);
  const int64_t b = q.size(0);
  TORCH_CHECK(q.size(1) >= 1 && q.size(2) >= 1, op, ": q needs s_q >= 1 and h_q >= 1, got shape ", q.sizes());
  check_cache(op, kv_cache, dev);
  check_block_table(op, block_table, dev, b);
  dso::check_operand(op, "cache_seqlens", cache_seqlens, dev, at::kInt, {b});
  TORCH_CHECK(cache_seqlens.is_contiguous(), op, ": cache_seqlens must be contiguous");
  dso::check_operand(op, "tile_sched", tile_sched, dev, at::kInt, {-1, dso::kMlaSchedCols});
  TORCH_CHECK(tile_sched.is_contiguous() && tile_sched.size(0) >= 1, op, ": tile_sched must be contiguous, >= 1 row");
  dso::check_operand(op, "split_offsets", split_offsets, dev, at::kInt, {b + 1});
  TORCH_CHECK(split_offsets.is_contiguous(), op, ": split_offsets must be contiguous");
  dso::check_operand(op, "out", out, dev, at::kBFloat16, {b, q.size(1), q.size(2), dso::kMlaHeadDimV});
  dso::check_dense16(op, "out", out);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0), s_q = q.size(1), h_q = q.size(2), num_parts = tile_sched.size(0);
  auto lse = at::empty({batch, h_q, s_q}, q.options().dtype(at::kFloat));
  if (batch == 0) return lse;
  const int64_t num_split_rows = dso::mla_num_split_rows(batch, num_parts);
  auto o_accum = at::empty({num_split_rows, s_q * h_q, dso::kMlaHeadDimV}, q.options().dtype(at::kFloat));
  auto lse_accum = at::empty({num_split_rows, s_q * h_q}, q.options().dtype(at::kFloat));
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
  dso::launch_mla_decode(args, dso::current_stream());
  return lse;
}

at::Tensor quantize_mla_kv_cuda(const at::Tensor& kv) {
  constexpr const char* op = "quantize_mla_kv";
  TORCH_CHECK(kv.scalar_type() == at::kBFloat16, op, ": kv must be bfloat16, got ", kv.scalar_type());
  TORCH_CHECK(kv.dim() >= 1 && kv.size(-1) == dso::kMlaHeadDimQK, op, ": kv's last dim must be ",
              dso::kMlaHeadDimQK, ", got shape ", kv.sizes());
  dso::check_dense16(op, "kv", kv);
  const c10::cuda::CUDAGuard guard(kv.device());
  auto sizes = kv.sizes().vec();
  sizes.back() = dso::kMlaFp8TokenBytes;
  auto packed = at::empty(sizes, kv.options().dtype(at::kByte));
  const int64_t num_tokens = kv.numel() / dso::kMlaHeadDimQK;
  if (num_tokens > 0) dso::launch_mla_quantize_kv(kv.data_ptr(), packed.data_ptr(), num_tokens, dso::current_stream());
  return packed;
}

void mla_cache_append_cuda(at::Tensor& kv_cache, const at::Tensor& block_table, const at::Tensor& positions,
                           const at::Tensor& c_kv, const at::Tensor& k_pe) {
  constexpr const char* op = "mla_cache_append";
  const at::Device dev = kv_cache.device();
  TORCH_CHECK(dev.is_cuda(), op, ": kv_cache must be a CUDA tensor, got ", dev);
  check_cache(op, kv_cache, dev);
  dso::check_operand(op, "c_kv", c_kv, dev, at::kBFloat16, {-1, -1, dso::kMlaHeadDimV});
  dso::check_dense16(op, "c_kv", c_kv);
  const int64_t batch = c_kv.size(0), tokens_per_req = c_kv.size(1);
  dso::check_operand(op, "k_pe", k_pe, dev, at::kBFloat16,
                     {batch, tokens_per_req, dso::kMlaHeadDimQK - dso::kMlaHeadDimV});
  dso::check_dense16(op, "k_pe", k_pe);
  dso::check_operand(op, "positions", positions, dev, at::kInt, {batch, tokens_per_req});
  TORCH_CHECK(positions.is_contiguous(), op, ": positions must be contiguous");
  check_block_table(op, block_table, dev, batch);
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  if (batch * tokens_per_req == 0) return;
  dso::launch_mla_cache_append(kv_cache.data_ptr(), kv_cache.scalar_type() == at::kByte,
                               static_cast<int>(kv_cache.size(0)), block_table.data_ptr<int>(),
                               static_cast<int>(block_table.size(1)), static_cast<int>(block_table.stride(0)),
                               positions.data_ptr<int>(), c_kv.data_ptr(), k_pe.data_ptr(), static_cast<int>(batch),
                               static_cast<int>(tokens_per_req), dso::current_stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_ops, CUDA, m) {
  m.impl("get_mla_metadata", &get_mla_metadata_cuda);
  m.impl("mla_decode", &mla_decode_cuda);
  m.impl("quantize_mla_kv", &quantize_mla_kv_cuda);
  m.impl("mla_cache_append", &mla_cache_append_cuda);
}
