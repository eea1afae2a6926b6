"""MLA decode (absorbed MQA, Dqk 576 / Dv 512, paged latent cache) against FlashMLA and PyTorch.

Kernels: `mla_decode` (bf16 cache) and `mla_decode_fp8` (packed FP8 cache). Peers, same inputs:
`flashmla` = FlashMLA's dense bf16 decode, when importable (benchmarks/peers.py); `torch` = gather
the pages + einsum + fp32 softmax + einsum, timed whole; `sdpa` = torch scaled_dot_product_attention
on the already gathered, padded cache (gather not timed). An FP8 record is timed against ours on the
bf16 cache it was quantized from. Every impl is timed in two rounds, the second in reversed order
(timing.time_rounds), and the spread of the two is printed.
Ours is timed without get_mla_metadata: the schedule is computed once per decode step and
reused by every layer. Bytes = (sum(seqlens) * 576 + B * s_q * h_q * (576 + 512)) * 2 (FP8 cache:
656 bytes a token instead of 1152); FLOPs = s_q * sum(seqlens) * h_q * (576 + 512) * 2.
"""
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F

from benchmarks.report import OURS, Record, throughput
from benchmarks.peers import flashmla_decode_fn, passes_check
from benchmarks.timing import SHORT_OP_MS, host_overhead_us, pytest_benchmark, time_rounds
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
BF16_KERNEL = "mla_decode"
BF16_CACHE = "deepseek_ops_bf16_cache"  # impl name, within an FP8 measurement, of ours on the bf16 cache


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
    """bf16 cache: ours against flashmla (when importable) and, with peers, torch and sdpa. FP8 cache:
    ours against ours on the bf16 cache the FP8 one was quantized from (impl BF16_CACHE), the
    speed-up the format must buy. Every impl is timed in two rounds, the second reversed."""
    kernel = "mla_decode_fp8" if fp8 else "mla_decode"
    q, kv, block_table, seqlens = make_inputs(batch, s_q, h_q, seqlen, varlen, fp8=False)
    shape = {"B": batch, "s_q": s_q, "h_q": h_q, "seqlen": int(seqlens.float().mean().round()),
             "causal": causal, "varlen": varlen}
    meta = deepseek_ops.get_mla_metadata(seqlens, s_q, h_q)
    out = torch.empty(batch, s_q, h_q, 512, dtype=torch.bfloat16, device="cuda")
    out_bf16 = torch.empty_like(out)
    impls: Dict[str, Callable[[], object]] = {}
    if fp8:
        kv_bf16, kv = kv, deepseek_ops.quantize_mla_kv(kv)
        impls[BF16_CACHE] = lambda: deepseek_ops.mla_decode(q, kv_bf16, block_table, seqlens, SCALE, causal, meta,
                                                            out_bf16)[0]
    impls[OURS] = lambda: deepseek_ops.mla_decode(q, kv, block_table, seqlens, SCALE, causal, meta, out)[0]
    if not fp8:
        flashmla = flashmla_decode_fn(q, kv, block_table, seqlens, SCALE, causal)
        if flashmla is not None:
            impls["flashmla"] = flashmla
    if peers and not fp8:
        impls["torch"] = lambda: torch_decode(q, kv, block_table, seqlens, causal)
        impls["sdpa"] = sdpa_impl(q, kv, block_table, seqlens, causal)
    ref = torch.empty_like(out)
    reference.mla_decode(q, kv, block_table, seqlens, SCALE, causal, None, None, ref)
    errors = {}
    for impl, fn in impls.items():
        if impl == BF16_CACHE:
            errors[impl] = float("nan")  # a different cache: its own parity is the bf16 records'
            fn()
            continue
        error = calc_diff(fn(), ref)
        if impl in (OURS, "flashmla") and not passes_check(f"{kernel} {shape}", impl, error, MAX_DIFF, OURS):
            continue
        errors[impl] = error
    rounds: Dict[str, List[float]] = {}
    times = time_rounds([impls], list(errors), rounds)
    records = []
    for impl, ms in times.items():
        moved, flops = bytes_and_flops(q, seqlens, fp8 and impl != BF16_CACHE)
        tflops, gbps = throughput(ms, flops=flops, bytes_moved=moved)
        records.append(Record(BF16_KERNEL if impl == BF16_CACHE else kernel, shape,
                              OURS if impl == BF16_CACHE else impl, ms, tflops, gbps, errors[impl]))
    ms = times[OURS]
    spread = ", ".join(f"{impl} {max(r) / min(r) - 1:.1%}" for impl, r in rounds.items())
    versus = ", ".join(f"{impl} {times[impl] / ms:.3f}x" for impl in times if impl != OURS)
    print(f"{kernel} {shape}: ours {ms * 1e3:.1f} us ({versus}); round spread {spread}"
          + (f"; host overhead {host_overhead_us(impls[OURS]):.1f} us per eager call" if ms < SHORT_OP_MS else ""),
          flush=True)
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
