"""Plain-PyTorch reference of every op: obviously correct, device-agnostic, registered as the CPU kernels.

The CUDA kernels must agree with these: bit for bit for quantization and data movement, within
the documented tolerance for GEMMs and attention (computed here in float64).
"""
import torch

from deepseek_ops.constants import (FP8_MAX, FP8_SCALE_FLOOR, MLA_FP8_SCALE_FLOOR, MLA_FP8_TOKEN_BYTES,
                                    MLA_HEAD_DIM_QK, MLA_HEAD_DIM_V, MLA_PAGE_SIZE)

FP8 = torch.float8_e4m3fn


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Rounds positive fp32 scales up to the next power of two, exactly (no log2 rounding); +inf (an
    infinite amax) stays +inf, as in the device rounding (csrc/fp8_recipe.cuh)."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    power = ((exponent + 127).to(torch.int32) << 23).view(torch.float32)
    return torch.where(torch.isfinite(scale), power, scale)


def _scale_from_amax(amax: torch.Tensor, ue8m0: bool, floor: float = FP8_SCALE_FLOOR) -> torch.Tensor:
    # Tensor / tensor: an IEEE division on every device (CUDA torch turns "/ scalar" into a
    # multiply by the reciprocal, which can differ in the last bit).
    scale = torch.clamp(amax, min=floor) / torch.full_like(amax, FP8_MAX)
    return round_scale_ue8m0(scale) if ue8m0 else scale


def _quantize(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """values * (1 / scale), each step rounded in fp32, then round-to-nearest-even into e4m3."""
    return (values * torch.reciprocal(scales)).to(FP8)


def column_major_scales(scales: torch.Tensor) -> torch.Tensor:
    """[M, G] scales stored as [G, align(M, 4)]: the M-major layout the GEMMs read (deepseek_ops/gemm.py)."""
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


def silu_mul_quant_fp8(h: torch.Tensor, ue8m0: bool, column_major: bool):
    """h [M, 2K] (gate | up) -> the 1 x 128 quantization of silu(gate) * up, rounded to h's dtype first."""
    gate, up = h.chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate.float()) * up.float()).to(h.dtype)
    return per_token_group_quant_fp8(act, 128, ue8m0, column_major)


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


# ---------------------------------------------------------------------------------------------
# MLA decode on a paged latent cache
# ---------------------------------------------------------------------------------------------

MLA_SPLIT_OVERHEAD_TILES = 5
MLA_MAX_SEQLEN = 1 << 24


def quantize_mla_kv(kv: torch.Tensor) -> torch.Tensor:
    """bf16 [..., 576] -> packed FP8 tokens uint8 [..., 656] (layout in csrc/sm90_mla_cache.h): the
    latent in 1 x 128 groups with the activations' recipe and ue8m0 scales (powers of two, rounded
    up), so dequantizing (e4m3 * scale) is exact."""
    lead = kv.shape[:-1]
    flat = kv.reshape(-1, MLA_HEAD_DIM_QK)
    groups = flat[:, :MLA_HEAD_DIM_V].float().reshape(-1, 4, 128)
    scales = _scale_from_amax(groups.abs().amax(dim=-1), ue8m0=True, floor=MLA_FP8_SCALE_FLOOR)  # [T, 4]
    values = _quantize(groups, scales.unsqueeze(-1)).reshape(-1, MLA_HEAD_DIM_V)
    packed = torch.cat([values.view(torch.uint8), scales.contiguous().view(torch.uint8),
                        flat[:, MLA_HEAD_DIM_V:].contiguous().view(torch.uint8)], dim=1)
    return packed.reshape(*lead, MLA_FP8_TOKEN_BYTES)


def dequantize_mla_kv(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP8 tokens uint8 [..., 656] -> bf16 [..., 576]: bf16(e4m3 * scale), rounded in fp32 then
    bf16 as the kernel multiplies (exact for the power-of-two scales quantize_mla_kv writes)."""
    lead = packed.shape[:-1]
    flat = packed.reshape(-1, MLA_FP8_TOKEN_BYTES)
    values = flat[:, :MLA_HEAD_DIM_V].contiguous().view(FP8).float().reshape(-1, 4, 128)
    scales = flat[:, MLA_HEAD_DIM_V:MLA_HEAD_DIM_V + 16].contiguous().view(torch.float32)  # [T, 4]
    latent = (values * scales.unsqueeze(-1)).to(torch.bfloat16).reshape(-1, MLA_HEAD_DIM_V)
    rope = flat[:, MLA_HEAD_DIM_V + 16:].contiguous().view(torch.bfloat16)
    return torch.cat([latent, rope], dim=1).reshape(*lead, MLA_HEAD_DIM_QK)


def _mla_num_tiles(seqlen: int) -> int:
    seqlen = min(max(seqlen, 0), MLA_MAX_SEQLEN)
    return max(1, -(-seqlen // MLA_PAGE_SIZE))


def get_mla_metadata(cache_seqlens: torch.Tensor, num_sm_parts: int):
    """The split-KV schedule, exactly as the CUDA kernel computes it.

    Work = 64-token tiles (at least one per request) + a fixed overhead per split, cut into
    num_sm_parts contiguous pieces of equal cost over (request, tile) order; the last piece takes
    what is left. Returns tile_sched int32 [num_sm_parts, 8] = (begin_req, begin_tile, end_req,
    end_tile (exclusive), begin_split, 0, 0, 0) (an empty part is (batch, 0, -1, 0, 0)) and
    split_offsets int32 [batch + 1], the prefix sums of the number of splits per request.
    """
    seqlens = cache_seqlens.tolist()
    batch = len(seqlens)
    tiles = [_mla_num_tiles(s) for s in seqlens]
    total = sum(t + MLA_SPLIT_OVERHEAD_TILES for t in tiles)
    per_part = -(-total // num_sm_parts) + MLA_SPLIT_OVERHEAD_TILES
    sched = torch.zeros(num_sm_parts, 8, dtype=torch.int32)
    offsets = [0] * (batch + 1)
    req = tile = split = done = 0
    for part in range(num_sm_parts):
        begin = (req, tile, split)
        end_req, end_tile = -1, 0
        budget = float("inf") if part == num_sm_parts - 1 else per_part
        while req < batch:
            left = tiles[req] - tile
            if budget >= left + MLA_SPLIT_OVERHEAD_TILES:
                budget -= left + MLA_SPLIT_OVERHEAD_TILES
                end_req, end_tile = req, tiles[req]
                done += split + 1
                offsets[req + 1] = done
                req, tile, split = req + 1, 0, 0
            else:
                take = budget - MLA_SPLIT_OVERHEAD_TILES
                if take > 0:
                    tile += int(take)
                    end_req, end_tile = req, tile
                    split += 1
                break
        if end_req < 0:
            sched[part, :5] = torch.tensor([batch, 0, -1, 0, 0])
        else:
            sched[part, :5] = torch.tensor([begin[0], begin[1], end_req, end_tile, begin[2]])
    return sched.to(cache_seqlens.device), torch.tensor(offsets, dtype=torch.int32, device=cache_seqlens.device)


def gather_mla_cache(kv_cache: torch.Tensor, block_table: torch.Tensor, req: int, seqlen: int) -> torch.Tensor:
    """The first `seqlen` tokens of request `req`, [seqlen, 576] (bf16, or dequantized FP8). Page
    indices out of [0, num_blocks) are clamped into it, as the CUDA kernel does."""
    pages = block_table[req, :-(-seqlen // MLA_PAGE_SIZE)].long().clamp(0, kv_cache.shape[0] - 1)
    tokens = kv_cache[pages].reshape(-1, kv_cache.shape[-1])[:seqlen]
    return dequantize_mla_kv(tokens) if kv_cache.dtype == torch.uint8 else tokens


def mla_visible_seqlen(cache_seqlen: int, num_blocks: int, max_blocks: int) -> int:
    """The tokens of a request that attention reads: cache_seqlen clamped into [0, 64 * max_blocks]
    (a request never reads past its block-table row), 0 for an empty cache (the CUDA kernel's rule)."""
    return min(max(cache_seqlen, 0), MLA_PAGE_SIZE * max_blocks) if num_blocks > 0 else 0


def mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale: float, causal: bool,
               tile_sched, split_offsets, out):
    """Materialized attention per request in float64; writes out (bf16) and returns lse (natural log).

    Query i of s_q sees keys < seqlen - s_q + 1 + i when causal (bottom-right aligned); a row
    with no visible key gives out = 0 and lse = +inf. Values the public function rejects on the
    host are treated as the CUDA kernel treats them (mla_visible_seqlen, gather_mla_cache), so a
    direct call gives the GPU's result for the same garbage.
    """
    batch, s_q, h_q, _ = q.shape
    lse = torch.empty(batch, h_q, s_q, dtype=torch.float32, device=q.device)
    for b in range(batch):
        seqlen = mla_visible_seqlen(int(cache_seqlens[b]), kv_cache.shape[0], block_table.shape[1])
        kv = gather_mla_cache(kv_cache, block_table, b, seqlen).double()  # [N, 576]
        scores = torch.einsum("shd,nd->shn", q[b].double(), kv) * softmax_scale  # [s_q, h_q, N]
        key = torch.arange(seqlen, device=q.device)
        limit = torch.full((s_q,), seqlen, device=q.device)
        if causal:
            limit = seqlen - s_q + 1 + torch.arange(s_q, device=q.device)
        visible = key[None, :] < limit[:, None]  # [s_q, N]
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1) if seqlen > 0 else scores.new_full((s_q, h_q), float("-inf"))
        has_keys = visible.any(dim=-1)[:, None].expand(s_q, h_q)  # [s_q, h_q]
        probs = torch.where(has_keys[..., None], torch.exp(scores - row_lse[..., None]), 0.0)
        out[b] = torch.einsum("shn,nd->shd", probs, kv[:, :MLA_HEAD_DIM_V]).to(out.dtype)
        lse[b] = torch.where(has_keys, row_lse, float("inf")).t().float()
    return lse


def mla_cache_append(kv_cache, block_table, positions, c_kv, k_pe):
    """Writes token (b, s) = cat(c_kv[b, s], k_pe[b, s]) at position positions[b, s] of request b."""
    batch, tokens, _ = c_kv.shape
    for b in range(batch):
        for s in range(tokens):
            pos = int(positions[b, s])
            if pos < 0 or pos // MLA_PAGE_SIZE >= block_table.shape[1]:
                continue
            page = int(block_table[b, pos // MLA_PAGE_SIZE])
            if not 0 <= page < kv_cache.shape[0]:
                continue
            token = torch.cat([c_kv[b, s], k_pe[b, s]])[None]
            if kv_cache.dtype == torch.uint8:
                token = quantize_mla_kv(token)
            kv_cache[page, pos % MLA_PAGE_SIZE, 0] = token[0]


# ---- Expert parallelism (deepseek_ops.ep): layout counting, dispatch permutation, combine ----

def ep_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """topk_idx [T, topk] int64 (-1: no expert) -> (num_tokens_per_rank int32 [R],
    num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R]); experts contiguous per rank."""
    t = topk_idx.shape[0]
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    experts = torch.where(valid, topk_idx, torch.zeros_like(topk_idx))
    one_hot = torch.zeros(t, num_experts, dtype=torch.int32, device=topk_idx.device)
    one_hot.scatter_add_(1, experts, valid.to(torch.int32))  # [T, E]: pairs of each token per expert
    num_tokens_per_expert = one_hot.sum(0, dtype=torch.int32)
    is_token_in_rank = one_hot.reshape(t, num_ranks, num_experts // num_ranks).sum(-1) > 0  # [T, R]
    return is_token_in_rank.sum(0, dtype=torch.int32), num_tokens_per_expert, is_token_in_rank


def ep_permute(x: torch.Tensor, x_scales, topk_weights, topk_idx: torch.Tensor, num_experts: int,
               alignment: int, num_rows: int):
    """Dispatch on one GPU: every (token, k) pair with 0 <= expert < num_experts becomes one row of
    recv_x, rows grouped by expert (ascending), each group padded to `alignment` rows, pairs of one
    expert in (token, k) order; rows past the groups up to num_rows are padding.

    Returns recv_x [num_rows, H] (padding rows zero), recv_scales [num_rows, G] ([num_rows, 0]
    without x_scales), recv_weights fp32 [num_rows] ([0] without topk_weights; padding 0),
    m_indices int32 [num_rows] (expert of each row, -1 padding), row_of int32 [T, topk] (row of
    each pair, -1 for none), num_tokens_per_expert int32 [E] (unpadded counts).
    """
    t, topk = topk_idx.shape
    device = topk_idx.device
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    flat_expert = torch.where(valid, topk_idx, torch.full_like(topk_idx, num_experts)).reshape(-1)
    counts = torch.bincount(flat_expert, minlength=num_experts + 1)[:num_experts]
    padded = (counts + alignment - 1) // alignment * alignment
    starts = torch.cumsum(padded, 0) - padded  # first row of each expert's group
    order = torch.sort(flat_expert, stable=True).indices  # pairs grouped by expert, (t, k) order kept
    sorted_expert = flat_expert[order]
    num_valid = int(valid.sum())
    order, sorted_expert = order[:num_valid], sorted_expert[:num_valid]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(num_valid, device=device) - first_of_expert[sorted_expert]
    rows = starts[sorted_expert] + rank_in_expert
    if num_valid and int(rows.max()) >= num_rows:
        raise ValueError(f"ep_permute: {int(rows.max()) + 1} rows needed, num_rows is {num_rows}")
    row_of = torch.full((t * topk,), -1, dtype=torch.int32, device=device)
    row_of[order] = rows.to(torch.int32)
    src_token = order // topk

    x_bytes = x.contiguous().view(torch.uint8)  # rows move as bytes (fp8 has no CUDA index kernels)
    recv_bytes = x_bytes.new_zeros((num_rows, x_bytes.shape[1]))
    recv_bytes[rows] = x_bytes[src_token]
    recv_x = recv_bytes.view(x.dtype)
    groups = x_scales.shape[1] if x_scales is not None else 0
    recv_scales = torch.zeros(num_rows, groups, dtype=torch.float32, device=device)
    if x_scales is not None:
        recv_scales[rows] = x_scales.float()[src_token]
    recv_weights = torch.zeros(num_rows if topk_weights is not None else 0, dtype=torch.float32, device=device)
    if topk_weights is not None:
        recv_weights[rows] = topk_weights.float().reshape(-1)[order]
    m_indices = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
    m_indices[rows] = sorted_expert.to(torch.int32)
    return (recv_x, recv_scales, recv_weights, m_indices, row_of.reshape(t, topk),
            counts.to(torch.int32))


def ep_combine(y: torch.Tensor, row_of: torch.Tensor, topk_weights: torch.Tensor):
    """out[t] = sum over k with 0 <= row_of[t, k] < rows of y of topk_weights[t, k] * y[row_of[t, k]],
    accumulated in fp32 in k order (each product and each sum rounded to fp32), cast to y's dtype.
    Rows out of range are skipped like -1, as the CUDA kernel does."""
    t, topk = row_of.shape
    acc = torch.zeros(t, y.shape[1], dtype=torch.float32, device=y.device)
    if y.shape[0] == 0:  # no rows: no pair has an expert
        return acc.to(y.dtype)
    for k in range(topk):
        rows = row_of[:, k].long()
        has = (rows >= 0) & (rows < y.shape[0])
        gathered = y[torch.where(has, rows, 0)].float()
        product = topk_weights[:, k].float().unsqueeze(1) * gathered
        acc = torch.where(has.unsqueeze(1), acc + product, acc)
    return acc.to(y.dtype)


def moe_dense(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, expert_fn) -> torch.Tensor:
    """The whole expert-parallel exchange without any exchange: out[t] = sum_k w[t, k] *
    expert_fn(expert, x[t]) over k with an expert (expert_fn output rounded to x's dtype, as an expert
    GEMM would), fp32 accumulation in k order. The reference of combine(f(dispatch(x)))."""
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(topk_idx.shape[1]):
        for e in torch.unique(topk_idx[:, k]).tolist():
            if e < 0:
                continue
            tokens = (topk_idx[:, k] == e).nonzero().squeeze(1)
            out = expert_fn(e, x[tokens]).to(x.dtype).float()
            acc[tokens] = acc[tokens] + topk_weights[tokens, k].float().unsqueeze(1) * out
    return acc.to(x.dtype)


# ---- FP8 GEMMs (DeepSeek-V3 scaling: 1 x 128 groups on a, 128 x 128 blocks on b) ----------------

def _dequant_fp8_a(a: torch.Tensor, a_scales: torch.Tensor) -> torch.Tensor:
    """a [..., M, K] e4m3 * a_scales [..., M, K/128] -> float64 (scale layout irrelevant here)."""
    return a.double() * a_scales.double().repeat_interleave(128, dim=-1)


def _dequant_fp8_b(b: torch.Tensor, b_scales: torch.Tensor) -> torch.Tensor:
    """b [N, K] e4m3 * b_scales [ceil(N/128), K/128] -> float64."""
    n, k = b.shape
    return b.double() * expand_block_scales(b_scales.double(), n, k)


def fp8_gemm(a, a_scales, b, b_scales, out_dtype, c=None):
    """d = (a * a_scales) @ (b * b_scales)^T (+ c), in float64, cast to out_dtype."""
    d = _dequant_fp8_a(a, a_scales) @ _dequant_fp8_b(b, b_scales).T
    if c is not None:
        d = d + c.double()
    return d.to(out_dtype)


def fp8_gemm_out(a, a_scales, b, b_scales, c, out):
    out.copy_(fp8_gemm(a, a_scales, b, b_scales, out.dtype, c))


def grouped_fp8_gemm_contiguous_out(a, a_scales, b, b_scales, m_indices, out):
    """Rows r with m_indices[r] = g get (a[r] * a_scales[r]) @ (b[g] * b_scales[g])^T; rows of
    padding (-1, or a group index out of range) are left untouched."""
    rows = torch.arange(a.shape[0], device=a.device)
    for g in range(b.shape[0]):
        sel = rows[m_indices.long() == g]
        if sel.numel():
            out[sel] = fp8_gemm(a[sel], a_scales[sel], b[g], b_scales[g], out.dtype)


def grouped_fp8_gemm_contiguous(a, a_scales, b, b_scales, m_indices):
    """As grouped_fp8_gemm_contiguous_out into a zero-filled bf16 [sum_M, N] (padding rows stay 0)."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16, device=a.device)
    grouped_fp8_gemm_contiguous_out(a, a_scales, b, b_scales, m_indices, out)
    return out


def grouped_fp8_gemm_masked_out(a, a_scales, b, b_scales, masked_m, expected_m, out):
    """out[g, :masked_m[g]] = (a[g] * a_scales[g]) @ (b[g] * b_scales[g])^T; other rows untouched."""
    for g, rows in enumerate(masked_m.tolist()):
        rows = max(0, min(rows, a.shape[1]))
        if rows:
            out[g, :rows] = fp8_gemm(a[g, :rows], a_scales[g, :rows], b[g], b_scales[g], out.dtype)


def grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, expected_m):
    """As grouped_fp8_gemm_masked_out into a zero-filled bf16 [G, M_max, N] (rows past masked_m stay 0)."""
    out = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=torch.bfloat16, device=a.device)
    grouped_fp8_gemm_masked_out(a, a_scales, b, b_scales, masked_m, expected_m, out)
    return out


# ---- FP8 training: the backward GEMMs (weight gradient over tokens, input gradient through W) -----

def transpose_quant_fp8(x: torch.Tensor):
    """x [T, C] -> x^T [C, T_pad] e4m3 with one scale per 1 x 128 group along the token axis
    (scales fp32 [C, T_pad / 128]), T_pad = T rounded up to 128, padding tokens zero: exactly
    per_token_group_quant_fp8 of the zero-padded transpose."""
    t, c = x.shape
    padded = x.new_zeros((c, -(-t // 128) * 128), dtype=torch.float32)
    padded[:, :t] = x.t().float()
    return per_token_group_quant_fp8(padded, 128, False, False)



def swiglu_backward(dact: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dh = [dgate | dup] [M, 2K] in h's dtype: what autograd of act = (silu(gate.float()) * up.float()).to(h.dtype)
    gives for h = [gate | up] [M, 2K] and dact [M, K], op by op (silu_backward of dact * up; dact * silu(gate))."""
    gate, up = h.float().chunk(2, dim=-1)
    d = dact.float()
    dgate = torch.ops.aten.silu_backward(d * up, gate)
    dup = d * torch.nn.functional.silu(gate)
    return torch.cat([dgate, dup], dim=-1).to(h.dtype)


def swiglu_backward_quant_fp8(dact: torch.Tensor, h: torch.Tensor, transposed: bool):
    """dh = swiglu_backward(dact, h) quantized for the gate/up projection's backward GEMMs:
    per_token_group_quant_fp8(dh, 128) (the dgrad operand) and, if `transposed`, transpose_quant_fp8(dh)
    (the wgrad operand; else empty [2K, 0] tensors)."""
    dh = swiglu_backward(dact, h)
    dh_fp8, dh_scales = per_token_group_quant_fp8(dh, 128, False, False)
    if transposed:
        return (dh_fp8, dh_scales, *transpose_quant_fp8(dh))
    channels = dh.shape[1]
    return dh_fp8, dh_scales, dh.new_empty((channels, 0), dtype=FP8), dh.new_empty((channels, 0), dtype=torch.float32)

def fp8_gemm_wgrad(a, a_scales, b, b_scales, c=None):
    """dW = (a * a_scales) @ (b * b_scales)^T (+ c) in float64, fp32 out: a [N, T] (dy^T) and
    b [K, T] (x^T), both scaled per 1 x 128 along T."""
    d = _dequant_fp8_a(a, a_scales) @ _dequant_fp8_a(b, b_scales).T
    if c is not None:
        d = d + c.double()
    return d.float()


def fp8_gemm_wgrad_out(a, a_scales, b, b_scales, c, out):
    out.copy_(fp8_gemm_wgrad(a, a_scales, b, b_scales, c))


def k_grouped_fp8_gemm_wgrad(a, a_scales, b, b_scales, group_offsets, c=None):
    """out[g] = fp8_gemm_wgrad over the token range [group_offsets[g], group_offsets[g+1]) (+ c[g]):
    a [N, sum_T], b [K, sum_T], out fp32 [G, N, K]. An empty range gives c[g] (or zeros)."""
    offsets = group_offsets.tolist()
    num_groups = len(offsets) - 1
    out = torch.zeros(num_groups, a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for g in range(num_groups):
        lo, hi = offsets[g], offsets[g + 1]
        blocks = slice(lo // 128, hi // 128)
        out[g] = fp8_gemm_wgrad(a[:, lo:hi], a_scales[:, blocks], b[:, lo:hi], b_scales[:, blocks],
                                None if c is None else c[g])
    return out


def k_grouped_fp8_gemm_wgrad_out(a, a_scales, b, b_scales, group_offsets, c, out):
    out.copy_(k_grouped_fp8_gemm_wgrad(a, a_scales, b, b_scales, group_offsets, c))


def fp8_gemm_dgrad(dy, dy_scales, w, w_scales, out_dtype):
    """dx = (dy * dy_scales) @ (w * w_scales) in float64: dy [M, N] per 1 x 128 along N, w [N, K]
    with 128 x 128 block scales (the forward's weight, not transposed)."""
    return (_dequant_fp8_a(dy, dy_scales) @ _dequant_fp8_b(w, w_scales)).to(out_dtype)


def grouped_fp8_gemm_dgrad_contiguous(dy, dy_scales, w, w_scales, m_indices):
    """Rows r with m_indices[r] = g get fp8_gemm_dgrad(dy[r], w[g]) in bf16; other rows zero."""
    out = torch.zeros(dy.shape[0], w.shape[2], dtype=torch.bfloat16, device=dy.device)
    rows = torch.arange(dy.shape[0], device=dy.device)
    for g in range(w.shape[0]):
        sel = rows[m_indices.long() == g]
        if sel.numel():
            out[sel] = fp8_gemm_dgrad(dy[sel], dy_scales[sel], w[g], w_scales[g], torch.bfloat16)
    return out
