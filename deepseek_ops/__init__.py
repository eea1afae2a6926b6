"""deepseek_ops: Hopper kernels for DeepSeek-V3 building blocks, as PyTorch ops.

Every op is a torch op under torch.ops.deepseek_ops with a CUDA kernel (sm_90a), a CPU kernel
(the reference in deepseek_ops.reference) and a fake kernel for torch.compile. The functions
here validate their arguments and dispatch to those ops, the FP8 training backward ops
(deepseek_ops.train_ops) included.
"""
from deepseek_ops._extension import build_summary, cuda_kernels_built
from deepseek_ops.constants import FP8_MAX, FP8_SCALE_FLOOR, GROUPED_GEMM_ALIGNMENT, MLA_PAGE_SIZE
from deepseek_ops.gemm import fp8_gemm, fp8_linear, grouped_fp8_gemm_contiguous, grouped_fp8_gemm_masked
from deepseek_ops.mla import get_mla_metadata, mla_cache_append, mla_decode, quantize_mla_kv
from deepseek_ops.quant import dequant_fp8_block, per_block_quant_fp8, per_token_group_quant_fp8, silu_mul_quant_fp8
from deepseek_ops.linear_autograd import grouped_fp8_linear, grouped_fp8_linear_swiglu
from deepseek_ops.train_ops import (fp8_gemm_dgrad, fp8_gemm_wgrad, grouped_fp8_gemm_dgrad_contiguous,
                                    k_grouped_fp8_gemm_wgrad, swiglu_backward_quant_fp8, transpose_quant_fp8)
from deepseek_ops import ep

__all__ = [
    "FP8_MAX",
    "FP8_SCALE_FLOOR",
    "GROUPED_GEMM_ALIGNMENT",
    "MLA_PAGE_SIZE",
    "build_summary",
    "cuda_kernels_built",
    "dequant_fp8_block",
    "ep",
    "fp8_gemm",
    "fp8_gemm_dgrad",
    "fp8_gemm_wgrad",
    "fp8_linear",
    "get_mla_metadata",
    "grouped_fp8_gemm_contiguous",
    "grouped_fp8_gemm_dgrad_contiguous",
    "grouped_fp8_gemm_masked",
    "grouped_fp8_linear",
    "grouped_fp8_linear_swiglu",
    "k_grouped_fp8_gemm_wgrad",
    "mla_cache_append",
    "mla_decode",
    "per_block_quant_fp8",
    "per_token_group_quant_fp8",
    "quantize_mla_kv",
    "silu_mul_quant_fp8",
    "swiglu_backward_quant_fp8",
    "transpose_quant_fp8",
]
