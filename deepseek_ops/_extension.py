"""Loads the compiled extension (it defines every op schema) and reports how it was built."""
import warnings

import torch

try:
    from deepseek_ops import _C
except ImportError as exc:
    raise ImportError(
        "deepseek_ops._C is not built. From the repository root run "
        "`pip install --no-build-isolation -e .` (it compiles the CUDA kernels when a CUDA "
        "toolkit is found and the reference-only extension otherwise)."
    ) from exc


def cuda_kernels_built() -> bool:
    """True when deepseek_ops._C was compiled with its CUDA kernels."""
    return bool(torch.ops.deepseek_ops.built_with_cuda())


def build_summary() -> str:
    if cuda_kernels_built():
        return f"built with CUDA kernels for sm_90a ({_C.__file__})"
    return f"built without CUDA ({_C.__file__}): reference kernels only"


_warned = False


def missing_cuda_kernel(op_name: str):
    """The CUDA kernel of an op in an extension built without CUDA: warns once, then raises."""

    def kernel(*args, **kwargs):
        global _warned
        message = (f"deepseek_ops::{op_name} has no CUDA kernel in this install ({build_summary()}). "
                   "Reinstall with a CUDA toolkit (nvcc) and a CUDA build of torch.")
        if not _warned:
            warnings.warn(message, stacklevel=3)
            _warned = True
        raise RuntimeError(message)

    return kernel
