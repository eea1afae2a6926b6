"""DeepGEMM and FlashMLA as peers in the benchmarks, when they are importable.

They have no wheel for the H200; ../shared/peers/README.md lays them out and builds them there (their
code never enters this repository). Each factory returns a zero-argument callable that launches the
peer on our inputs and returns its output (checked against our float64 reference before timing), or
None, after one printed line, when the peer is not importable.
"""
import functools
from typing import Callable, Optional

import torch


def passes_check(label: str, impl: str, error: float, bound: float, ours: str) -> bool:
    """Whether impl's output (calc_diff `error` against our float64 reference) may be timed. Ours
    failing raises; a peer failing is reported in one line and left out of this shape's records."""
    if error < bound:
        return True
    message = f"{label}: {impl} calc_diff {error:.3g} >= {bound}; not timed"
    if impl == ours:
        raise AssertionError(message)
    print(message, flush=True)
    return False


@functools.lru_cache(maxsize=None)
def _import(name: str):
    try:
        module = __import__(name)
        if name == "deep_gemm":
            # deep_gemm imports without its kernels when they fail to load (it swallows that ImportError):
            # raise it here, so that the peer is skipped with its cause rather than failing at the call.
            from deep_gemm._C import fp8_gemm_nt  # noqa: F401
        return module
    except ImportError as exc:
        print(f"peer {name} not importable ({exc}); its records are skipped", flush=True)
        return None


def _deepgemm(scales, make_out, launch) -> Optional[Callable[[], torch.Tensor]]:
    """A DeepGEMM call writing a preallocated output (make_out()); the TMA-aligned MN-major layout of each
    of `scales` is made once (a no-op on our M-major activation scales), launch(dg, *those, d)."""
    dg = _import("deep_gemm")
    if dg is None:
        return None
    aligned = [dg.get_mn_major_tma_aligned_tensor(s) for s in scales]
    d = make_out()

    def call():
        launch(dg, *aligned, d)
        return d

    return call


def _bf16_out(*shape, device) -> Callable[[], torch.Tensor]:
    return lambda: torch.empty(*shape, device=device, dtype=torch.bfloat16)


def deepgemm_fp8_gemm_fn(a, a_scales, b, b_scales) -> Optional[Callable[[], torch.Tensor]]:
    return _deepgemm([a_scales], _bf16_out(a.shape[0], b.shape[0], device=a.device),
                     lambda dg, sfa, d: dg.fp8_gemm_nt((a, sfa), (b, b_scales), d))


def deepgemm_contiguous_fn(a, a_scales, b, b_scales, m_indices) -> Optional[Callable[[], torch.Tensor]]:
    return _deepgemm([a_scales], _bf16_out(a.shape[0], b.shape[1], device=a.device),
                     lambda dg, sfa, d: dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, b_scales), d, m_indices))


def deepgemm_masked_fn(a3, a_scales3, b, b_scales, masked_m, expected_m) -> Optional[Callable[[], torch.Tensor]]:
    return _deepgemm([a_scales3], _bf16_out(a3.shape[0], a3.shape[1], b.shape[1], device=a3.device),
                     lambda dg, sfa, d: dg.m_grouped_fp8_gemm_nt_masked((a3, sfa), (b, b_scales), d, masked_m,
                                                                        expected_m))


# The weight gradients (1D1D: both operands scaled per row and per 128 tokens, fp32 out). DeepGEMM's
# sm90 1D1D kernels only accumulate (c required, fp32 d): d is a copy of c, passed as c too, so every
# call adds the product into it in place (its native form, with no c -> d copy); the first call's d is
# c + product, which is what gets checked.

def deepgemm_wgrad_fn(a, a_scales, b, b_scales, c) -> Optional[Callable[[], torch.Tensor]]:
    """fp8_gemm_nt with recipe (1, 1, 128) on fp8_gemm_wgrad's operands: a [N, T], b [K, T] (T-major)."""
    return _deepgemm([a_scales, b_scales], c.clone,
                     lambda dg, sfa, sfb, d: dg.fp8_gemm_nt((a, sfa), (b, sfb), d, c=d, recipe=(1, 1, 128)))


def deepgemm_k_grouped_wgrad_fn(a, a_scales, b, b_scales, group_offsets, c) -> Optional[Callable[[], torch.Tensor]]:
    """k_grouped_fp8_gemm_nt_contiguous on k_grouped_fp8_gemm_wgrad's operands. Its sm90 kernel reads each
    group's operands as one whole K-major block ([N, T_g], then the next group's): those copies of a and
    b are made once here, as its own transpose-quantization would write them; the scales are ours
    ([N, sum_T / 128], each group's 128-token blocks in order, its layout too)."""
    if _import("deep_gemm") is None:
        return None
    offsets = group_offsets.tolist()
    ranges = list(zip(offsets, offsets[1:]))
    ks = [hi - lo for lo, hi in ranges]
    a_groups = torch.cat([a[:, lo:hi].flatten() for lo, hi in ranges])  # [sum_g N * T_g]
    b_groups = torch.cat([b[:, lo:hi].flatten() for lo, hi in ranges])
    layout = torch.tensor(ks, dtype=torch.int32, device=a.device)
    return _deepgemm([a_scales, b_scales], c.clone,
                     lambda dg, sfa, sfb, d: dg.k_grouped_fp8_gemm_nt_contiguous((a_groups, sfa), (b_groups, sfb), d,
                                                                                 ks, layout, c=d))


def flashmla_decode_fn(q, kv, block_table, seqlens, scale, causal) -> Optional[Callable[[], torch.Tensor]]:
    """FlashMLA's dense bf16 decode on our cache layout ([blocks, 64, 1, 576] as it is). Its schedule
    is made at the first call and reused while the lengths stay the same, as ours is."""
    fm = _import("flash_mla")
    if fm is None:
        return None
    meta = fm.get_mla_metadata()[0]
    return lambda: fm.flash_mla_with_kvcache(q, kv, block_table, seqlens, 512, meta, softmax_scale=scale,
                                             causal=causal)[0]
