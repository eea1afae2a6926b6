"""Which ops of the kernels backend a config's shapes allow, decided before anything runs.

Each predicate returns None when the kernels take the shapes, else why not; it restates the shape
contract that the op's own checks in deepseek_ops enforce (tests/test_model_kernel_fallbacks.py
holds each predicate to those checks). The kernels backend runs an op whose shapes fall outside on
its reference math, on the same device, and says so once, when the model is built.
"""
from typing import Optional

from deepseek_ops.constants import FP8_GEMM_K_MULTIPLE, FP8_GEMM_N_MULTIPLE, MLA_HEAD_DIM_QK, MLA_HEAD_DIM_V
from model.config import ModelArgs

MLA_ROPE_DIM = MLA_HEAD_DIM_QK - MLA_HEAD_DIM_V  # mla_decode's cache row: 512 latent + 64 RoPE


def fp8_linear_fallback(in_features: int, out_features: int) -> Optional[str]:
    """fp8_linear (per 1 x 128 activation quantization, then fp8_gemm) on an [out, in] FP8 weight."""
    why = []
    if in_features % FP8_GEMM_K_MULTIPLE:
        why.append(f"K = {in_features} is not a multiple of {FP8_GEMM_K_MULTIPLE}")
    if out_features % FP8_GEMM_N_MULTIPLE:
        why.append(f"N = {out_features} is not a multiple of {FP8_GEMM_N_MULTIPLE}")
    return ", ".join(why) or None


def grouped_experts_fallback(args: ModelArgs) -> Optional[str]:
    """FP8 experts as ep.dispatch + two grouped_fp8_gemm_contiguous with silu_mul_quant_fp8 between:
    the first GEMM's K is hidden_size, the second's is moe_intermediate_size, and gate and up are
    stacked as one [2I, D] weight, so their 128-row scale blocks must not straddle."""
    why = []
    if args.hidden_size % FP8_GEMM_K_MULTIPLE:
        why.append(f"hidden_size = {args.hidden_size} is not a multiple of {FP8_GEMM_K_MULTIPLE}")
    if args.moe_intermediate_size % FP8_GEMM_K_MULTIPLE:
        why.append(f"moe_intermediate_size = {args.moe_intermediate_size} is not a multiple of {FP8_GEMM_K_MULTIPLE}")
    return ", ".join(why) or None


def mla_decode_fallback(args: ModelArgs) -> Optional[str]:
    """mla_cache_append and mla_decode: one cache row is the 512-wide latent and the 64 RoPE dims."""
    if (args.kv_lora_rank, args.qk_rope_head_dim) == (MLA_HEAD_DIM_V, MLA_ROPE_DIM):
        return None
    return (f"kv_lora_rank + qk_rope_head_dim = {args.kv_lora_rank} + {args.qk_rope_head_dim}, the kernel "
            f"needs {MLA_HEAD_DIM_V} + {MLA_ROPE_DIM}")
