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
        return __import__(name)
    except ImportError as exc:
        print(f"peer {name} not importable ({exc}); its records are skipped", flush=True)
        return None


def _deepgemm(a_scales, out_shape, device, launch) -> Optional[Callable[[], torch.Tensor]]:
    """A DeepGEMM call writing a preallocated bf16 output; its TMA-aligned a-scale layout is made once
    (a no-op on our M-major scales)."""
    dg = _import("deep_gemm")
    if dg is None:
        return None
    sfa = dg.get_mn_major_tma_aligned_tensor(a_scales)
    d = torch.empty(*out_shape, device=device, dtype=torch.bfloat16)

    def call():
        launch(dg, sfa, d)
        return d

    return call


def deepgemm_fp8_gemm_fn(a, a_scales, b, b_scales) -> Optional[Callable[[], torch.Tensor]]:
    return _deepgemm(a_scales, (a.shape[0], b.shape[0]), a.device,
                     lambda dg, sfa, d: dg.fp8_gemm_nt((a, sfa), (b, b_scales), d))


def deepgemm_contiguous_fn(a, a_scales, b, b_scales, m_indices) -> Optional[Callable[[], torch.Tensor]]:
    return _deepgemm(a_scales, (a.shape[0], b.shape[1]), a.device,
                     lambda dg, sfa, d: dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, b_scales), d, m_indices))


def deepgemm_masked_fn(a3, a_scales3, b, b_scales, masked_m, expected_m) -> Optional[Callable[[], torch.Tensor]]:
    return _deepgemm(a_scales3, (a3.shape[0], a3.shape[1], b.shape[1]), a3.device,
                     lambda dg, sfa, d: dg.m_grouped_fp8_gemm_nt_masked((a3, sfa), (b, b_scales), d, masked_m,
                                                                        expected_m))


def flashmla_decode_fn(q, kv, block_table, seqlens, scale, causal) -> Optional[Callable[[], torch.Tensor]]:
    """FlashMLA's dense bf16 decode on our cache layout ([blocks, 64, 1, 576] as it is). Its schedule
    is made at the first call and reused while the lengths stay the same, as ours is."""
    fm = _import("flash_mla")
    if fm is None:
        return None
    meta = fm.get_mla_metadata()[0]
    return lambda: fm.flash_mla_with_kvcache(q, kv, block_table, seqlens, 512, meta, softmax_scale=scale,
                                             causal=causal)[0]
