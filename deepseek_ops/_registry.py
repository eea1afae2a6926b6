"""Attaches the Python-side kernels to the schemas defined in csrc/registration.cpp."""
import torch

from deepseek_ops._extension import cuda_kernels_built, missing_cuda_kernel


def register_op(name: str, reference, fake):
    """CPU kernel = the reference implementation; Meta/fake kernel = shape function.

    In an extension built without CUDA, the CUDA kernel is one that says so and raises.
    """
    qualname = f"deepseek_ops::{name}"
    torch.library.impl(qualname, "CPU")(reference)
    torch.library.register_fake(qualname)(fake)
    if not cuda_kernels_built():
        torch.library.impl(qualname, "CUDA")(missing_cuda_kernel(name))
