"""MLA decode attention on a paged latent KV cache, and the cache writes that feed it.

Absorbed MLA is an MQA with one KV head: each query head is 576 wide (q_nope absorbed through
W_UK into the 512-wide latent space, plus the 64-wide q_pe), K is the cached 576-wide latent of a
token and V its first 512 entries. The cache is paged, 64 tokens a page:

* bf16 cache: [num_blocks, 64, 1, 576] torch.bfloat16.
* FP8 cache:  [num_blocks, 64, 1, 656] torch.uint8, one packed token per row: 512 e4m3 latent
  values, 4 fp32 scales, 64 bf16 RoPE values. Each scale covers 128 latent values and is a power of
  two (ue8m0, as in DeepSeek's own FP8 cache): max(amax, 1e-4) / 448 rounded up, so 2**-22 for an
  all-zero group and at most 2**120 for bf16 input; values are round-to-nearest-even e4m3 of
  x / scale (exact division). Write it with quantize_mla_kv or mla_cache_append; the kernel
  multiplies bf16(e4m3 * scale), which is exact for these scales (any fp32 scale is read the same
  way), except that latents within 1/32 of bf16's largest value round to 2**128 and read back as inf.

Values: block_table[b, :ceil(cache_seqlens[b] / 64)] must name request b's pages, each in
[0, num_blocks), and metadata must be get_mla_metadata of these cache_seqlens. Where the values can
be read without a device sync (CPU tensors), mla_decode checks them and raises a ValueError naming
block_table, cache_seqlens or metadata. Where they live on the GPU nothing is checked before
launch; the kernel never reads past a request's block-table row (lengths are clamped into
[0, 64 * its columns]), clamps page indices into [0, num_blocks) (-1 reads page 0), and clamps what
it reads from metadata (requests into [0, B), splits into its workspaces), so a bad entry gives
wrong values, never an out-of-bounds access. The reference (the CPU kernel behind
torch.ops.deepseek_ops.mla_decode) applies the same clamps, so a direct call on CPU gives the
GPU's result for the same garbage. Tokens at or past cache_seqlens are never read, whatever their
pages hold.
"""
from typing import Optional, Tuple

import torch

from deepseek_ops import reference
from deepseek_ops._checks import (aligned16, can_read_values, check_aligned16, check_contiguous, check_cuda_arch,
                                  check_dim, check_same_device, check_shape, check_tensor)
from deepseek_ops._registry import register_op
from deepseek_ops.constants import MLA_FP8_TOKEN_BYTES, MLA_HEAD_DIM_QK, MLA_HEAD_DIM_V, MLA_PAGE_SIZE

_ops = torch.ops.deepseek_ops

_BLOCK_ROWS = 64  # packed query rows (s_q * h_q) per CTA
_CPU_NUM_SMS = 132  # the schedule of a CPU call is the one an H100/H200 would get

MlaMetadata = Tuple[torch.Tensor, torch.Tensor]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_NUM_SMS


def _num_sm_parts(device: torch.device, s_q: int, h_q: int) -> int:
    head_blocks = -(-(s_q * h_q) // _BLOCK_ROWS)
    return max(1, _num_sms(device) // head_blocks)


def get_mla_metadata(cache_seqlens: torch.Tensor, s_q: int, h_q: int) -> MlaMetadata:
    """The split-KV schedule of mla_decode for this batch: reuse it across the layers of a decode step.

    cache_seqlens: int32 [B] (on the GPU: computed there, no host sync). s_q, h_q: the query shape
    that mla_decode will get. Returns (tile_sched int32 [num_sm_parts, 8], split_offsets int32
    [B + 1]): the work (64-token pages plus a fixed cost per split) cut into one equal piece per
    SM, each piece a contiguous run of (request, page) so long requests are split and short ones
    share an SM (layout in deepseek_ops.reference.get_mla_metadata).
    """
    check_tensor("cache_seqlens", cache_seqlens, dtype=torch.int32, ndim=1)
    if s_q < 1 or h_q < 1:
        raise ValueError(f"arguments 's_q', 'h_q': expected positive sizes, got s_q={s_q}, h_q={h_q}")
    check_cuda_arch(cache_seqlens, "get_mla_metadata")
    return _ops.get_mla_metadata(cache_seqlens.contiguous(), _num_sm_parts(cache_seqlens.device, s_q, h_q))


def _check_cache(kv_cache: torch.Tensor):
    check_tensor("kv_cache", kv_cache, dtype=(torch.bfloat16, torch.uint8), ndim=4)
    check_dim("kv_cache", kv_cache, 1, MLA_PAGE_SIZE, "page size")
    check_dim("kv_cache", kv_cache, 2, 1, "one latent KV head")
    width = MLA_HEAD_DIM_QK if kv_cache.dtype == torch.bfloat16 else MLA_FP8_TOKEN_BYTES
    what = "head dim 576 (512 latent + 64 RoPE)" if width == MLA_HEAD_DIM_QK else "packed FP8 token bytes"
    check_dim("kv_cache", kv_cache, 3, width, what)
    check_contiguous("kv_cache", kv_cache, "it is read page by page in place")
    check_aligned16("kv_cache", kv_cache)


def _check_pages(block_table: torch.Tensor, cache_seqlens: torch.Tensor, num_blocks: int):
    """The pages each request reads (its first ceil(seqlen / 64) columns) are in the cache."""
    used = torch.arange(block_table.shape[1]) < (cache_seqlens.cpu()[:, None] + MLA_PAGE_SIZE - 1) // MLA_PAGE_SIZE
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"argument 'block_table': expected page indices in [0, {num_blocks}) (the cache's pages), "
                         f"got {int(block_table[b, col])} at [{b}, {col}], a page request {b} reads")


def _check_metadata(tile_sched: torch.Tensor, split_offsets: torch.Tensor, cache_seqlens: torch.Tensor):
    """The metadata is the schedule of these lengths: recomputed here and compared."""
    expected = _ops.get_mla_metadata(cache_seqlens, tile_sched.shape[0])
    for name, got, want in (("tile_sched", tile_sched, expected[0]), ("split_offsets", split_offsets, expected[1])):
        if not torch.equal(got, want):
            at = tuple(int(i) for i in (got != want).nonzero()[0])
            raise ValueError(f"argument 'metadata': expected get_mla_metadata of these cache_seqlens, got one built "
                             f"for other lengths ({name}{list(at)} is {int(got[at])}, expected {int(want[at])})")


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               softmax_scale: float, causal: bool = False, metadata: Optional[MlaMetadata] = None,
               out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over each request's paged latent cache; returns (out, lse).

    q: bf16 [B, s_q, h_q, 576] (s_q > 1 for MTP / speculative tokens). kv_cache: bf16
    [num_blocks, 64, 1, 576] or packed FP8 uint8 [num_blocks, 64, 1, 656] (module docstring).
    block_table: int32 [B, max_blocks], page indices of each request; the entries a request reads
    must be in [0, num_blocks) (checked where the values are on the host, clamped by the kernel on
    the GPU: module docstring). cache_seqlens: int32 [B] (on the host it is checked against
    block_table and copied to q's device). softmax_scale: required (DeepSeek-V3: 192 ** -0.5 *
    mscale ** 2). causal: query i of s_q sees keys < seqlen - s_q + 1 + i (bottom-right aligned).
    metadata: get_mla_metadata(cache_seqlens, s_q, h_q), computed here when None; given metadata is
    compared with one recomputed from cache_seqlens where all three are on the host (on the GPU it
    is read as given, and the kernel clamps the indices it takes from it). q may start anywhere (it
    is copied to a 16-byte aligned start when it does not); out: optional bf16 [B, s_q, h_q, 512]
    buffer, contiguous and 16-byte aligned (the kernel stores 16-byte vectors into it in place).
    Returns out bf16 [B, s_q, h_q, 512] and lse fp32 [B, h_q, s_q] (natural log); a query row with
    no visible key gets out = 0 and lse = +inf.
    """
    check_tensor("q", q, dtype=torch.bfloat16, ndim=4)
    check_dim("q", q, 3, MLA_HEAD_DIM_QK, "head dim 576 (512 latent + 64 RoPE)")
    batch, s_q, h_q, _ = q.shape
    if s_q < 1 or h_q < 1:
        raise ValueError(f"argument 'q': expected s_q >= 1 and h_q >= 1, got shape {tuple(q.shape)}")
    _check_cache(kv_cache)
    check_tensor("block_table", block_table, dtype=torch.int32, ndim=2)
    check_dim("block_table", block_table, 0, batch, "batch size of q")
    check_tensor("cache_seqlens", cache_seqlens, dtype=torch.int32, ndim=1)
    check_shape("cache_seqlens", cache_seqlens, (batch,))
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"argument 'softmax_scale': expected a positive float, got {softmax_scale!r}")
    check_same_device(q=q, kv_cache=kv_cache, block_table=block_table)
    if cache_seqlens.device != q.device:
        if cache_seqlens.device.type != "cpu":
            raise ValueError(f"argument 'cache_seqlens': expected device {q.device} or the host, "
                             f"got {cache_seqlens.device}")
    # Values on the host are checked; on the GPU they are never read here (no sync): the module
    # docstring's contract and the kernel's clamping apply.
    if batch > 0 and can_read_values(cache_seqlens):
        longest = int(cache_seqlens.max())
        if longest > MLA_PAGE_SIZE * block_table.shape[1]:
            raise ValueError(f"argument 'block_table': {block_table.shape[1]} columns hold "
                             f"{MLA_PAGE_SIZE * block_table.shape[1]} tokens, but cache_seqlens has a request "
                             f"of {longest} tokens (needs {-(-longest // MLA_PAGE_SIZE)} columns)")
        if int(cache_seqlens.min()) < 0:
            raise ValueError(f"argument 'cache_seqlens': expected lengths >= 0, got {int(cache_seqlens.min())}")
        if can_read_values(block_table):
            _check_pages(block_table, cache_seqlens, kv_cache.shape[0])
    cache_seqlens = cache_seqlens.to(q.device, non_blocking=True)
    if out is None:
        out = q.new_empty(batch, s_q, h_q, MLA_HEAD_DIM_V)
    else:
        check_tensor("out", out, dtype=torch.bfloat16, ndim=4, device=q.device)
        check_shape("out", out, (batch, s_q, h_q, MLA_HEAD_DIM_V))
        check_contiguous("out", out)
        check_aligned16("out", out)
    computed_here = metadata is None
    if computed_here:
        metadata = get_mla_metadata(cache_seqlens, s_q, h_q)
    tile_sched, split_offsets = metadata
    check_tensor("metadata[0]", tile_sched, dtype=torch.int32, ndim=2, device=q.device)
    check_dim("metadata[0]", tile_sched, 1, 8, "tile_sched columns")
    check_tensor("metadata[1]", split_offsets, dtype=torch.int32, ndim=1, device=q.device)
    check_shape("metadata[1]", split_offsets, (batch + 1,))
    expected_parts = _num_sm_parts(q.device, s_q, h_q)
    if tile_sched.shape[0] != expected_parts:
        raise ValueError(f"argument 'metadata': built for another query shape ({tile_sched.shape[0]} parts, "
                         f"expected {expected_parts} for s_q={s_q}, h_q={h_q}); call get_mla_metadata("
                         f"cache_seqlens, s_q={s_q}, h_q={h_q})")
    # Given metadata is compared with the lengths where its values are on the host; on the GPU the
    # kernel clamps every index it reads from it (wrong values, never an out-of-bounds access).
    if not computed_here and all(can_read_values(t) for t in (tile_sched, split_offsets, cache_seqlens)):
        _check_metadata(tile_sched, split_offsets, cache_seqlens)
    check_cuda_arch(q, "mla_decode")
    lse = _ops.mla_decode(aligned16(q), kv_cache, block_table.contiguous(), cache_seqlens.contiguous(),
                          float(softmax_scale), bool(causal), tile_sched.contiguous(), split_offsets.contiguous(),
                          out)
    return out, lse


def quantize_mla_kv(kv: torch.Tensor) -> torch.Tensor:
    """bf16 latent tokens [..., 576] -> packed FP8 tokens uint8 [..., 656] (format in the module docstring:
    power-of-two scales per 128 latent values).

    A whole bf16 cache [num_blocks, 64, 1, 576] becomes the FP8 cache [num_blocks, 64, 1, 656].
    """
    check_tensor("kv", kv, dtype=torch.bfloat16)
    if kv.dim() < 1 or kv.shape[-1] != MLA_HEAD_DIM_QK:
        raise ValueError(f"argument 'kv': expected a last dim of 576 (512 latent + 64 RoPE), got shape "
                         f"{tuple(kv.shape)}")
    check_cuda_arch(kv, "quantize_mla_kv")
    return _ops.quantize_mla_kv(aligned16(kv))


def mla_cache_append(kv_cache: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor,
                     c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """Writes new tokens into the paged cache in place (for an FP8 cache, quantized as quantize_mla_kv does).

    c_kv bf16 [B, S, 512], k_pe bf16 [B, S, 64]: the S new tokens of each request; positions
    int32 [B, S]: their positions in the request (token p goes to page block_table[b, p // 64],
    slot p % 64). Negative positions are skipped (padding), and so are positions whose page is
    not in block_table or not in the cache.
    """
    _check_cache(kv_cache)
    check_tensor("c_kv", c_kv, dtype=torch.bfloat16, ndim=3, device=kv_cache.device)
    check_dim("c_kv", c_kv, 2, MLA_HEAD_DIM_V, "latent dim")
    batch, tokens, _ = c_kv.shape
    check_tensor("k_pe", k_pe, dtype=torch.bfloat16, ndim=3, device=kv_cache.device)
    check_shape("k_pe", k_pe, (batch, tokens, MLA_HEAD_DIM_QK - MLA_HEAD_DIM_V))
    check_tensor("positions", positions, dtype=torch.int32, ndim=2, device=kv_cache.device)
    check_shape("positions", positions, (batch, tokens))
    check_tensor("block_table", block_table, dtype=torch.int32, ndim=2, device=kv_cache.device)
    check_dim("block_table", block_table, 0, batch, "batch size of c_kv")
    check_cuda_arch(kv_cache, "mla_cache_append")
    _ops.mla_cache_append(kv_cache, block_table.contiguous(), positions.contiguous(), aligned16(c_kv),
                          aligned16(k_pe))


def _get_mla_metadata_fake(cache_seqlens, num_sm_parts):
    return (cache_seqlens.new_empty((num_sm_parts, 8), dtype=torch.int32),
            cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,), dtype=torch.int32))


def _mla_decode_fake(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, tile_sched, split_offsets, out):
    torch._check(q.dim() == 4 and q.shape[3] == MLA_HEAD_DIM_QK,
                 lambda: f"mla_decode: q [B, s_q, h_q, {MLA_HEAD_DIM_QK}], got {q.shape}")
    torch._check(block_table.dim() == 2 and block_table.shape[0] == q.shape[0] and cache_seqlens.shape == (q.shape[0],),
                 lambda: f"mla_decode: block_table [B, max_blocks] and cache_seqlens [B] for q {q.shape}, got "
                         f"{block_table.shape}, {cache_seqlens.shape}")
    batch, s_q, h_q, _ = q.shape
    return q.new_empty((batch, h_q, s_q), dtype=torch.float32)


def _quantize_mla_kv_fake(kv):
    return kv.new_empty((*kv.shape[:-1], MLA_FP8_TOKEN_BYTES), dtype=torch.uint8)


def _mla_cache_append_fake(kv_cache, block_table, positions, c_kv, k_pe):
    return None


register_op("get_mla_metadata", reference.get_mla_metadata, _get_mla_metadata_fake)
register_op("mla_decode", reference.mla_decode, _mla_decode_fake)
register_op("quantize_mla_kv", reference.quantize_mla_kv, _quantize_mla_kv_fake)
register_op("mla_cache_append", reference.mla_cache_append, _mla_cache_append_fake)
