"""Argument checks shared by every public op.

Each public function in deepseek_ops validates its arguments here, once, before dispatch, so a
bad call fails the same way on CPU, CUDA and under torch.compile, and never reaches a kernel.
Messages name the argument, what was expected and what was given.
"""
from typing import Iterable, Optional, Sequence, Union

import torch

FP8 = torch.float8_e4m3fn
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _fail(name: str, what: str, expected, actual):
    raise ValueError(f"argument '{name}': expected {what} {expected}, got {actual}")


def check_tensor(name: str, t, *, dtype: Union[torch.dtype, Sequence[torch.dtype], None] = None,
                 ndim: Optional[int] = None, device: Optional[torch.device] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _fail(name, "a", "torch.Tensor", type(t).__name__)
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            _fail(name, "dtype", " or ".join(str(d) for d in allowed), t.dtype)
    if ndim is not None and t.dim() != ndim:
        _fail(name, "rank", f"{ndim} (a {ndim}-D tensor)", f"shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        _fail(name, "device", f"{device} (the device of the other inputs)", t.device)
    return t


def check_shape(name: str, t: torch.Tensor, expected: Iterable[int]):
    expected = tuple(int(e) for e in expected)
    if tuple(t.shape) != expected:
        _fail(name, "shape", expected, tuple(t.shape))


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, meaning: str = ""):
    if t.shape[dim] != expected:
        what = f"size {expected} in dim {dim}" + (f" ({meaning})" if meaning else "")
        raise ValueError(f"argument '{name}': expected {what}, got shape {tuple(t.shape)}")


def check_multiple(name: str, value: int, multiple: int, meaning: str):
    if value % multiple != 0:
        raise ValueError(f"argument '{name}': {meaning} must be a multiple of {multiple}, got {value}")


def check_choice(name: str, value, choices):
    if value not in choices:
        _fail(name, "one of", tuple(choices), repr(value))


def check_same_device(**tensors: Optional[torch.Tensor]):
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(f"argument '{name}': expected device {first.device} (the device of "
                             f"'{first_name}'), got {t.device}")


def check_cuda_arch(t: torch.Tensor, op: str):
    """CUDA tensors need a Hopper (sm_90) GPU: the kernels use sm_90a-only instructions."""
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        if (major, minor) != (9, 0):
            raise RuntimeError(f"deepseek_ops.{op}: the CUDA kernels need a Hopper GPU (sm_90), "
                               f"got sm_{major}{minor} on {t.device}; use CPU tensors for the reference")


def check_values_in_range(name: str, t: torch.Tensor, low: int, high: int, meaning: str = ""):
    """Every element in [low, high). Reads the data (a device sync on CUDA): call outside graph capture."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        bad = lo if lo < low else hi
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"argument '{name}': expected values in [{low}, {high}){what}, got {bad}")
