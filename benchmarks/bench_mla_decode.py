"""MLA decode (absorbed MQA, Dqk 576 / Dv 512, paged latent cache) against PyTorch.

Kernels: `mla_decode` (bf16 cache) and `mla_decode_fp8` (packed FP8 cache). Peers, same inputs:
`torch` = gather the pages + einsum + fp32 softmax + einsum, timed whole; `sdpa` =
torch scaled_dot_product_attention on the already gathered, padded cache (gather not timed).
Ours is timed without get_mla_metadata: the schedule is computed once per decode step and
reused by every layer. Bytes = (sum(seqlens) * 576 + B * s_q * h_q * (576 + 512)) * 2 (FP8 cache:
656 bytes a token instead of 1152); FLOPs = s_q * sum(seqlens) * h_q * (576 + 512) * 2.
"""
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F

from benchmarks.report import OURS, Record, throughput
from benchmarks.timing import SHORT_OP_MS, host_overhead_us, pytest_benchmark, time_op
import deepseek_ops
from deepseek_ops import reference
from deepseek_ops.constants import MLA_FP8_TOKEN_BYTES, MLA_HEAD_DIM_QK, MLA_PAGE_SIZE
from deepseek_ops.testing import calc_diff

PAGE = MLA_PAGE_SIZE
SCALE = 192 ** -0.5
MAX_DIFF = 1e-5
# (B, s_q, h_q, seqlen, causal, varlen): memory-bound, compute-bound, mixed lengths.
SHAPES = [
    (128, 1, 16, 4096, False, False), (128, 1, 64, 4096, False, False),
    (128, 1, 16, 16384, False, False), (128, 1, 64, 16384, False, False),
    (128, 1, 128, 4096, False, False), (128, 2, 128, 4096, True, False),
    (128, 1, 64, 8320, False, False), (128, 1, 64, 8320, False, True),
    (128, 1, 128, 8320, False, False), (128, 1, 128, 8320, False, True),
]
FP8_SHAPES = [s for s in SHAPES if s[2] in (16, 64) and not s[5]]
QUICK_SHAPES = [SHAPES[1], SHAPES[5]]


def make_inputs(batch, s_q, h_q, seqlen, varlen, fp8, device="cuda"):
    if varlen:  # uniform in [256, 16384]: mean 8320
        seqlens = torch.randint(256, 16385, (batch,), dtype=torch.int32)
    else:
        seqlens = torch.full((batch,), seqlen, dtype=torch.int32)
    pages = (-(-seqlens // PAGE)).tolist()
    max_blocks = max(pages)
    block_table = torch.zeros(batch, max_blocks, dtype=torch.int32)
    perm = torch.randperm(sum(pages), dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = perm[cursor:cursor + n]
        cursor += n
    kv = (torch.randn(sum(pages), PAGE, 1, 576, device=device) * 0.5).to(torch.bfloat16)
    if fp8:
        kv = deepseek_ops.quantize_mla_kv(kv)
    q = torch.randn(batch, s_q, h_q, 576, device=device).to(torch.bfloat16)
    return q, kv, block_table.to(device), seqlens.to(device)


def bytes_and_flops(q, seqlens, fp8):
    batch, s_q, h_q, _ = q.shape
    total = int(seqlens.sum())
    token_bytes = MLA_FP8_TOKEN_BYTES if fp8 else MLA_HEAD_DIM_QK * 2
    return (total * token_bytes + batch * s_q * h_q * (576 + 512) * 2,
            s_q * total * h_q * (576 + 512) * 2)


def gathered(kv, block_table, seqlens, causal, s_q):
    """Padded dense cache [B, N, 576] and the visibility mask [B, 1, s_q, N] of every request."""
    dense = kv[block_table.long()].flatten(1, 3)  # [B, max_blocks * 64, 576]
    if dense.dtype == torch.uint8:
        dense = reference.dequantize_mla_kv(dense)
    key = torch.arange(dense.shape[1], device=kv.device)
    limit = seqlens[:, None].long().expand(-1, s_q)
    if causal:
        limit = limit - s_q + 1 + torch.arange(s_q, device=kv.device)
    return dense, (key[None, None, :] < limit[:, :, None])[:, None]


def torch_decode(q, kv, block_table, seqlens, causal):
    dense, mask = gathered(kv, block_table, seqlens, causal, q.shape[1])
    scores = torch.einsum("bshd,bnd->bhsn", q, dense).float() * SCALE
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(torch.bfloat16)
    return torch.einsum("bhsn,bnd->bshd", probs, dense[..., :512])


def sdpa_impl(q, kv, block_table, seqlens, causal) -> Callable[[], torch.Tensor]:
    """One KV head: the s_q * h_q query rows of a request are one head's queries (no K/V expansion)."""
    dense, mask = gathered(kv, block_table, seqlens, causal, q.shape[1])
    batch, s_q, h_q, _ = q.shape
    rows = q.reshape(batch, 1, s_q * h_q, 576)  # row = i * h_q + h
    row_mask = mask.repeat_interleave(h_q, dim=2)  # [B, 1, s_q * h_q, N]
    k, v = dense[:, None], dense[:, None, :, :512]
    return lambda: F.scaled_dot_product_attention(rows, k, v, attn_mask=row_mask, scale=SCALE).reshape(
        batch, s_q, h_q, 512)


def measure(batch, s_q, h_q, seqlen, causal, varlen, fp8, peers=True) -> List[Record]:
    kernel = "mla_decode_fp8" if fp8 else "mla_decode"
    q, kv, block_table, seqlens = make_inputs(batch, s_q, h_q, seqlen, varlen, fp8)
    shape = {"B": batch, "s_q": s_q, "h_q": h_q, "seqlen": int(seqlens.float().mean().round()),
             "causal": causal, "varlen": varlen}
    meta = deepseek_ops.get_mla_metadata(seqlens, s_q, h_q)
    out = torch.empty(batch, s_q, h_q, 512, dtype=torch.bfloat16, device="cuda")
    impls: Dict[str, Callable[[], object]] = {
        OURS: lambda: deepseek_ops.mla_decode(q, kv, block_table, seqlens, SCALE, causal, meta, out)[0]}
    if peers:
        impls["torch"] = lambda: torch_decode(q, kv, block_table, seqlens, causal)
        impls["sdpa"] = sdpa_impl(q, kv, block_table, seqlens, causal)
    ref = torch.empty_like(out)
    reference.mla_decode(q, kv, block_table, seqlens, SCALE, causal, None, None, ref)
    bytes_moved, flops = bytes_and_flops(q, seqlens, fp8)
    records = []
    for impl, fn in impls.items():
        error = calc_diff(fn(), ref)
        if impl == OURS and not error < MAX_DIFF:
            raise AssertionError(f"{kernel} {shape}: calc_diff {error:.3e} against the reference; not timed")
        ms = time_op(fn)
        tflops, gbps = throughput(ms, flops=flops, bytes_moved=bytes_moved)
        records.append(Record(kernel, shape, impl, ms, tflops, gbps, error))
        if impl == OURS and ms < SHORT_OP_MS:
            print(f"{kernel} {shape}: host overhead {host_overhead_us(fn):.1f} us per eager call", flush=True)
    del impls, q, kv, ref
    torch.cuda.empty_cache()
    return records


def run(quick: bool = False) -> List[Record]:
    records: List[Record] = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        records += measure(*shape, fp8=False)
    for shape in FP8_SHAPES[:1] if quick else FP8_SHAPES:
        records += measure(*shape, fp8=True, peers=False)
    return records


# pytest-benchmark entries (`pytest benchmarks/bench_mla_decode.py --benchmark-only`).


def _pytest_bench(benchmark, shape, fp8):
    batch, s_q, h_q, seqlen, causal, varlen = shape
    q, kv, block_table, seqlens = make_inputs(batch, s_q, h_q, seqlen, varlen, fp8)
    meta = deepseek_ops.get_mla_metadata(seqlens, s_q, h_q)
    ref = torch.empty(batch, s_q, h_q, 512, dtype=torch.bfloat16, device="cuda")
    reference.mla_decode(q, kv, block_table, seqlens, SCALE, causal, None, None, ref)

    def fn():
        return deepseek_ops.mla_decode(q, kv, block_table, seqlens, SCALE, causal, meta)[0]

    assert calc_diff(fn(), ref) < MAX_DIFF, "deepseek_ops differs from the reference; not timed"
    ms = pytest_benchmark(benchmark, fn)
    bytes_moved, flops = bytes_and_flops(q, seqlens, fp8)
    tflops, gbps = throughput(ms, flops=flops, bytes_moved=bytes_moved)
    benchmark.extra_info.update({"gbps": gbps, "tflops": tflops})


@pytest.mark.gpu
def test_mla_decode(benchmark):
    _pytest_bench(benchmark, SHAPES[1], fp8=False)


@pytest.mark.gpu
def test_mla_decode_fp8(benchmark):
    _pytest_bench(benchmark, SHAPES[1], fp8=True)
