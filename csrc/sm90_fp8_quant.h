// Launchers of the FP8 quantization kernels (csrc/sm90_fp8_quant.cu).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace dso {

enum class FloatKind { kBF16, kFP16, kFP32 };

// x [m, k] contiguous -> x_fp8 [m, k] e4m3 and scales[row * scale_stride_m + group * scale_stride_g].
void launch_per_token_group_quant_fp8(const void* x, FloatKind x_kind, void* x_fp8, float* scales, int64_t m,
                                      int64_t k, int64_t group_size, bool ue8m0, int64_t scale_stride_m,
                                      int64_t scale_stride_g, cudaStream_t stream);

// h [m, 2 k] contiguous (gate | up), k % 128 == 0 -> act_fp8 [m, k] e4m3 and its 1 x 128 scales (strided
// as above): the quantization of act = silu(gate) * up, rounded to h's type first.
void launch_silu_mul_quant_fp8(const void* h, FloatKind h_kind, void* act_fp8, float* scales, int64_t m, int64_t k,
                               bool ue8m0, int64_t scale_stride_m, int64_t scale_stride_g, cudaStream_t stream);

// w [n, k] contiguous, k % 128 == 0 -> w_fp8 [n, k] e4m3 and scales [ceil(n / 128), k / 128].
void launch_per_block_quant_fp8(const void* w, FloatKind w_kind, void* w_fp8, float* scales, int64_t n, int64_t k,
                                int64_t block_size, bool ue8m0, cudaStream_t stream);

// w_fp8 [n, k] e4m3 * scales [ceil(n / 128), scale_cols] -> out [n, k]; k % 16 == 0.
void launch_dequant_fp8_block(const void* w_fp8, const float* scales, void* out, FloatKind out_kind, int64_t n,
                              int64_t k, int64_t block_size, int64_t scale_cols, cudaStream_t stream);

}  // namespace dso
