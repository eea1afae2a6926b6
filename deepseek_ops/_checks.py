"""Argument checks: the one validation policy of every public op.

Each public function in deepseek_ops validates its arguments here, once, before dispatch, so a
bad call fails the same way on CPU, CUDA and under torch.compile, and never reaches a kernel.
Messages name the argument, what was expected and what was given. The torch.ops.deepseek_ops
ops themselves check only what memory safety needs (csrc/registration.cpp).

Two rules every op shares live here and nowhere else:
- 16-byte alignment (aligned16, check_aligned16): the kernels move 16-byte vectors and TMA
  needs 16-byte aligned starts.
- Reading tensor values on the host (can_read_values): only where it costs no device sync,
  unless the op syncs anyway.
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


def check_contiguous(name: str, t: torch.Tensor, why: str = ""):
    if not t.is_contiguous():
        reason = f" ({why})" if why else ""
        raise ValueError(f"argument '{name}': expected a contiguous tensor{reason}, got strides {tuple(t.stride())}")


_HOPPER_DEVICES = set()


def check_cuda_arch(t: torch.Tensor, op: str):
    """CUDA tensors need a Hopper (sm_90) GPU: the kernels use sm_90a-only instructions.

    The answer cannot change within a process, so an eager call remembers it per device.
    """
    if not t.is_cuda:
        return
    eager = not torch.compiler.is_compiling()
    if eager and t.device in _HOPPER_DEVICES:
        return
    major, minor = torch.cuda.get_device_capability(t.device)
    if (major, minor) != (9, 0):
        raise RuntimeError(f"deepseek_ops.{op}: the CUDA kernels need a Hopper GPU (sm_90), "
                           f"got sm_{major}{minor} on {t.device}; use CPU tensors for the reference")
    if eager:
        _HOPPER_DEVICES.add(t.device)


# ---- 16-byte alignment --------------------------------------------------------------------------

def is_aligned16(t: torch.Tensor) -> bool:
    """The tensor's first element sits at a 16-byte aligned address.

    NOTE: under torch.compile the start is not known (dynamo cannot trace data_ptr()); traced graphs
    allocate their own tensors, aligned, so it counts as aligned there.
    """
    return torch.compiler.is_compiling() or starts_aligned16(t)


def starts_aligned16(t: torch.Tensor) -> bool:
    """is_aligned16 in eager mode, where the caller has already asked whether torch.compile traces."""
    return t.data_ptr() % 16 == 0


def aligned16(t: torch.Tensor) -> torch.Tensor:
    """t, contiguous and starting at a 16-byte aligned address (copied only when it is not)."""
    t = t.contiguous()
    return t if is_aligned16(t) else t.clone()


def check_aligned16(name: str, t: torch.Tensor, hint: str = ""):
    """For tensors the op writes or reads in place, where a copy would not do."""
    if not is_aligned16(t):
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"argument '{name}': expected a 16-byte aligned start, got storage offset "
                         f"{t.storage_offset()} of {t.element_size()}-byte elements{extra}")


# ---- values on the host -------------------------------------------------------------------------

def can_read_values(t: torch.Tensor, *, sync_ok: bool = False) -> bool:
    """Whether the values of `t` may be read on the host to check them.

    Never while torch.compile traces (data-dependent). A CPU tensor always; a CUDA tensor only when
    the op syncs with the host anyway (sync_ok) and no CUDA graph is being captured.
    """
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    return sync_ok and t.is_cuda and not torch.cuda.is_current_stream_capturing()


def check_values_in_range(name: str, t: torch.Tensor, low: int, high: int, meaning: str = "", *,
                          high_inclusive: bool = False):
    """Every element in [low, high) ([low, high] with high_inclusive). Reads the data: call only
    where can_read_values(t) says so."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi > high or (hi == high and not high_inclusive):
        what = f" ({meaning})" if meaning else ""
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"argument '{name}': expected values in [{low}, {high}{bracket}{what}, got values in "
                         f"[{lo}, {hi}]")
