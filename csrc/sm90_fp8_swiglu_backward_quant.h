// Launcher of the SwiGLU backward quantization kernel (csrc/sm90_fp8_swiglu_backward_quant.cu).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "sm90_fp8_quant.h"

namespace dso {

// dact [m, k] and h [m, 2 k] (gate | up) contiguous, 16-byte aligned, of one float kind, k % 128 == 0, m > 0.
// dh = [dgate | dup] [m, 2 k] rounded to that kind (never written) ->
//   dh_fp8 [m, 2 k] e4m3 and dh_scales [m, 2 k / 128]: one scale per 1 x 128 group along channels;
//   if transposed, dh_t [2 k, t_pad] e4m3 and dh_t_scales [2 k, t_pad / 128], t_pad = m rounded up to 128:
//   one scale per 1 x 128 group along tokens (padding tokens quantize as zeros).
void launch_swiglu_backward_quant_fp8(const void* dact, const void* h, FloatKind kind, void* dh_fp8, float* dh_scales,
                                      void* dh_t, float* dh_t_scales, int64_t m, int64_t k, bool transposed,
                                      cudaStream_t stream);

}  // namespace dso
