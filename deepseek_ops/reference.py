"""Plain-PyTorch reference of every op: obviously correct, device-agnostic, registered as the CPU kernels.

The CUDA kernels must agree with these: bit for bit for quantization and data movement, within
the documented tolerance for GEMMs and attention (computed here in float64).
"""
import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_FLOOR = 1e-4


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Rounds positive fp32 scales up to the next power of two, exactly (no log2 rounding)."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return ((exponent + 127).to(torch.int32) << 23).view(torch.float32)


def _scale_from_amax(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    # Tensor / tensor: an IEEE division on every device (CUDA torch turns "/ scalar" into a
    # multiply by the reciprocal, which can differ in the last bit).
    scale = torch.clamp(amax, min=SCALE_FLOOR) / torch.full_like(amax, FP8_MAX)
    return round_scale_ue8m0(scale) if ue8m0 else scale


def _quantize(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """values * (1 / scale), each step rounded in fp32, then round-to-nearest-even into e4m3."""
    return (values * torch.reciprocal(scales)).to(FP8)


def column_major_scales(scales: torch.Tensor) -> torch.Tensor:
    """[M, G] scales stored as [G, align(M, 4)] (M contiguous), the layout the GEMMs' TMA reads."""
    m, g = scales.shape
    storage = scales.new_zeros(g, (m + 3) // 4 * 4)
    out = storage.narrow(1, 0, m).t()
    out.copy_(scales)
    return out


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int, ue8m0: bool, column_major: bool):
    m, k = x.shape
    groups = x.float().reshape(m, k // group_size, group_size)
    scales = _scale_from_amax(groups.abs().amax(dim=-1), ue8m0)  # [M, G]
    x_fp8 = _quantize(groups, scales.unsqueeze(-1)).reshape(m, k)
    return x_fp8, column_major_scales(scales) if column_major else scales


def per_block_quant_fp8(w: torch.Tensor, block_size: int, ue8m0: bool):
    n, k = w.shape
    nb, kb = -(-n // block_size), -(-k // block_size)
    padded = w.float().new_zeros(nb * block_size, kb * block_size)
    padded[:n, :k] = w.float()  # zero padding never changes an amax
    blocks = padded.reshape(nb, block_size, kb, block_size)
    scales = _scale_from_amax(blocks.abs().amax(dim=(1, 3)), ue8m0)  # [NB, KB]
    w_fp8 = _quantize(blocks, scales[:, None, :, None]).reshape(nb * block_size, kb * block_size)
    return w_fp8[:n, :k].contiguous(), scales


def expand_block_scales(scales: torch.Tensor, n: int, k: int, block_size: int = 128) -> torch.Tensor:
    """[ceil(n/b), ceil(k/b)] block scales -> one scale per element, [n, k]."""
    return scales.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:n, :k]


def dequant_fp8_block(w: torch.Tensor, scales: torch.Tensor, block_size: int, out_dtype: torch.dtype):
    n, k = w.shape
    return (w.float() * expand_block_scales(scales.float(), n, k, block_size)).to(out_dtype)
