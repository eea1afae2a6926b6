// Launchers of the dgrad GEMMs' operand kernels (csrc/sm90_fp8_dgrad.cu).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace dso {

// in [num_groups, rows, cols] e4m3 -> out [num_groups, cols, rows], both contiguous and 16-byte aligned;
// rows and cols multiples of 128.
void launch_transpose_fp8(const void* in, void* out, int64_t num_groups, int64_t rows, int64_t cols,
                          cudaStream_t stream);

// Zeroes the rows of out [num_rows, row_bytes] (row_bytes a multiple of 16, 16-byte aligned) that the
// contiguous grouped GEMM leaves unwritten for m_indices [num_rows] and num_groups groups.
void launch_zero_ungrouped_rows(const int32_t* m_indices, int64_t num_rows, int64_t num_groups, void* out,
                                int64_t row_bytes, cudaStream_t stream);

}  // namespace dso
