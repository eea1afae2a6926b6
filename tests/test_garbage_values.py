"""Garbage in the values that live on the GPU (page indices, lengths, group indices, row counts,
expert ids, rows): the kernels clamp or skip them as documented, agree with the CPU reference where
it defines the result, and write nothing outside their outputs. Outputs are views into larger
buffers whose margins are poisoned canaries. GPU only (marked); run these under
`compute-sanitizer --tool memcheck` too."""
import pytest
import torch

from deepseek_ops import reference
from deepseek_ops.testing import calc_diff

FP8 = torch.float8_e4m3fn
ops = torch.ops.deepseek_ops
CANARY = 0x5A
MARGIN = 4096  # bytes of canary on each side of an output


def _canaried(shape, dtype):
    """(output view, whole buffer): the output sits between two canary margins, 16-byte aligned."""
    nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    whole = torch.full((nbytes + 2 * MARGIN,), CANARY, dtype=torch.uint8, device="cuda")
    return whole[MARGIN:MARGIN + nbytes].view(dtype).view(shape), whole


def _assert_margins_intact(whole: torch.Tensor, what: str):
    torch.cuda.synchronize()
    margins = torch.cat([whole[:MARGIN], whole[-MARGIN:]])
    bad = (margins != CANARY).nonzero().flatten()
    assert bad.numel() == 0, f"{what}: {bad.numel()} canary bytes written outside the output (first at {bad[:4]})"


def _assert_matches_reference(q, kv, table, seqlens, causal, out, lse):
    """mla_decode's out and lse (scale 0.1) against the CPU reference on the same inputs."""
    want = torch.empty(*out.shape, dtype=torch.bfloat16)
    want_lse = reference.mla_decode(q.cpu(), kv.cpu(), table.cpu(), seqlens.cpu(), 0.1, causal, None, None, want)
    assert calc_diff(out.cpu(), want) < 1e-5
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(want_lse))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_mla_decode_garbage_pages_and_lengths(causal):
    num_blocks, batch, s_q, h_q = 6, 5, 2, 16
    kv = torch.randn(num_blocks, 64, 1, 576, device="cuda").to(torch.bfloat16)
    q = torch.randn(batch, s_q, h_q, 576, device="cuda").to(torch.bfloat16)
    table = torch.tensor([[-1, 2, 9], [5, 2**30, -2**31], [1, 0, 3], [2, 3, -7], [0, 1, 2]], dtype=torch.int32,
                         device="cuda")
    seqlens = torch.tensor([150, 130, -5, 2**30, 0], dtype=torch.int32, device="cuda")
    tile_sched, split_offsets = ops.get_mla_metadata(seqlens, torch.cuda.get_device_properties(0).multi_processor_count
                                                     // 2)
    out, whole = _canaried((batch, s_q, h_q, 512), torch.bfloat16)
    lse = ops.mla_decode(q, kv, table, seqlens, 0.1, causal, tile_sched, split_offsets, out)
    _assert_margins_intact(whole, "mla_decode out")
    _assert_matches_reference(q, kv, table, seqlens, causal, out, lse)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_mla_decode_garbage_metadata(fp8):
    """Metadata is read as given: built for other lengths, or pointing requests, tiles and splits far
    outside the batch and the workspaces, it gives wrong values and writes nothing outside out; a
    correct call after it still matches the reference."""
    num_blocks, batch, s_q, h_q, columns = 90, 5, 2, 64, 18
    kv = torch.randn(num_blocks, 64, 1, 576, device="cuda").to(torch.bfloat16)
    if fp8:
        kv = ops.quantize_mla_kv(kv)
    q = torch.randn(batch, s_q, h_q, 576, device="cuda").to(torch.bfloat16)
    table = torch.randperm(num_blocks, device="cuda")[:batch * columns].reshape(batch, columns).int()
    seqlens = torch.tensor([130, 1100, 64, 0, 700], dtype=torch.int32, device="cuda")
    num_parts = torch.cuda.get_device_properties(0).multi_processor_count // 2
    good = ops.get_mla_metadata(seqlens, num_parts)
    big, small = 2**31 - 1, -2**31
    tile_sched = good[0].clone()
    tile_sched[0, :5] = torch.tensor([-5, -100, batch + 7, big, big])  # every request, tiles and splits past the end
    tile_sched[1, :5] = torch.tensor([small, small, big, big, small])
    tile_sched[2, :5] = torch.tensor([batch - 1, big, batch - 1, small, 0])
    split_offsets = torch.tensor([small, big, -1, 10**6, 3, small], dtype=torch.int32, device="cuda")
    garbage = torch.randint(small, big, good[0].shape, dtype=torch.int32, device="cuda")
    cases = {"other lengths": ops.get_mla_metadata(seqlens.flip(0) * 3, num_parts),
             "garbage rows": (tile_sched, split_offsets), "random": (garbage, split_offsets),
             "garbage split_offsets": (good[0], split_offsets)}
    for name, meta in cases.items():
        out, whole = _canaried((batch, s_q, h_q, 512), torch.bfloat16)
        ops.mla_decode(q, kv, table, seqlens, 0.1, True, *meta, out)
        _assert_margins_intact(whole, f"mla_decode out, metadata {name}")
    out, whole = _canaried((batch, s_q, h_q, 512), torch.bfloat16)
    lse = ops.mla_decode(q, kv, table, seqlens, 0.1, True, *good, out)
    _assert_margins_intact(whole, "mla_decode out")
    _assert_matches_reference(q, kv, table, seqlens, True, out, lse)


@pytest.mark.gpu
def test_gpu_mla_cache_append_garbage_positions_and_pages():
    num_blocks = 4
    cache, whole = _canaried((num_blocks, 64, 1, 576), torch.bfloat16)
    cache.copy_(torch.randn(num_blocks, 64, 1, 576, device="cuda").to(torch.bfloat16))
    table = torch.tensor([[0, -1, 2**30], [3, 1, -2**31]], dtype=torch.int32, device="cuda")
    positions = torch.tensor([[5, 70, 200, -3], [2**30, 64, 130, -2**31]], dtype=torch.int32, device="cuda")
    c_kv = torch.randn(2, 4, 512, device="cuda").to(torch.bfloat16)
    k_pe = torch.randn(2, 4, 64, device="cuda").to(torch.bfloat16)
    want = cache.cpu()
    reference.mla_cache_append(want, table.cpu(), positions.cpu(), c_kv.cpu(), k_pe.cpu())
    ops.mla_cache_append(cache, table, positions, c_kv, k_pe)
    _assert_margins_intact(whole, "mla_cache_append cache")
    assert torch.equal(cache.cpu().view(torch.int16), want.view(torch.int16)), "only valid positions are written"


def _fp8_operands(groups, rows, n, k):
    a = (torch.randn(groups * rows, k, device="cuda") * 3).to(FP8)
    a_scales = torch.rand(groups * rows, k // 128, device="cuda") + 0.5
    b = (torch.randn(groups, n, k, device="cuda") * 3).to(FP8)
    b_scales = torch.rand(groups, -(-n // 128), k // 128, device="cuda") + 0.5
    return a, a_scales, b, b_scales


@pytest.mark.gpu
def test_gpu_grouped_contiguous_garbage_m_indices():
    a, a_scales, b, b_scales = _fp8_operands(1, 512, 256, 256)
    b, b_scales = b.expand(2, -1, -1).contiguous(), b_scales.expand(2, -1, -1).contiguous()
    # Blocks of 128 rows: a valid group 1, a first index past G, a negative one, huge values mixed in.
    m_indices = torch.tensor([1] * 128 + [7] * 128 + [-9] * 128 + [0] * 64 + [2**30] * 64, dtype=torch.int32,
                             device="cuda")
    out, whole = _canaried((512, 256), torch.bfloat16)
    out.view(torch.uint8).fill_(0x7F)
    ops.grouped_fp8_gemm_contiguous_out(a, a_scales, b, b_scales, m_indices, out)
    _assert_margins_intact(whole, "grouped_fp8_gemm_contiguous out")
    skipped = out[128:384].view(torch.uint8).cpu()
    assert (skipped == 0x7F).all(), "rows of blocks with an out-of-range first index were written"
    assert (out[448:].view(torch.uint8).cpu() == 0x7F).all(), "rows whose index differs from their block's were written"
    ref = reference.fp8_gemm(a[:128].cpu(), a_scales[:128].cpu(), b[1].cpu(), b_scales[1].cpu(), torch.float64)
    assert calc_diff(out[:128].cpu(), ref) < 1e-5


@pytest.mark.gpu
def test_gpu_grouped_masked_garbage_counts():
    groups, m_max, n, k = 3, 64, 256, 256
    a = (torch.randn(groups, m_max, k, device="cuda") * 3).to(FP8)
    a_scales = torch.rand(groups, m_max, k // 128, device="cuda") + 0.5
    b = (torch.randn(groups, n, k, device="cuda") * 3).to(FP8)
    b_scales = torch.rand(groups, n // 128, k // 128, device="cuda") + 0.5
    masked_m = torch.tensor([-5, 2**30, 17], dtype=torch.int32, device="cuda")
    out, whole = _canaried((groups, m_max, n), torch.bfloat16)
    out.view(torch.uint8).fill_(0x7F)
    ops.grouped_fp8_gemm_masked_out(a, a_scales, b, b_scales, masked_m, 32, out)
    _assert_margins_intact(whole, "grouped_fp8_gemm_masked out")
    assert (out[0].view(torch.uint8).cpu() == 0x7F).all(), "a negative count wrote rows"
    assert (out[2, 17:].view(torch.uint8).cpu() == 0x7F).all(), "rows past masked_m were written"
    ref = reference.fp8_gemm(a[1].cpu(), a_scales[1].cpu(), b[1].cpu(), b_scales[1].cpu(), torch.float64)
    assert calc_diff(out[1].cpu(), ref) < 1e-5, "a count above M_max is clamped to M_max"


@pytest.mark.gpu
def test_gpu_ep_permute_and_combine_garbage_ids():
    tokens, hidden, experts, topk = 40, 256, 8, 4
    x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
    topk_idx = torch.randint(0, experts, (tokens, topk), device="cuda")
    topk_idx[::3, 0] = 2**40
    topk_idx[1::3, 1] = -(2**40)
    topk_idx[2::5, 2] = experts
    weights = torch.rand(tokens, topk, device="cuda")
    num_rows = tokens * topk + experts * 3
    got = ops.ep_permute(x, None, weights, topk_idx, experts, 4, num_rows)
    want = reference.ep_permute(x.cpu(), None, weights.cpu(), topk_idx.cpu(), experts, 4, num_rows)
    for name, g, w in zip(("m_indices", "row_of", "counts"), (got[3], got[4], got[5]), (want[3], want[4], want[5])):
        assert torch.equal(g.cpu(), w), f"{name}: out-of-range experts are skipped like -1"
    y = torch.randn(16, hidden, device="cuda").to(torch.bfloat16)
    row_of = torch.randint(-3, 16, (tokens, topk), dtype=torch.int32, device="cuda")
    row_of[::4, 0] = 2**30
    out = ops.ep_combine(y, row_of, weights)
    assert torch.equal(out.cpu().view(torch.int16),
                       reference.ep_combine(y.cpu(), row_of.cpu(), weights.cpu()).view(torch.int16))
