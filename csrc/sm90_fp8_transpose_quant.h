// Launcher of the transpose-quantization kernel (csrc/sm90_fp8_transpose_quant.cu).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "sm90_fp8_quant.h"

namespace dso {

// x [num_tokens, num_channels] contiguous, 16-byte aligned -> x_t [num_channels, t_pad] e4m3 and scales
// [num_channels, t_pad / 128] fp32, t_pad = num_tokens rounded up to 128 (padding tokens quantize as zeros):
// one scale per 1 x 128 token group of each channel.
void launch_transpose_quant_fp8(const void* x, FloatKind x_kind, void* x_t, float* scales, int64_t num_tokens,
                                int64_t num_channels, cudaStream_t stream);

}  // namespace dso
