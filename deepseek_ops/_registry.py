"""Attaches the Python-side kernels to the schemas defined in csrc/registration.cpp."""
import torch

from deepseek_ops._extension import cuda_kernels_built, missing_cuda_kernel


def _meta(arg):
    return arg.to("meta") if isinstance(arg, torch.Tensor) else arg


def register_op(name: str, reference, fake):
    """CPU kernel = the reference implementation, after the fake kernel's shape checks (run on meta
    copies of the arguments: no data is touched); Meta/fake kernel = shape function.

    In an extension built without CUDA, the CUDA kernel is one that says so and raises.
    """
    qualname = f"deepseek_ops::{name}"

    def cpu_kernel(*args, **kwargs):
        fake(*map(_meta, args), **{k: _meta(v) for k, v in kwargs.items()})
        return reference(*args, **kwargs)

    torch.library.impl(qualname, "CPU")(cpu_kernel)
    torch.library.register_fake(qualname)(fake)
    if not cuda_kernels_built():
        torch.library.impl(qualname, "CUDA")(missing_cuda_kernel(name))
