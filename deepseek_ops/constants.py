"""Numbers the kernels, the references and the model share. The C++ side mirrors each one once:
csrc/sm90_mla_cache.h (MLA cache geometry and scale floor), csrc/fp8_recipe.cuh (FP8 recipe), and
the grouped GEMM's BLOCK_M (csrc/sm90_fp8_gemm.cu) is the group alignment.
"""

# The FP8 recipe (DeepSeek-V3): a group's scale is max(amax, FP8_SCALE_FLOOR) / FP8_MAX, an IEEE fp32
# division; values are quantized as value * (1 / scale), the reciprocal and the product each rounded
# to nearest in fp32, then rounded to nearest even (saturating) into e4m3.
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# An all-zero group still gets a positive scale. The floor sits below any gradient's amax: the
# backward quantizes activation gradients, whose 1 x 128 groups fall below 1e-4 (55% of them in the
# tiny preset's first steps, the SwiGLU backward's at ~1e-5). With a floor of 1e-4, the forward-only
# convention of DeepGEMM's tests, the floor set their scale, and gradients of 1e-9..1e-10 became e4m3
# subnormals: fp8_linear's dx calc_diff 0.59 at 1e-10 against 3.4e-4 with this floor (the tiny run's
# final loss did not move; benchmarks/RESULTS.md). The product of two floor scales (GEMM promotion
# multiplies a_scale * b_scale) stays a normal fp32.
FP8_SCALE_FLOOR = 1e-12
# The MLA FP8 cache keeps its own floor: its scale range, 2^-22 .. 2^120, is part of the cache format.
MLA_FP8_SCALE_FLOOR = 1e-4

# Rows of each group of grouped_fp8_gemm_contiguous's `a` start at a multiple of this (pad each group to it).
GROUPED_GEMM_ALIGNMENT = 128

# FP8 GEMM shapes: K in whole 1 x 128 / 128 x 128 scale blocks; N a multiple of the narrowest tile.
FP8_GEMM_K_MULTIPLE = 128
FP8_GEMM_N_MULTIPLE = 16

# The paged MLA latent cache.
MLA_PAGE_SIZE = 64  # tokens per page
MLA_HEAD_DIM_QK = 576  # 512 latent (c_KV) + 64 RoPE (k_pe)
MLA_HEAD_DIM_V = 512  # V = the first 512 latent entries of K
MLA_FP8_TOKEN_BYTES = 656  # packed FP8 token: 512 e4m3 + 4 fp32 scales + 64 bf16 RoPE
