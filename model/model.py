"""DeepSeek-V3, thin: MLA + DeepSeekMoE + MTP, one code path with two backends.

backend="reference": plain PyTorch (CPU ok). FP8 weights are dequantized with deepseek_ops.reference,
    attention is PyTorch math (absorbed into the latent space, or naive with expanded k/v), experts
    are a Python loop.
backend="kernels": our ops. FP8 linears run deepseek_ops.fp8_linear, FP8 experts run the grouped FP8
    GEMMs on a contiguous expert layout, decode attention runs deepseek_ops.mla_decode on the paged
    latent cache, prefill attention runs PyTorch's scaled_dot_product_attention (flash) on per-head
    k/v. Float (bf16) weights keep the reference math (there is no FP8 kernel to run), and so do
    ops whose shapes the kernels don't take (model/kernel_fallbacks.py; construction warns).

Module and parameter names are the Hugging Face ones, so `state_dict()` keys are the checkpoint keys
(model.layers.{i}.self_attn.q_a_proj.weight, ...; the MTP module is layer num_hidden_layers).

RoPE pairing: the rope dims of q and k rotate as interleaved pairs (x[2i], x[2i+1]), as in DeepSeek's
inference/model.py. Hugging Face (rope_interleave=True) first permutes each rope vector to
[x[0::2], x[1::2]] and rotates halves: the same rotation with the 64 dims listed in another order,
applied to q and k alike, so q.k, attention and logits are identical and HF-format weights load
unchanged. The latent cache stores k_pe in the interleaved order.

Shape legend: B batch, S new tokens, T keys (cache slots), H heads, D hidden, R kv_lora_rank,
dn/dr/dv nope/rope/value head dims, E routed experts, K experts per token, N tokens (B * S).
"""
import math
import re
import warnings
import zlib
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import deepseek_ops
from deepseek_ops import reference as ops_ref
from deepseek_ops.constants import MLA_FP8_TOKEN_BYTES
from model.config import FP8_BLOCK, PAGE_SIZE, ModelArgs, preset, yarn_mscale
from model.kernel_fallbacks import fp8_linear_fallback, grouped_experts_fallback, mla_decode_fallback
from model.master_stack import stacked_master

BACKENDS = ("reference", "kernels")
ATTN_IMPLS = ("absorbed", "naive", "sdpa")
FP8 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class Linear(nn.Module):
    """y = x W^T, no bias. W is a float weight, or e4m3 with `weight_scale_inv` (fp32, one scale per
    128 x 128 block, W ~= W_e4m3 * scale): the DeepSeek-V3 FP8 checkpoint convention. The kernels
    backend runs an FP8 weight on fp8_linear where its shape allows (kernel_fallback None)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, fp8: bool, backend: str):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.kernel_fallback = fp8_linear_fallback(in_features, out_features)  # why fp8_linear can't, or None
        self.fp8_activations = False  # reference backend: quantize x per 1 x 128 group as the kernels do
        self.fp8_training = False  # FP8 training (model/train.py): the float weight is the master weight
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8 if fp8 else dtype),
                                   requires_grad=False)
        scale = torch.empty(math.ceil(out_features / FP8_BLOCK), math.ceil(in_features / FP8_BLOCK))
        self.weight_scale_inv = nn.Parameter(scale, requires_grad=False) if fp8 else None

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale_inv is not None

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.is_fp8:
            return self.weight.to(dtype)
        return ops_ref.dequant_fp8_block(self.weight, self.weight_scale_inv, FP8_BLOCK, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_training:  # quantized per call; dW reaches the master weight (deepseek_ops.linear_autograd)
            if torch.is_autocast_enabled(x.device.type):  # the dtype autocast gives the float linears
                x = x.to(torch.get_autocast_dtype(x.device.type))
            w_fp8, w_scale = deepseek_ops.per_block_quant_fp8(self.weight.detach())
            return deepseek_ops.fp8_linear(x, w_fp8, w_scale, master_weight=self.weight)
        if self.is_fp8 and self.backend == "kernels" and self.kernel_fallback is None:
            return deepseek_ops.fp8_linear(x, self.weight, self.weight_scale_inv).to(x.dtype)
        if self.is_fp8 and self.fp8_activations:
            return F.linear(fp8_roundtrip_activations(x), self.dense_weight(torch.float32)).to(x.dtype)
        return F.linear(x, self.dense_weight(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fp8={self.is_fp8}"


def fp8_roundtrip_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> fp32 x as the FP8 kernels see it: e4m3 with one scale per 1 x 128 group."""
    k = x.shape[-1]
    x_fp8, scales = ops_ref.per_token_group_quant_fp8(x.reshape(-1, k), FP8_BLOCK, False, False)
    return (x_fp8.float() * scales.repeat_interleave(FP8_BLOCK, dim=1)).view(x.shape)  # [..., K]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # normalize in fp32 (as HF)
        return self.weight * h.to(x.dtype)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim, dtype=dtype), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)


# ----------------------------------------------------------------------------------------------
# RoPE with YaRN
# ----------------------------------------------------------------------------------------------
def _yarn_correction_range(args: ModelArgs, dim: int) -> Tuple[int, int]:
    """The rope dims (in pairs) between full extrapolation (fast) and full interpolation (slow)."""
    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(args.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(args.rope_theta))

    low = math.floor(correction_dim(args.beta_fast))
    high = math.ceil(correction_dim(args.beta_slow))
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [dr / 2] fp32; under YaRN, low frequencies are divided by rope_factor
    with a linear ramp between the correction dims (DeepSeek inference/model.py, HF yarn)."""
    dim = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.uses_yarn:
        low, high = _yarn_correction_range(args, dim)
        ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)
        keep = 1 - ramp.clamp(0, 1)  # 1: high frequency, kept; 0: interpolated by rope_factor
        freqs = freqs / args.rope_factor * (1 - keep) + freqs * keep
    return freqs


def rope_attention_factor(args: ModelArgs) -> float:
    """HF yarn scales cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim): 1 for V3."""
    if not args.uses_yarn or not (args.mscale and args.mscale_all_dim):
        return 1.0
    return yarn_mscale(args.rope_factor, args.mscale) / yarn_mscale(args.rope_factor, args.mscale_all_dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of x [B, S, H, dr] by angles whose cos/sin are [B, S, dr/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, S, H, dr/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, S, 1, dr/2]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [B, S, H, dr/2, 2]
    return rotated.flatten(-2).to(x.dtype)  # [B, S, H, dr]


# ----------------------------------------------------------------------------------------------
# Attention context: where the new tokens sit and how attention reads keys
# ----------------------------------------------------------------------------------------------
class AttnContext:
    """positions [B, S] int64 of the new tokens; rope cos/sin [B, S, dr/2] fp32. With a block_table
    [B, max_blocks] int32 the new latents are written to the paged cache; `decode` makes attention
    read its keys from the cache (else from the new tokens themselves: a prefill from position 0).
    `contiguous` promises positions[b] = start[b] + arange(S): a prefill's mask is then the plain lower
    triangle, known without reading positions back from the device. A decode step's cache_seqlens
    [B] int32 (keys per request, up to the last new token) is computed once for all layers."""

    def __init__(self, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 block_table: Optional[torch.Tensor] = None, decode: bool = False, contiguous: bool = False):
        self.positions, self.cos, self.sin = positions, cos, sin
        self.block_table, self.decode, self.contiguous = block_table, decode, contiguous
        self.cache_seqlens = (positions[:, -1] + 1).to(torch.int32) if decode else None  # [B]
        self.mla_metadata = None  # kernels backend: mla_decode's split-KV schedule, shared by all layers


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, T] bool: query at q_pos [B, S] sees keys at positions k_pos [B or 1, T] <= its own."""
    return (k_pos[:, None, :] <= q_pos[:, :, None]).unsqueeze(1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax((scores.float() * scale).masked_fill(~mask, float("-inf")), dim=-1)


def absorbed_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, mask, scale):
    """MLA in the latent space: k = W_uk c, v = W_uv c are never materialized.

    q_nope [B,S,H,dn], q_pe [B,S,H,dr], c_kv [B,T,R], k_pe [B,T,dr], w_uk [H,dn,R], w_uv [H,dv,R].
    """
    q_lat = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)  # [B, S, H, R]
    scores = torch.einsum("bshr,btr->bhst", q_lat, c_kv) + torch.einsum("bshd,btd->bhst", q_pe, k_pe)
    probs = masked_softmax(scores, mask, scale).to(c_kv.dtype)  # [B, H, S, T]
    o_lat = torch.einsum("bhst,btr->bshr", probs, c_kv)  # [B, S, H, R]
    return torch.einsum("bshr,hdr->bshd", o_lat, w_uv)  # [B, S, H, dv]


def naive_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, mask, scale):
    """MLA as multi-head attention: per-head keys and values expanded from the latent first."""
    k_nope = torch.einsum("btr,hdr->bthd", c_kv, w_uk)  # [B, T, H, dn]
    v = torch.einsum("btr,hdr->bthd", c_kv, w_uv)  # [B, T, H, dv]
    q = torch.cat([q_nope, q_pe], dim=-1)  # [B, S, H, dn + dr]
    k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, k_nope.shape[2], -1)], dim=-1)  # [B, T, H, dn + dr]
    probs = masked_softmax(torch.einsum("bshd,bthd->bhst", q, k), mask, scale).to(v.dtype)  # [B, H, S, T]
    return torch.einsum("bhst,bthd->bshd", probs, v)  # [B, S, H, dv]


def sdpa_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, mask, scale):
    """naive_attention on F.scaled_dot_product_attention: on GPU its flash / memory-efficient kernels
    never materialize the [B, H, S, T] scores. mask None: causal, query i sees keys j <= i (S == T)."""
    k_nope = torch.einsum("btr,hdr->bhtd", c_kv, w_uk)  # [B, H, T, dn]
    v = torch.einsum("btr,hdr->bhtd", c_kv, w_uv)  # [B, H, T, dv]
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, S, dn + dr]
    k = torch.cat([k_nope, k_pe[:, None].expand(-1, k_nope.shape[1], -1, -1)], dim=-1)  # [B, H, T, dn + dr]
    # NOTE: PyTorch's flash backend needs one head dim for q, k and v (else SDPA falls back to a slower
    # kernel); v's zero columns cost 20% more FLOPs and give zero output columns, sliced off below.
    dv = v.shape[-1]
    v = F.pad(v, (0, q.shape[-1] - dv))  # [B, H, T, dn + dr]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return o[..., :dv].transpose(1, 2)  # [B, H, S, dn + dr] -> [B, S, H, dv]


def write_latent_cache(kv_cache: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor,
                       c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """kv_cache [num_blocks, 64, 1, R + dr][block_table[b, pos // 64], pos % 64] = [c_kv | k_pe]."""
    block_idx = torch.gather(block_table.long(), 1, positions // PAGE_SIZE)  # [B, S]
    kv_cache[block_idx, positions % PAGE_SIZE, 0] = torch.cat([c_kv, k_pe], dim=-1).to(kv_cache.dtype)


# ----------------------------------------------------------------------------------------------
# Multi-head latent attention
# ----------------------------------------------------------------------------------------------
class MLA(nn.Module):
    def __init__(self, args: ModelArgs, backend: str, attn_impl: str):
        super().__init__()
        d, h, dt, fp8 = args.hidden_size, args.num_attention_heads, args.torch_dtype, args.fp8
        self.args, self.backend, self.attn_impl = args, backend, attn_impl
        self.num_heads, self.kv_lora_rank = h, args.kv_lora_rank
        self.dn, self.dr, self.dv = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.softmax_scale = args.softmax_scale
        self.mla_kernels = backend == "kernels" and mla_decode_fallback(args) is None  # cache append + decode
        if args.q_lora_rank:
            self.q_a_proj = Linear(d, args.q_lora_rank, dt, fp8, backend)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps, dt)
            self.q_b_proj = Linear(args.q_lora_rank, h * args.qk_head_dim, dt, fp8, backend)
        else:
            self.q_proj = Linear(d, h * args.qk_head_dim, dt, fp8, backend)
        self.kv_a_proj_with_mqa = Linear(d, args.kv_lora_rank + self.dr, dt, fp8, backend)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps, dt)
        self.kv_b_proj = Linear(args.kv_lora_rank, h * (self.dn + self.dv), dt, fp8, backend)
        self.o_proj = Linear(h * self.dv, d, dt, fp8, backend)
        self.register_buffer("kv_cache", None, persistent=False)  # [num_blocks, 64, 1, R + dr or 656], setup_cache
        self.register_buffer("wkv_b_dense", None, persistent=False)  # kernels backend: dequantized once

    def project(self, x: torch.Tensor, ctx: AttnContext):
        """x [B, S, D] -> q_nope [B,S,H,dn], q_pe [B,S,H,dr] (roped), c_kv [B,S,R] (normed), k_pe [B,S,dr] (roped)."""
        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q = q.view(b, s, self.num_heads, self.dn + self.dr)  # [B, S, H, dn + dr]
        q_nope, q_pe = torch.split(q, [self.dn, self.dr], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)  # [B, S, R + dr]
        c_kv, k_pe = torch.split(kv, [self.kv_lora_rank, self.dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = apply_rope(q_pe, ctx.cos, ctx.sin)
        k_pe = apply_rope(k_pe.unsqueeze(2), ctx.cos, ctx.sin).squeeze(2)  # [B, S, dr]: one head shared by all
        return q_nope, q_pe, c_kv, k_pe

    def kv_b_weights(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """W_uk [H, dn, R] and W_uv [H, dv, R] from kv_b_proj [H * (dn + dv), R]."""
        w = self.wkv_b_dense if self.wkv_b_dense is not None else self.kv_b_proj.dense_weight(dtype)
        w = w.to(dtype).view(self.num_heads, self.dn + self.dv, self.kv_lora_rank)  # [H, dn + dv, R]
        return w[:, :self.dn], w[:, self.dn:]

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        b, s, _ = x.shape
        q_nope, q_pe, c_kv, k_pe = self.project(x, ctx)
        if ctx.block_table is not None:
            self._write_cache(ctx, c_kv, k_pe)
        w_uk, w_uv = self.kv_b_weights(x.dtype)
        if ctx.decode and self.mla_kernels:
            o = self._mla_decode(q_nope, q_pe, w_uk, w_uv, ctx)
        elif self.backend == "kernels" and not ctx.decode:  # prefill: keys are the new tokens, q_pos == k_pos
            mask = None if ctx.contiguous else causal_mask(ctx.positions, ctx.positions)
            o = sdpa_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, mask, self.softmax_scale)
        else:
            if ctx.decode:  # keys: every cache slot of the request; the mask drops unwritten ones
                cache = self.kv_cache[ctx.block_table.long()].flatten(1, 3)  # [B, max_blocks * 64, R + dr]
                c_kv, k_pe = torch.split(cache.to(x.dtype), [self.kv_lora_rank, self.dr], dim=-1)
                k_pos = torch.arange(cache.shape[1], device=x.device)[None]  # [1, T]
            else:
                k_pos = ctx.positions
            if self.attn_impl == "sdpa":
                # A plain causal forward (training) gives SDPA no mask: its flash kernel then runs.
                mask = None if ctx.contiguous and not ctx.decode else causal_mask(ctx.positions, k_pos)
                o = sdpa_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, mask, self.softmax_scale)
            else:
                attend = absorbed_attention if self.attn_impl == "absorbed" else naive_attention
                o = attend(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, causal_mask(ctx.positions, k_pos),
                           self.softmax_scale)
        return self.o_proj(o.reshape(b, s, self.num_heads * self.dv))  # [B, S, H * dv] -> [B, S, D]

    def _write_cache(self, ctx: AttnContext, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        if self.mla_kernels:
            deepseek_ops.mla_cache_append(self.kv_cache, ctx.block_table, ctx.positions.to(torch.int32),
                                          c_kv.to(torch.bfloat16), k_pe.to(torch.bfloat16))
        else:
            write_latent_cache(self.kv_cache, ctx.block_table, ctx.positions, c_kv, k_pe)

    def _mla_decode(self, q_nope, q_pe, w_uk, w_uv, ctx: AttnContext) -> torch.Tensor:
        q_lat = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)  # [B, S, H, R]
        q = torch.cat([q_lat, q_pe], dim=-1).to(torch.bfloat16)  # [B, S, H, R + dr]
        o_lat, _ = deepseek_ops.mla_decode(q, self.kv_cache, ctx.block_table, ctx.cache_seqlens, self.softmax_scale,
                                           causal=True, metadata=ctx.mla_metadata)  # [B, S, H, R]
        return torch.einsum("bshr,hdr->bshd", o_lat.to(w_uv.dtype), w_uv)  # [B, S, H, dv]


# ----------------------------------------------------------------------------------------------
# Feed-forward: dense SwiGLU and DeepSeekMoE
# ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim: int, inter_dim: int, args: ModelArgs, backend: str):
        super().__init__()
        dt, fp8 = args.torch_dtype, args.fp8
        self.gate_proj = Linear(dim, inter_dim, dt, fp8, backend)
        self.up_proj = Linear(dim, inter_dim, dt, fp8, backend)
        self.down_proj = Linear(inter_dim, dim, dt, fp8, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj.fp8_training and self.up_proj.fp8_training and self.down_proj.fp8_training:
            return self.forward_fp8_training(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_fp8_training(self, x: torch.Tensor) -> torch.Tensor:
        """FP8 training as the routed experts run: gate and up as one FP8 linear whose SwiGLU, and its
        backward, are fused into the quantization the down projection consumes (one group of rows,
        padded to the grouped GEMM's alignment)."""
        shape = x.shape
        if torch.is_autocast_enabled(x.device.type):  # the dtype the float linears get, as Linear.forward
            x = x.to(torch.get_autocast_dtype(x.device.type))
        rows = x.reshape(-1, shape[-1])
        m = rows.shape[0]
        padded = m + -m % deepseek_ops.GROUPED_GEMM_ALIGNMENT
        rows = F.pad(rows, (0, 0, 0, padded - m))
        offsets = torch.arange(2, device=x.device) * padded  # [0, M']: made on the device, no host copy
        w13 = stacked_master(self, "_w13_master", [[self.gate_proj.weight, self.up_proj.weight]])  # [1, 2I, D]
        act = grouped_fp8_linear_train(rows, w13, offsets, swiglu=True)  # [M', I]: silu(gate) * up
        y = grouped_fp8_linear_train(act, self.down_proj.weight[None], offsets)[:m]  # [M, D]
        return y.view(*shape[:-1], y.shape[-1])


def route(scores: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
          norm_topk_prob: bool, routed_scaling_factor: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Auxiliary-loss-free, group-limited top-k routing of DeepSeek-V3.

    scores [N, E] sigmoid affinities (fp32); bias [E] e_score_correction_bias. The bias only steers
    which experts are chosen: groups rank by the sum of their top-2 biased scores, the best topk_group
    groups stay eligible, the top_k biased scores among them are chosen. The weights are the
    unbiased scores of the chosen experts (normalized to sum 1 if norm_topk_prob) * routed_scaling_factor.
    Returns weights [N, top_k] fp32 and expert indices [N, top_k] int64.
    """
    n, e = scores.shape
    biased = scores + bias  # [N, E]
    group_scores = biased.view(n, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)  # [N, n_group]
    group_idx = group_scores.topk(topk_group, dim=-1).indices  # [N, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)  # [N, E]
    indices = biased.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1).indices  # [N, K]
    weights = scores.gather(1, indices)  # [N, K]
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


class Gate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size, dtype=args.torch_dtype),
                                   requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(args.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E], fp32 as HF does
        return route(scores, self.e_score_correction_bias.float(), a.n_group, a.topk_group,
                     a.num_experts_per_tok, a.norm_topk_prob, a.routed_scaling_factor)


def grouped_fp8_linear_train(rows: torch.Tensor, master: torch.Tensor, offsets: torch.Tensor,
                             swiglu: bool = False) -> torch.Tensor:
    """rows [M, in] through expert g's master weight [E, out, in] (out a multiple of 128: no scale
    block straddles two experts), quantized per 128 x 128 block this call; dW reaches `master`.
    swiglu: master is [gate | up] and the result silu(gate) * up [M, out / 2] (its backward fused)."""
    num_experts, out_features, in_features = master.shape
    w_fp8, w_scale = deepseek_ops.per_block_quant_fp8(master.detach().reshape(num_experts * out_features, in_features))
    w_scale = w_scale.view(num_experts, out_features // FP8_BLOCK, -1)  # [E, out / 128, in / 128]
    linear = deepseek_ops.grouped_fp8_linear_swiglu if swiglu else deepseek_ops.grouped_fp8_linear
    return linear(rows, w_fp8.view(master.shape), w_scale, offsets, master_weight=master)


class RemoteExpert(nn.Module):
    """Placeholder for an expert another expert-parallel rank holds (keeps experts.{j} numbering)."""


def _ep_rank_and_size(group) -> Tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@torch.no_grad()
def set_derived(module: nn.Module, name: str, value: Optional[torch.Tensor]) -> None:
    """Sets a tensor derived from the weights: in place when the one there has the same shape, dtype
    and device, so that a captured step graph (model/step_graphs.py), which reads it by address,
    sees the new values and stays valid."""
    old = getattr(module, name)
    if (value is not None and old is not None and old.shape == value.shape and old.dtype == value.dtype
            and old.device == value.device):
        old.copy_(value)
    else:
        setattr(module, name, value)


def group_by_expert(indices: torch.Tensor, num_experts: int):
    """The (token, slot) pairs of indices [N, K] grouped by expert, (token, slot) order kept within
    each: (flat [N * K] expert of each pair, order [N * K] pairs in grouped order, counts [E] pairs per
    expert, rank [N * K] each grouped pair's place within its expert)."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    rank = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    return flat, order, counts, rank


class MoE(nn.Module):
    """Routed experts + shared experts. With ep_group (torch.distributed, several ranks), rank r
    holds experts [r * E/R, (r + 1) * E/R) and tokens travel through deepseek_ops.ep.Buffer."""

    def __init__(self, args: ModelArgs, backend: str, ep_group=None):
        super().__init__()
        self.args, self.backend, self.ep_group = args, backend, ep_group
        # ep.Buffer backend with ep_group: None picks "ipc" (our NVLink kernels, one node) for the
        # kernels backend on CUDA and "torch" (torch.distributed, the reference) otherwise.
        self.ep_backend: Optional[str] = None
        rank, world = _ep_rank_and_size(ep_group)
        if args.n_routed_experts % world:
            raise ValueError(f"ModelArgs.n_routed_experts = {args.n_routed_experts}: must be a multiple of the "
                             f"expert-parallel world size {world}")
        per_rank = args.n_routed_experts // world
        self.local_experts = range(rank * per_rank, (rank + 1) * per_rank)
        self.ep_buffer = None
        self.gate = Gate(args)
        self.experts = nn.ModuleList(
            MLP(args.hidden_size, args.moe_intermediate_size, args, backend) if j in self.local_experts
            else RemoteExpert() for j in range(args.n_routed_experts))
        if args.n_shared_experts:
            self.shared_experts = MLP(args.hidden_size, args.n_shared_experts * args.moe_intermediate_size,
                                      args, backend)
        self.fp8_training = False  # FP8 training (model/train.py): experts_grouped_fp8_train
        self.batched_experts = False  # float training on the GPU (use_batched_experts): experts_batched
        # kernels backend, FP8 experts: [E, 2I, D] (gate rows then up rows) and [E, D, I], set by prepare()
        for name in ("w13", "w13_scale", "w2", "w2_scale"):
            self.register_buffer(name, None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        weights, indices = self.gate(x)  # [N, K] each
        if self.ep_group is not None:
            y = self.experts_parallel(x, weights, indices)
        elif self.fp8_training:
            y = self.experts_grouped_fp8_train(x, weights, indices)
        elif self.backend == "kernels" and self.w13 is not None:
            # Sized exactly (one host sync) when eager; for the worst case (no sync) while a CUDA graph is
            # captured, where a sync is not allowed.
            y = self.experts_grouped_fp8(x, weights, indices,
                                         exact=not (x.is_cuda and torch.cuda.is_current_stream_capturing()))
        elif torch.compiler.is_compiling():
            y = self.experts_dense(x, weights, indices)
        elif self.batched_experts:
            y = self.experts_batched(x, weights, indices)
        else:
            y = self.experts_loop(x, weights, indices)
        if self.args.n_shared_experts:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def experts_loop(self, x, weights, indices):
        """The plain reference: each expert runs on the tokens routed to it."""
        y = torch.zeros_like(x, dtype=torch.float32)
        for expert_idx, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.where(indices == expert_idx)
            if token_idx.numel():
                out = expert(x[token_idx]).float() * weights[token_idx, slot_idx, None]
                y.index_add_(0, token_idx, out)
        return y.to(x.dtype)

    def experts_batched(self, x, weights, indices):
        """experts_loop's sum as batched matmuls over [E, C, D]: each expert's rows gathered in (token,
        slot) order and padded to the busiest expert's count C. One host sync (C) and a few dozen ops a
        layer instead of a sync and about ten ops per expert, which dominate a float training step on
        the GPU. Float expert weights only (use_batched_experts checks)."""
        k = indices.shape[1]
        flat, order, counts, row = group_by_expert(indices, len(self.experts))
        expert, token = flat[order], order // k
        padded = x.new_zeros(len(self.experts), int(counts.max()), x.shape[1])
        padded[expert, row] = x[token]

        # The weights in the dtype the loop's F.linear computes in (autocast's, else x's), cast before
        # the stack so the [E, out, in] copy is made once, in that dtype.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

        def stacked(name):  # [E, out, in], differentiable into each expert's own weight
            return torch.stack([getattr(e, name).weight.to(dtype) for e in self.experts])
        hidden = F.silu(padded @ stacked("gate_proj").transpose(1, 2)) * (padded @ stacked("up_proj").transpose(1, 2))
        out = (hidden @ stacked("down_proj").transpose(1, 2))[expert, row].float() * weights.flatten()[order, None]
        return torch.zeros_like(x, dtype=torch.float32).index_add_(0, token, out).to(x.dtype)

    def experts_dense(self, x, weights, indices):
        """The same sum with static shapes (for torch.compile): every expert on every token, weight 0 if unrouted."""
        combine = torch.zeros(x.shape[0], len(self.experts), device=x.device).scatter_add_(1, indices, weights)
        y = torch.zeros_like(x, dtype=torch.float32)
        for expert_idx, expert in enumerate(self.experts):
            y = y + expert(x).float() * combine[:, expert_idx, None]
        return y.to(x.dtype)

    def experts_grouped_fp8(self, x, weights, indices, exact: bool = True):
        """Experts as two grouped FP8 GEMMs over the expert-contiguous rows of ep.dispatch (exact: its
        row count; the rows' results are the same either way)."""
        ep = deepseek_ops.ep
        recv = ep.dispatch(self._quantize(x), indices, weights, num_experts=len(self.experts), exact=exact)
        y = self._expert_gemms(*recv.recv_x, recv.recv_topk_idx)  # rows grouped by expert
        return ep.combine(y, recv.handle, weights).to(x.dtype)  # [N, D]: sum_k w[n, k] * y[row(n, k)]

    def experts_grouped_fp8_train(self, x, weights, indices):
        """Training: the experts as two differentiable grouped FP8 linears over expert-contiguous rows
        (each expert's rows padded to GROUPED_GEMM_ALIGNMENT), on the stacked fp32 master weights
        (model/master_stack.py: stacked once, not per call)."""
        n, k = indices.shape
        flat, order, counts, rank_in_expert = group_by_expert(indices, len(self.experts))
        align = deepseek_ops.GROUPED_GEMM_ALIGNMENT
        offsets = F.pad(torch.cumsum((counts + align - 1) // align * align, 0), (1, 0))  # [E + 1]
        row_of = torch.empty_like(flat).scatter_(0, order, offsets[flat[order]] + rank_in_expert)  # [N * K]
        token_of_row = torch.full((int(offsets[-1]),), n, device=x.device).scatter_(
            0, row_of, torch.arange(n * k, device=x.device) // k)  # [M]; padding rows read row n, zero
        rows = F.pad(x, (0, 0, 0, 1))[token_of_row]  # [M, D]
        w13 = stacked_master(self, "_w13_master",
                             [[e.gate_proj.weight, e.up_proj.weight] for e in self.experts])  # [E, 2I, D]
        act = grouped_fp8_linear_train(rows, w13, offsets, swiglu=True)  # [M, I]: silu(gate) * up
        w2 = stacked_master(self, "_w2_master", [[e.down_proj.weight] for e in self.experts])  # [E, D, I]
        y = grouped_fp8_linear_train(act, w2, offsets)[row_of].view(n, k, -1)  # [N, K, D]
        return (y.float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)

    def experts_parallel(self, x, weights, indices):
        """Expert parallel: dispatch the (token, expert) pairs to the experts' ranks, run the local
        experts on the rows received (grouped FP8 GEMMs, or the loop), combine back home."""
        ep = deepseek_ops.ep
        backend = self.ep_backend or ("ipc" if self.backend == "kernels" and x.is_cuda else "torch")
        buffer = self.ep_buffer
        # Every rank decides on the same capacity (the group's largest token count): the Buffer is
        # built collectively, so a rank re-creating it alone would wait for its peers forever.
        needed = ep.group_max_tokens(self.ep_group, x.shape[0])
        if buffer is None or buffer.backend != backend or buffer.max_tokens_per_rank < needed:
            if buffer is not None:
                buffer.close()
            self.ep_buffer = buffer = ep.Buffer(self.ep_group, max(needed, 4096), x.shape[1], len(self.experts),
                                                backend=backend, max_topk=indices.shape[1])
        if self.w13 is not None:  # FP8 rows travel: half the bytes, and each token is quantized once
            recv = buffer.dispatch(self._quantize(x), indices, weights)
            y = self._expert_gemms(*recv.recv_x, recv.recv_topk_idx)
        else:
            recv = buffer.dispatch(x.to(torch.bfloat16), indices, weights)
            rows, m_indices = recv.recv_x, recv.recv_topk_idx  # [M, D] bf16, [M] local expert (-1: padding)
            y = torch.zeros_like(rows)
            for local_idx, expert_idx in enumerate(self.local_experts):
                (row_idx,) = torch.where(m_indices == local_idx)
                if row_idx.numel():
                    y[row_idx] = self.experts[expert_idx](rows[row_idx].to(x.dtype)).to(y.dtype)
        return self.ep_buffer.combine(y, recv.handle, weights).to(x.dtype)  # [N, D]

    @staticmethod
    def _quantize(x: torch.Tensor):
        """x [N, D] -> (e4m3 [N, D], fp32 scales [N, D/128]): quantized at home, before dispatch."""
        return deepseek_ops.per_token_group_quant_fp8(x.to(torch.bfloat16), FP8_BLOCK)

    def _expert_gemms(self, rows_fp8, rows_scale, m_indices):
        """Rows grouped by expert (m_indices -1 on padding) -> y [M, D] bf16: w2 (silu(gate) * up)."""
        grouped = deepseek_ops.grouped_fp8_gemm_contiguous
        h = grouped(rows_fp8, rows_scale, self.w13, self.w13_scale, m_indices)  # [M, 2I]
        return grouped(*self._activation(h), self.w2, self.w2_scale, m_indices)  # [M, D]

    @staticmethod
    def _activation(h: torch.Tensor):
        """h [M, 2I] (gate | up) -> silu(gate) * up [M, I] in bf16, quantized per 1 x 128 for the w2
        GEMM: one fused pass (the activation never reaches memory)."""
        return deepseek_ops.silu_mul_quant_fp8(h, column_major_scales=True)

    def prepare_kernels(self) -> None:
        """Stacks FP8 expert weights for the grouped GEMMs (float experts, and shapes the grouped GEMMs
        don't take, keep the loop over experts)."""
        experts = [self.experts[j] for j in self.local_experts]
        if not all(e.gate_proj.is_fp8 and e.up_proj.is_fp8 and e.down_proj.is_fp8 for e in experts):
            return
        if grouped_experts_fallback(self.args):
            return
        set_derived(self, "w13", torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts]))
        set_derived(self, "w13_scale", torch.stack([torch.cat([e.gate_proj.weight_scale_inv,
                                                               e.up_proj.weight_scale_inv]) for e in experts]))
        set_derived(self, "w2", torch.stack([e.down_proj.weight for e in experts]))
        set_derived(self, "w2_scale", torch.stack([e.down_proj.weight_scale_inv for e in experts]))


# ----------------------------------------------------------------------------------------------
# Blocks and the model
# ----------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, backend: str, attn_impl: str, ep_group=None):
        super().__init__()
        self.self_attn = MLA(args, backend, attn_impl)
        self.mlp = MoE(args, backend, ep_group) if args.is_moe_layer(layer_idx) else MLP(
            args.hidden_size, args.intermediate_size, args, backend)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.torch_dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.torch_dtype)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    def __init__(self, args: ModelArgs, head: Linear):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.torch_dtype)
        self.head = head  # the main lm_head (the checkpoint stores a copy; loading checks it is equal)


class MTPLayer(DecoderLayer):
    """Multi-token prediction: from the main model's hidden state at position i and the embedding
    of token i+1, predicts token i+2 (one transformer block, shared embedding and head)."""

    def __init__(self, args: ModelArgs, layer_idx: int, backend: str, attn_impl: str,
                 embed_tokens: Embedding, head: Linear, ep_group=None):
        super().__init__(args, layer_idx, backend, attn_impl, ep_group)
        d, dt = args.hidden_size, args.torch_dtype
        self.enorm = RMSNorm(d, args.rms_norm_eps, dt)
        self.hnorm = RMSNorm(d, args.rms_norm_eps, dt)
        self.eh_proj = Linear(2 * d, d, dt, False, backend)  # a float weight unless the checkpoint says FP8
        self.embed_tokens = embed_tokens
        self.shared_head = SharedHead(args, head)

    def predict(self, hidden: torch.Tensor, next_tokens: torch.Tensor, ctx: AttnContext):
        """hidden [B, S, D] (main model, after its final norm), next_tokens [B, S] -> logits [B, S, V], hidden."""
        x = torch.cat([self.enorm(self.embed_tokens(next_tokens)), self.hnorm(hidden)], dim=-1)  # [B, S, 2D]
        x = self(self.eh_proj(x), ctx)  # [B, S, D]
        return self.shared_head.head(self.shared_head.norm(x)).float(), x


class DeepseekV3Model(nn.Module):
    def __init__(self, args: ModelArgs, backend: str, attn_impl: str, lm_head: Linear, ep_group=None):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size, args.torch_dtype)
        layers = [DecoderLayer(args, i, backend, attn_impl, ep_group) for i in range(args.num_hidden_layers)]
        layers += [MTPLayer(args, args.num_hidden_layers + i, backend, attn_impl, self.embed_tokens, lm_head, ep_group)
                   for i in range(args.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.torch_dtype)


class Transformer(nn.Module):
    """DeepSeek-V3 for causal LM. `backend` ("reference" | "kernels") and `attn_impl`
    ("absorbed" | "naive" | "sdpa", reference attention only; sdpa: F.scaled_dot_product_attention,
    which training uses so that no [B, H, S, T] scores are stored) are fixed at construction. ep_group: a
    torch.distributed group to shard the routed experts over (every rank runs the whole model on
    its own tokens; MoE layers exchange tokens with deepseek_ops.ep); None: one process.

    fp8_activations (reference backend): FP8 linears see their input rounded to e4m3 per 1 x 128
    group, as the FP8 kernels compute (DeepSeek's gemm_impl="fp8"); off, they compute with the exact
    input and dequantized weights (gemm_impl="bf16"). The kernels backend is compared against the
    former: the activation rounding alone moves each layer's output by calc_diff ~1e-3. Linears whose
    shape fp8_linear does not take keep the exact input, as the kernels backend computes them.

    The kernels backend runs every op whose shapes the kernels take on them, and the others on the
    reference math on the same device (any DeepSeek-V3-family config runs; V3's own runs fully on
    the kernels); kernel_fallbacks() lists those, and construction warns once with that list.
    """

    def __init__(self, args: ModelArgs, backend: str = "reference", attn_impl: str = "absorbed",
                 fp8_activations: bool = False, ep_group=None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"argument 'backend': expected one of {BACKENDS}, got {backend!r}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"argument 'attn_impl': expected one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.args, self.backend, self.attn_impl, self.ep_group = args, backend, attn_impl, ep_group
        self.lm_head = Linear(args.hidden_size, args.vocab_size, args.torch_dtype, False, backend)
        self.model = DeepseekV3Model(args, backend, attn_impl, self.lm_head, ep_group)
        self.register_buffer("rope_freqs", rope_frequencies(args), persistent=False)
        self.rope_scale = rope_attention_factor(args)
        for module in self.modules():
            if isinstance(module, Linear):
                module.fp8_activations = fp8_activations and module.kernel_fallback is None
        self.uses_mla_decode = backend == "kernels" and mla_decode_fallback(args) is None
        fallbacks = "; ".join(f"{op}: {why}" for op, why in self.kernel_fallbacks().items())
        if fallbacks:
            warnings.warn("backend 'kernels': these ops run the reference implementation, their shapes are "
                          f"outside the kernels' contract: {fallbacks}", stacklevel=2)

    def kernel_fallbacks(self) -> Dict[str, str]:
        """Kernels backend: op (modules as layers.*.name) -> why it runs on the reference math ({} for
        the reference backend, and for configs the kernels fully cover)."""
        if self.backend != "kernels":
            return {}
        out = {}
        if not self.uses_mla_decode:
            out["mla_cache_append / mla_decode"] = mla_decode_fallback(self.args)
        moe_why = grouped_experts_fallback(self.args)
        for name, module in self.named_modules():
            where = re.sub(r"\.\d+\.", ".*.", name)
            if isinstance(module, Linear) and module.is_fp8 and module.kernel_fallback:
                out[f"fp8_linear {where}"] = module.kernel_fallback
            elif isinstance(module, MoE) and self.args.fp8 and moe_why:
                out[f"grouped FP8 experts {where}"] = moe_why
        return out

    @property
    def main_layers(self):
        return self.model.layers[:self.args.num_hidden_layers]

    @property
    def mtp(self) -> Optional[MTPLayer]:
        return self.model.layers[-1] if self.args.num_nextn_predict_layers else None

    def context(self, batch: int, seq: int, device, start_pos=None, block_table=None, decode=False) -> AttnContext:
        start = torch.zeros(batch, dtype=torch.long, device=device) if start_pos is None else start_pos.long()
        positions = start[:, None] + torch.arange(seq, device=device)  # [B, S]
        angles = positions[..., None].float() * self.rope_freqs  # [B, S, dr/2]
        ctx = AttnContext(positions, angles.cos() * self.rope_scale, angles.sin() * self.rope_scale,
                          block_table, decode, contiguous=True)
        if decode and self.uses_mla_decode:
            ctx.mla_metadata = deepseek_ops.get_mla_metadata(ctx.cache_seqlens, seq, self.args.num_attention_heads)
        return ctx

    def forward(self, tokens: torch.Tensor, start_pos: Optional[torch.Tensor] = None,
                block_table: Optional[torch.Tensor] = None, decode: bool = False):
        """tokens [B, S] -> (logits [B, S, V] fp32, hidden [B, S, D] after the final norm).

        Without block_table: a plain causal forward over tokens. With it: the latents are written
        to the paged cache at positions start_pos[b] + j; decode=True also reads keys from it.
        """
        b, s = tokens.shape
        ctx = self.context(b, s, tokens.device, start_pos, block_table, decode)
        h = self.model.embed_tokens(tokens)  # [B, S, D]
        for layer in self.main_layers:
            h = layer(h, ctx)
        h = self.model.norm(h)
        return self.lm_head(h).float(), h

    def forward_mtp(self, hidden: torch.Tensor, next_tokens: torch.Tensor, start_pos=None, block_table=None,
                    decode: bool = False):
        """MTP logits [B, S, V] for token i+2 from hidden [B, S, D] at i and next_tokens [B, S] (i+1)."""
        b, s = next_tokens.shape
        return self.mtp.predict(hidden, next_tokens, self.context(b, s, hidden.device, start_pos, block_table, decode))

    # --- state -----------------------------------------------------------------------------------
    def setup_cache(self, num_blocks: int, dtype: Optional[torch.dtype] = None) -> None:
        """Allocates every layer's paged latent cache [num_blocks, 64, 1, R + dr] (zeros). A cache of at
        least num_blocks pages (same width, dtype and device) is zeroed and kept instead: captured step
        graphs (model/step_graphs.py) read it by address, so generate calls of smaller batches (GRPO's
        evaluation between its rollouts) keep them valid. The memory is that of the largest call.

        dtype torch.uint8: the packed FP8 cache of deepseek_ops.mla_decode, [num_blocks, 64, 1, 656]
        (kernels backend with mla_decode only: the latents are quantized as they are written).
        """
        device = self.model.embed_tokens.weight.device
        dtype = dtype or (torch.bfloat16 if self.backend == "kernels" else self.args.torch_dtype)
        width = self.args.kv_lora_rank + self.args.qk_rope_head_dim
        if dtype == torch.uint8:
            if not self.uses_mla_decode:
                raise ValueError("argument 'dtype': the FP8 cache (torch.uint8) needs the kernels backend's "
                                 f"mla_decode, got backend {self.backend!r}"
                                 + (f" ({mla_decode_fallback(self.args)})" if self.backend == "kernels" else ""))
            width = MLA_FP8_TOKEN_BYTES
        shape = (num_blocks, PAGE_SIZE, 1, width)
        for layer in self.model.layers:
            cache = layer.self_attn.kv_cache
            if (cache is not None and cache.shape[0] >= num_blocks and cache.shape[1:] == shape[1:]
                    and cache.dtype == dtype and cache.device == device):
                cache.zero_()  # every page: the kernels clamp a bad page id into the cache, which reads zeros
            else:
                layer.self_attn.kv_cache = torch.zeros(shape, dtype=dtype, device=device)

    def prepare(self) -> "Transformer":
        """Derived weights the backend needs (call after weights change): the kernels backend stacks
        FP8 experts and dequantizes kv_b once (the absorbed projections need it dense)."""
        set_derived(self, "rope_freqs", rope_frequencies(self.args).to(self.model.embed_tokens.weight.device))
        if self.backend == "kernels":
            for layer in self.model.layers:
                attn = layer.self_attn
                set_derived(attn, "wkv_b_dense",
                            attn.kv_b_proj.dense_weight(torch.bfloat16) if attn.kv_b_proj.is_fp8 else None)
                if isinstance(layer.mlp, MoE):
                    layer.mlp.prepare_kernels()
        return self

    def dequantize_(self, dtype: Optional[torch.dtype] = None) -> "Transformer":
        """Turns every FP8 linear into a float one (the reference backend's fast path on GPU)."""
        for module in self.modules():
            if isinstance(module, Linear) and module.is_fp8:
                module.weight = nn.Parameter(module.dense_weight(dtype or self.args.torch_dtype), requires_grad=False)
                module.weight_scale_inv = None
        return self.prepare()


# ----------------------------------------------------------------------------------------------
# Random initialization
# ----------------------------------------------------------------------------------------------
RESIDUAL_INIT_SCALE = 0.1


@torch.no_grad()
def init_random_(model: nn.Module, seed: Optional[int] = None) -> nn.Module:
    """Fills every parameter of a Transformer (or any block of one) with random values of a
    realistic scale, on the parameters' device; FP8 linears get a random float weight quantized
    per 128 x 128 block (the checkpoint convention). With a seed, each module draws from its own
    generator seeded by (seed, module name): the same weights whichever modules a process holds
    (expert-parallel ranks hold only their experts)."""
    device = next(model.parameters()).device
    generator = None

    def randn(*shape, std=1.0):
        if generator is not None:
            return (torch.randn(*shape, generator=generator) * std).to(device)
        return torch.randn(*shape, device=device) * std

    for name, module in model.named_modules():
        if seed is not None:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if isinstance(module, Linear):
            # Projections back into the residual stream start small (cf. GPT-2's residual scaling) so
            # the stream stays dominated by the embedding: a random model then is not chaotic, and
            # backends that differ by rounding agree on argmax tokens as trained models do.
            std = module.in_features ** -0.5 * (RESIDUAL_INIT_SCALE if name.endswith(("o_proj", "down_proj")) else 1)
            w = randn(module.out_features, module.in_features, std=std)
            if module.is_fp8:
                module.weight.data, module.weight_scale_inv.data = ops_ref.per_block_quant_fp8(w, FP8_BLOCK, False)
            else:
                module.weight.data = w.to(module.weight.dtype)
            del w
        elif isinstance(module, RMSNorm):
            module.weight.data = (1 + randn(module.weight.shape[0], std=0.1)).to(module.weight.dtype)
        elif isinstance(module, Embedding):
            module.weight.data = randn(*module.weight.shape).to(module.weight.dtype)
        elif isinstance(module, Gate):
            module.weight.data = randn(*module.weight.shape, std=module.weight.shape[1] ** -0.5).to(module.weight.dtype)
            module.e_score_correction_bias.data = randn(module.weight.shape[0], std=0.05)
    return model.prepare() if isinstance(model, Transformer) else model


def random_model(args: Optional[ModelArgs] = None, backend: str = "reference", attn_impl: str = "absorbed",
                 device="cpu", seed: Optional[int] = None, ep_group=None) -> Transformer:
    """A randomly initialized model for any config (the tiny preset by default)."""
    with torch.device(device):
        model = Transformer(args or preset("tiny"), backend, attn_impl, ep_group=ep_group)
    return init_random_(model, seed)


def use_batched_experts(model: nn.Module) -> nn.Module:
    """Routes the model's MoE layers through MoE.experts_batched (the same sum as the per-expert loop, in
    another order): for training float weights on the GPU. Raises for experts with FP8 weights or in FP8
    training (experts_batched reads the float weights directly)."""
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            if any(isinstance(m, Linear) and (m.is_fp8 or m.fp8_training) for m in module.experts.modules()):
                raise ValueError(f"use_batched_experts: {name} has FP8 expert linears; it batches float ones")
            module.batched_experts = True
    return model
