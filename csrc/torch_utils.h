// Torch-side helpers shared by the CUDA adapters (csrc/torch_<family>.cpp), which turn tensors into
// the pointers, sizes and stream of the torch-free launchers.
#pragma once
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace dso {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace dso
