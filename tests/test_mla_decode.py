"""mla_decode, get_mla_metadata, quantize_mla_kv and mla_cache_append against deepseek_ops.reference."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import deepseek_ops
from deepseek_ops import reference
from deepseek_ops._selftest import _e4m3_ulp
from deepseek_ops.testing import assert_bitwise_equal, assert_written, calc_diff, max_rel_error, poison_

PAGE = deepseek_ops.MLA_PAGE_SIZE
SEQLENS = (0, 1, 20, 64, 65, 140, 4096, 16384)
SCALE = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2  # DeepSeek-V3: 192^-0.5 * YaRN mscale^2
OUT_DIFF = 1e-5
LSE_ERROR = 1e-5
NAN_BYTE = 0xFF  # e4m3 NaN, and a NaN fp32 scale
FP8 = torch.float8_e4m3fn
E4M3_FINITE = [b for b in range(256) if b not in (0x7F, 0xFF)]  # e4m3fn: no inf, NaN is 0x7F / 0xFF
# The FP8 cache's scales are powers of two: 2^-22 (the 1e-4 floor / 448, rounded up) .. 2^120 (bf16's
# largest value / 448, rounded up).
SCALE_EXP_MIN, SCALE_EXP_MAX = -22, 120


def make_cache(seqlens, s_q, h_q, device, fp8=False, spare_pages=3, extra_cols=2):
    """Random q and a shuffled paged cache; every slot past a request's seqlen (and every spare page) is NaN."""
    batch = len(seqlens)
    pages_per_req = [-(-s // PAGE) for s in seqlens]
    num_blocks = sum(pages_per_req) + spare_pages
    perm = torch.randperm(num_blocks).tolist()
    max_blocks = max(pages_per_req + [1]) + extra_cols
    # Columns past a request's pages hold garbage: the kernel must not read them.
    block_table = torch.randint(-(2**30), 2**30, (batch, max_blocks), dtype=torch.int32)
    nan_slots = torch.ones(num_blocks, PAGE, dtype=torch.bool)
    cursor = 0
    for b, (s, n) in enumerate(zip(seqlens, pages_per_req)):
        pages = perm[cursor:cursor + n]
        cursor += n
        block_table[b, :n] = torch.tensor(pages, dtype=torch.int32)
        for i, page in enumerate(pages):
            nan_slots[page, :min(PAGE, s - i * PAGE)] = False
    kv = (torch.randn(num_blocks, PAGE, 1, 576, device=device) * 0.5).to(torch.bfloat16)
    nan_slots = nan_slots.to(device)
    if fp8:
        kv = reference.quantize_mla_kv(kv)
        kv[nan_slots] = NAN_BYTE
    else:
        kv[nan_slots] = float("nan")
    q = torch.randn(batch, s_q, h_q, 576, device=device).to(torch.bfloat16)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32)
    return q, kv, block_table.to(device), cache_seqlens.to(device)


def reference_decode(q, kv, block_table, cache_seqlens, causal):
    out = torch.empty(*q.shape[:3], 512, dtype=torch.bfloat16, device=q.device)
    lse = reference.mla_decode(q, kv, block_table, cache_seqlens, SCALE, causal, None, None, out)
    return out, lse


def assert_lse_close(lse, ref):
    lse, ref = lse.double().cpu(), ref.double().cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref)), "lse: +inf (no visible key) rows differ"
    assert not torch.isnan(lse).any(), "lse: NaN"
    finite = torch.isfinite(ref)
    if finite.any():
        err = max_rel_error(lse[finite], ref[finite])
        assert err < LSE_ERROR, f"lse relative error {err:.3e}"
    assert (ref[~finite] == float("inf")).all()


def walk_schedule(tile_sched, split_offsets, seqlens):
    """(request, tile) -> (split index) of every scheduled tile; checks the schedule's invariants."""
    sched, offsets = tile_sched.cpu().tolist(), split_offsets.cpu().tolist()
    seen, splits_of = {}, {}
    for begin_req, begin_tile, end_req, end_tile, begin_split, *_ in sched:
        for req in range(begin_req, end_req + 1):
            t0 = begin_tile if req == begin_req else 0
            t1 = end_tile if req == end_req else max(1, -(-seqlens[req] // PAGE))
            split = begin_split if req == begin_req else 0
            assert t0 < t1, f"empty piece of request {req}"
            assert splits_of.setdefault(req, []) == list(range(split)), f"request {req}: split {split} out of order"
            splits_of[req].append(split)
            for tile in range(t0, t1):
                assert (req, tile) not in seen, f"tile {tile} of request {req} scheduled twice"
                seen[(req, tile)] = split
    for req, s in enumerate(seqlens):
        for tile in range(max(1, -(-s // PAGE))):
            assert (req, tile) in seen, f"tile {tile} of request {req} never scheduled"
        assert offsets[req + 1] - offsets[req] == len(splits_of[req]), f"request {req}: split count"
    assert offsets[0] == 0
    return seen


# ------------------------------------------------------------------------------------------------
# CPU: the reference, the schedule, the cache format, bad input, opcheck, torch.compile
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s_q", [1, 3])
def test_reference_matches_sdpa(causal, s_q):
    """The reference against SDPA on the gathered cache with an explicit bottom-right mask."""
    seqlens = [5, 64, 130]
    q, kv, block_table, cache_seqlens = make_cache(seqlens, s_q, 4, "cpu")
    out, lse = reference_decode(q, kv, block_table, cache_seqlens, causal)
    for b, n in enumerate(seqlens):
        keys = reference.gather_mla_cache(kv, block_table, b, n).double()  # [n, 576]
        qb = q[b].double().transpose(0, 1)  # [h, s_q, 576]
        mask = torch.ones(s_q, n, dtype=torch.bool)
        if causal:
            mask = torch.arange(n)[None, :] <= (n - s_q + torch.arange(s_q))[:, None]
        expected = F.scaled_dot_product_attention(qb, keys[None], keys[None, :, :512], attn_mask=mask, scale=SCALE)
        assert calc_diff(out[b].transpose(0, 1), expected) < OUT_DIFF  # out is rounded to bf16
        scores = (qb @ keys.t() * SCALE).masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(lse[b], torch.logsumexp(scores, -1).float(), rtol=1e-6, atol=1e-6)


def test_reference_empty_rows():
    """No keys (empty request, or causal rows before the first key): out 0 and lse +inf."""
    q, kv, block_table, cache_seqlens = make_cache([0, 2], 4, 2, "cpu")
    out, lse = reference_decode(q, kv, block_table, cache_seqlens, causal=True)
    assert (out[0] == 0).all() and (lse[0] == float("inf")).all()
    # seqlen 2, s_q 4: queries 0 and 1 see keys < -1 and < 0, i.e. none.
    assert (out[1, :2] == 0).all() and (lse[1, :, :2] == float("inf")).all()
    assert torch.isfinite(lse[1, :, 2:]).all() and (out[1, 2:] != 0).any()


@pytest.mark.parametrize("seqlens, num_parts", [
    ([0], 132), ([16384], 132), ([1, 20, 64, 65, 140, 4096, 16384, 0], 66),
    ([4096] * 128, 66), ([4096] * 128, 132), ([7] * 300, 132), ([100000, 3], 33), ([5, 5], 1),
])
def test_schedule_covers_every_tile_once(seqlens, num_parts):
    tile_sched, split_offsets = reference.get_mla_metadata(torch.tensor(seqlens, dtype=torch.int32), num_parts)
    assert tile_sched.shape == (num_parts, 8) and split_offsets.shape == (len(seqlens) + 1,)
    walk_schedule(tile_sched, split_offsets, seqlens)
    assert int(split_offsets[-1]) <= len(seqlens) + num_parts  # the split workspace's size


def test_schedule_balances_mixed_lengths():
    """Uniform [256, 16384] lengths: no part gets much more than its share."""
    seqlens = torch.randint(256, 16385, (128,), dtype=torch.int32)
    tile_sched, split_offsets = reference.get_mla_metadata(seqlens, 132)
    seen = walk_schedule(tile_sched, split_offsets, seqlens.tolist())
    share = (len(seen) + 5 * int(split_offsets[-1])) / 132
    for begin_req, begin_tile, end_req, end_tile, *_ in tile_sched.tolist():
        tiles = sum(1 for (r, t) in seen if (r, t) >= (begin_req, begin_tile) and (r, t) < (end_req, end_tile))
        assert tiles <= share + 5, f"part with {tiles} tiles, share {share:.1f}"


def expected_cache_scales(amax: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(max(amax, 1e-4) / 448)) in float64. Exact: no bf16 amax is within an fp32 rounding
    of 448 times a power of two without being one, so the fp32 quotient rounds up the same way."""
    return torch.exp2(torch.ceil(torch.log2(amax.double().clamp(min=1e-4) / 448))).float()


def split_tokens(packed: torch.Tensor):
    """Packed tokens [..., 656] -> (e4m3 values [T, 4, 128], scales fp32 [T, 4], RoPE bf16 [T, 64])."""
    flat = packed.reshape(-1, 656)
    return (flat[:, :512].contiguous().view(FP8).reshape(-1, 4, 128), flat[:, 512:528].contiguous().view(torch.float32),
            flat[:, 528:].contiguous().view(torch.bfloat16))


def test_quantize_mla_kv_format():
    kv = (torch.randn(3, 64, 1, 576) * torch.logspace(-8, 8, 576)).to(torch.bfloat16)  # groups below the floor too
    kv[0, 0, 0, :128] = 0
    packed = deepseek_ops.quantize_mla_kv(kv)
    assert packed.shape == (3, 64, 1, 656) and packed.dtype == torch.uint8
    values, scales, rope = split_tokens(packed)
    src = kv.reshape(-1, 576)
    x = src[:, :512].double().reshape(-1, 4, 128)
    amax = x.abs().amax(-1)
    assert (scales.view(torch.int32) & 0x7FFFFF == 0).all(), "scales must be powers of two"
    assert_bitwise_equal(scales, expected_cache_scales(amax), "scales")
    true_scale = amax.clamp(min=1e-4) / 448
    assert (scales >= true_scale).all() and (scales < 2 * true_scale).all()
    assert scales[0, 0] == 2.0 ** SCALE_EXP_MIN
    assert_bitwise_equal(rope, src[:, 512:].contiguous(), "rope")
    # A power-of-two scale divides and multiplies exactly: the only error is e4m3's round to nearest.
    q = values.double()
    err = (x / scales.double()[..., None] - q).abs()
    assert (err <= 0.5 * _e4m3_ulp(q)).all(), f"worst {float((err / _e4m3_ulp(q)).max())} e4m3 ulp"
    back = reference.dequantize_mla_kv(packed).reshape(-1, 576)
    assert torch.equal(back[:, :512].double().reshape(-1, 4, 128), q * scales.double()[..., None]), "inexact"


def every_e4m3_tokens(device="cpu") -> torch.Tensor:
    """Packed tokens exactly as quantize_mla_kv writes them, over every finite e4m3 value and every
    scale the format allows: each group holds a +-448 (a +-240 at 2^120, where bf16 tops out) under a
    scale from 2^-22 to 2^120, so the scale is the one its dequantized values get."""
    exponents = list(range(SCALE_EXP_MIN, SCALE_EXP_MAX + 1))
    exponents += [SCALE_EXP_MIN] * (-len(exponents) % 4)  # whole tokens
    finite = torch.tensor(E4M3_FINITE, dtype=torch.uint8)
    small = finite[(finite & 0x7F) <= 0x77]  # |value| <= 240
    groups = []
    for i, e in enumerate(exponents):
        if e == SCALE_EXP_MAX:
            body, top = small[torch.randint(0, len(small), (127,))], 0x77
        else:  # two consecutive groups hold all 254 finite values
            body, top = finite[(127 * i + torch.arange(127)) % len(finite)], 0x7E
        group = torch.cat([body, torch.tensor([top | (0x80 * random.randint(0, 1))], dtype=torch.uint8)])
        groups.append(group[torch.randperm(128)])
    num_tokens = len(exponents) // 4
    scales = torch.exp2(torch.tensor(exponents, dtype=torch.float32)).reshape(num_tokens, 4)
    rope = torch.randn(num_tokens, 64).to(torch.bfloat16)
    values = torch.stack(groups).reshape(num_tokens, 512)
    packed = torch.cat([values, scales.view(torch.uint8), rope.view(torch.uint8)], 1)
    return packed.to(device)


def test_every_e4m3_value_and_scale_round_trips():
    """Dequantizing is exact for every e4m3 value (subnormals and -0 included) under every scale of the
    format, and quantizing those values again gives the same bytes."""
    packed = every_e4m3_tokens()
    values, scales, _ = split_tokens(packed)
    assert set(values.view(torch.uint8).flatten().tolist()) == set(E4M3_FINITE)
    assert set(torch.log2(scales).flatten().tolist()) == set(range(SCALE_EXP_MIN, SCALE_EXP_MAX + 1))
    kv = reference.dequantize_mla_kv(packed)
    assert torch.equal(kv[:, :512].double().reshape(-1, 4, 128), values.double() * scales.double()[..., None])
    assert_bitwise_equal(deepseek_ops.quantize_mla_kv(kv), packed, "re-quantized tokens")


def test_e4m3_nan_bytes_dequantize_to_nan_only_there():
    clean = every_e4m3_tokens()
    packed = clean.clone()
    packed[3, 10], packed[5, 300] = 0x7F, 0xFF
    kv = reference.dequantize_mla_kv(packed)
    nan = torch.zeros_like(kv, dtype=torch.bool)
    nan[3, 10] = nan[5, 300] = True
    assert torch.equal(kv.isnan(), nan)
    assert_bitwise_equal(kv[~nan], reference.dequantize_mla_kv(clean)[~nan], "other values")


def extreme_latents() -> torch.Tensor:
    """bf16 tokens [9, 576] whose groups sit at the edges of the scale range; token 8 holds an inf."""
    kv = torch.randn(9, 576).to(torch.bfloat16)
    kv[0, :512] = 0.0  # all zero: the floor, 2^-22
    kv[1, :512] = -0.0
    kv[2, :128] = 1e-40  # bf16 subnormal, far below the floor: rounds to 0 under 2^-22
    kv[2, 128:256] = torch.randn(128) * 1e-5  # below the floor: e4m3 subnormals
    kv[2, 256:384] = 448 * 2.0 ** -22 * torch.rand(128)  # up to the floor's amax
    kv[2, 384:512] = 1e-4
    for t, k in ((3, -20), (4, 0), (5, 50), (6, 119)):
        kv[t, :512] = torch.randn(512) * 2.0 ** k
        kv[t, 0] = 448 * 2.0 ** k  # exactly 448 * 2^k: scale 2^k, no rounding up
        kv[t, 128] = torch.tensor(448 * 2.0 ** k, dtype=torch.bfloat16).nextafter(torch.tensor(float("inf"))
                                                                                   .to(torch.bfloat16))  # 2^(k+1)
        kv[t, 256:384] = (torch.rand(128) * 2 - 1) * 448 * 2.0 ** k
        kv[t, 256] = 320 * 2.0 ** k  # amax in (224, 448] * 2^k: scale 2^k
    kv[7, :512] = torch.finfo(torch.bfloat16).max * (torch.rand(512) * 2 - 1)
    kv[7, 0] = torch.finfo(torch.bfloat16).max  # 2^120; 255 * 2^120 rounds to e4m3 256
    kv[8, 5] = float("inf")
    return kv


def test_quantize_mla_kv_scale_range():
    kv = extreme_latents()
    values, scales, _ = split_tokens(deepseek_ops.quantize_mla_kv(kv))
    exps = torch.log2(scales)
    assert (exps[:3] == SCALE_EXP_MIN).all()
    assert torch.equal(values[0].view(torch.uint8), torch.zeros(4, 128, dtype=torch.uint8))
    assert torch.equal(values[1].view(torch.uint8), torch.full((4, 128), 0x80, dtype=torch.uint8))  # -0
    assert (values[2, 0].float() == 0).all()
    for t, k in ((3, -20), (4, 0), (5, 50), (6, 119)):
        assert exps[t, 0] == k and exps[t, 1] == k + 1 and exps[t, 2] == k, f"token {t}: {exps[t].tolist()}"
    assert (exps[7] == SCALE_EXP_MAX).all() and values[7, 0, 0].float() == 256
    finite = torch.isfinite(scales)
    assert (scales[finite].view(torch.int32) & 0x7FFFFF == 0).all() and finite[:8].all()
    # An inf: its group's scale is inf (as the device rounds), the inf becomes NaN, the rest 0.
    assert scales[8, 0] == float("inf") and values[8, 0, 5].isnan() and (values[8, 0, :5].float() == 0).all()
    assert torch.equal(scales[8, 1:], expected_cache_scales(kv[8, 128:512].double().reshape(3, 128).abs().amax(-1)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cache_quantizer_is_the_activation_quantizer(device):
    """One FP8 recipe: a packed token's latent is, byte for byte, the 1 x 128 ue8m0 activation
    quantization of that latent (same scales, same rounding) wherever the two floors agree: every
    group's amax above the cache's floor (1e-4; the recipe's is lower, its floor groups are tested in
    test_quantize_mla_kv_scale_range)."""
    kv = (torch.randn(5, 64, 1, 576) * torch.logspace(-3, 3, 576)).to(torch.bfloat16).to(device)
    assert kv[..., :512].reshape(-1, 4, 128).abs().amax(-1).min() > 1e-4
    flat = deepseek_ops.quantize_mla_kv(kv).reshape(-1, 656)
    x_fp8, x_scales = deepseek_ops.per_token_group_quant_fp8(kv.reshape(-1, 576)[:, :512], 128, "ue8m0")
    assert_bitwise_equal(flat[:, :512], x_fp8.view(torch.uint8), "e4m3 values")
    assert_bitwise_equal(flat[:, 512:528].contiguous().view(torch.float32), x_scales, "scales")


@pytest.mark.parametrize("fp8", [False, True])
def test_reference_cache_append(fp8):
    kv = torch.zeros(6, 64, 1, 656 if fp8 else 576, dtype=torch.uint8 if fp8 else torch.bfloat16)
    block_table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    positions = torch.tensor([[63, 64], [-1, 2]], dtype=torch.int32)
    c_kv, k_pe = torch.randn(2, 2, 512).to(torch.bfloat16), torch.randn(2, 2, 64).to(torch.bfloat16)
    deepseek_ops.mla_cache_append(kv, block_table, positions, c_kv, k_pe)
    token = torch.cat([c_kv, k_pe], -1)
    if fp8:
        token = reference.quantize_mla_kv(token)
    assert_bitwise_equal(kv[4, 63, 0], token[0, 0])
    assert_bitwise_equal(kv[1, 0, 0], token[0, 1])
    assert_bitwise_equal(kv[0, 2, 0], token[1, 1])
    assert int((kv.view(torch.uint8) != 0).reshape(-1, kv.shape[-1] * kv.element_size()).any(-1).sum()) == 3


@pytest.mark.parametrize("causal", [False, True])
def test_reference_treats_garbage_as_the_kernel_does(causal):
    """The CPU kernel (what a direct torch.ops call runs) on values the public function rejects: pages
    clamp into [0, num_blocks), lengths into [0, 64 * columns], as on the GPU (test_gpu_garbage_values)."""
    num_blocks = 5
    kv = torch.randn(num_blocks, PAGE, 1, 576).to(torch.bfloat16)
    q = torch.randn(4, 2, 16, 576).to(torch.bfloat16)
    table = torch.tensor([[-1, 2, 7], [4, 2**30, -2**31], [1, 0, 3], [2, 3, -7]], dtype=torch.int32)
    seqlens = torch.tensor([150, 130, -5, 10**6], dtype=torch.int32)
    out, lse = reference_decode(q, kv, table, seqlens, causal)
    want_out, want_lse = reference_decode(q, kv, table.clamp(0, num_blocks - 1),
                                          torch.tensor([150, 130, 0, 3 * PAGE], dtype=torch.int32), causal)
    assert_bitwise_equal(out, want_out, "out")
    assert_bitwise_equal(lse, want_lse, "lse")
    assert torch.isinf(lse[2]).all() and (out[2] == 0).all(), "a negative length reads nothing"


def misaligned(shape, dtype=torch.bfloat16, device="cpu") -> torch.Tensor:
    """A contiguous tensor whose data starts one element (2 bytes for bf16) past an aligned address."""
    numel = math.prod(shape)
    return torch.empty(numel + 8, dtype=dtype, device=device)[1:1 + numel].view(shape)


def _good_args(device="cpu"):
    q, kv, block_table, cache_seqlens = make_cache([70, 3], 2, 16, device)
    return dict(q=q, kv_cache=kv, block_table=block_table, cache_seqlens=cache_seqlens, softmax_scale=SCALE)


def _metadata_with_other_split_count(args):
    tile_sched, split_offsets = deepseek_ops.get_mla_metadata(args["cache_seqlens"], 2, 16)
    split_offsets[-1] += 1
    return tile_sched, split_offsets


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(q=a["q"][..., :512]), r"'q'.*head dim 576"),
    (lambda a: a.update(q=a["q"].float()), r"'q'.*dtype"),
    (lambda a: a.update(q=a["q"][0]), r"'q'.*rank"),
    (lambda a: a.update(kv_cache=a["kv_cache"].reshape(-1, 32, 1, 576)), r"'kv_cache'.*page size"),
    (lambda a: a.update(kv_cache=a["kv_cache"][..., :512]), r"'kv_cache'.*576"),
    (lambda a: a.update(kv_cache=a["kv_cache"].float()), r"'kv_cache'.*dtype"),
    (lambda a: a.update(kv_cache=torch.zeros(4, 64, 1, 576, dtype=torch.uint8)), r"'kv_cache'.*656"),
    (lambda a: a.update(block_table=a["block_table"][:, :1]), r"'block_table'.*columns.*70 tokens"),
    (lambda a: a.update(block_table=a["block_table"][:1]), r"'block_table'.*batch size"),
    (lambda a: a.update(block_table=a["block_table"].long()), r"'block_table'.*dtype"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), r"'cache_seqlens'.*shape"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), r"'cache_seqlens'.*dtype"),
    (lambda a: a.update(cache_seqlens=torch.tensor([70, -1], dtype=torch.int32)), r"'cache_seqlens'.*>= 0"),
    (lambda a: a["block_table"].__setitem__((1, 0), -1),
     r"'block_table'.*page indices in \[0, \d+\).*got -1 at \[1, 0\]"),
    (lambda a: a["block_table"].__setitem__((0, 1), a["kv_cache"].shape[0]), r"'block_table'.*got \d+ at \[0, 1\]"),
    (lambda a: a.update(softmax_scale=None), r"'softmax_scale'"),
    (lambda a: a.update(softmax_scale=-1.0), r"'softmax_scale'"),
    (lambda a: a.update(out=torch.empty(2, 2, 16, 576, dtype=torch.bfloat16)), r"'out'.*shape"),
    (lambda a: a.update(out=torch.empty(2, 2, 16, 512)), r"'out'.*dtype"),
    (lambda a: a.update(out=misaligned((2, 2, 16, 512))), r"'out'.*16-byte aligned start, got storage offset 1 "),
    (lambda a: a.update(metadata=deepseek_ops.get_mla_metadata(torch.tensor([3, 70], dtype=torch.int32), 2, 16)),
     r"'metadata'.*get_mla_metadata of these cache_seqlens.*other lengths \(tile_sched\[\d+, \d+\] is"),
    (lambda a: a.update(metadata=_metadata_with_other_split_count(a)),
     r"'metadata'.*other lengths \(split_offsets\[2\]"),
    (lambda a: a.update(metadata=deepseek_ops.get_mla_metadata(a["cache_seqlens"], 2, 64)), r"'metadata'.*s_q=2, h_q=16"),
    (lambda a: a.update(metadata=deepseek_ops.get_mla_metadata(a["cache_seqlens"][:1], 2, 16)), r"'metadata\[1\]'.*shape"),
])
def test_bad_input(change, match):
    args = _good_args()
    change(args)
    with pytest.raises(ValueError, match=match):
        deepseek_ops.mla_decode(**args)


def test_given_metadata_and_misaligned_q():
    """Metadata of these lengths passes the host check; a q at any address is copied to an aligned one."""
    args = _good_args()
    expected, expected_lse = deepseek_ops.mla_decode(**args)
    q = misaligned(args["q"].shape)
    q.copy_(args["q"])
    meta = deepseek_ops.get_mla_metadata(args["cache_seqlens"], 2, 16)
    out, lse = deepseek_ops.mla_decode(**{**args, "q": q}, metadata=meta)
    assert_bitwise_equal(out, expected)
    assert_bitwise_equal(lse, expected_lse, "lse")


def test_bad_cache_writes():
    kv = torch.zeros(2, 64, 1, 576, dtype=torch.bfloat16)
    bt, pos = torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32)
    c_kv, k_pe = torch.zeros(1, 1, 512, dtype=torch.bfloat16), torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"'k_pe'.*shape"):
        deepseek_ops.mla_cache_append(kv, bt, pos, c_kv, k_pe[..., :32])
    with pytest.raises(ValueError, match=r"'positions'.*dtype"):
        deepseek_ops.mla_cache_append(kv, bt, pos.long(), c_kv, k_pe)
    with pytest.raises(ValueError, match=r"'kv_cache'.*page size"):
        deepseek_ops.mla_cache_append(kv.reshape(4, 32, 1, 576), bt, pos, c_kv, k_pe)
    with pytest.raises(ValueError, match=r"'kv'.*576"):
        deepseek_ops.quantize_mla_kv(kv[..., :512])
    with pytest.raises(ValueError, match=r"'kv'.*dtype"):
        deepseek_ops.quantize_mla_kv(kv.float())


def _opcheck_all(device):
    args = _good_args(device)
    meta = deepseek_ops.get_mla_metadata(args["cache_seqlens"], 2, 16)
    out = torch.empty(2, 2, 16, 512, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.deepseek_ops.mla_decode.default,
                          (args["q"], args["kv_cache"], args["block_table"], args["cache_seqlens"], SCALE, True,
                           *meta, out))
    torch.library.opcheck(torch.ops.deepseek_ops.get_mla_metadata.default, (args["cache_seqlens"], 7))
    torch.library.opcheck(torch.ops.deepseek_ops.quantize_mla_kv.default, (args["kv_cache"][:2],))
    positions = torch.tensor([[70, 71], [3, -1]], dtype=torch.int32, device=device)
    c_kv = torch.randn(2, 2, 512, device=device).to(torch.bfloat16)
    k_pe = torch.randn(2, 2, 64, device=device).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.deepseek_ops.mla_cache_append.default,
                          (args["kv_cache"].clone(), args["block_table"], positions, c_kv, k_pe))


def test_opcheck_cpu():
    _opcheck_all("cpu")


def test_compile_fullgraph_cpu():
    args = _good_args()
    expected, expected_lse = deepseek_ops.mla_decode(**args, causal=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, kv_cache, block_table, cache_seqlens):
        meta = deepseek_ops.get_mla_metadata(cache_seqlens, q.shape[1], q.shape[2])
        return deepseek_ops.mla_decode(q, kv_cache, block_table, cache_seqlens, SCALE, causal=True, metadata=meta)

    out, lse = step(args["q"], args["kv_cache"], args["block_table"], args["cache_seqlens"])
    assert_bitwise_equal(out, expected)
    assert_bitwise_equal(lse, expected_lse, "lse")


# ------------------------------------------------------------------------------------------------
# GPU: parity of the kernels
# ------------------------------------------------------------------------------------------------

PARITY_CASES = [  # (B, s_q, h_q, causal)
    (1, 1, 16, False), (1, 2, 64, True), (1, 4, 128, True), (2, 1, 128, False), (2, 4, 16, True),
    (6, 1, 64, False), (6, 2, 16, True), (6, 4, 64, False), (64, 1, 16, False), (64, 2, 128, True),
    (64, 4, 16, True), (64, 1, 128, False), (3, 3, 32, True), (5, 1, 20, False),
]


def _seqlens(batch):
    lens = list(SEQLENS) * (batch // len(SEQLENS) + 1)
    random.shuffle(lens)
    return lens[:batch]


def _check_decode(batch, s_q, h_q, causal, fp8, seqlens=None, edit_cache=None):
    seqlens = seqlens if seqlens is not None else _seqlens(batch)
    q, kv, block_table, cache_seqlens = make_cache(seqlens, s_q, h_q, "cuda", fp8=fp8)
    if edit_cache is not None:
        edit_cache(kv)
    ref_out, ref_lse = reference_decode(q, kv, block_table, cache_seqlens, causal)
    out = poison_(torch.empty(batch, s_q, h_q, 512, dtype=torch.bfloat16, device="cuda"))
    got, lse = deepseek_ops.mla_decode(q, kv, block_table, cache_seqlens, SCALE, causal=causal, out=out)
    torch.cuda.synchronize()
    assert got.data_ptr() == out.data_ptr()
    assert_written(out, "out")
    assert_written(lse, "lse")
    diff = calc_diff(out, ref_out)
    assert diff < OUT_DIFF, f"out calc_diff {diff:.3e} (seqlens {seqlens})"
    empty_rows = ref_lse.isinf().transpose(1, 2)  # [B, s_q, h_q]
    assert (out[empty_rows] == 0).all(), "rows without keys must be exactly 0"
    assert_lse_close(lse, ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, s_q, h_q, causal", PARITY_CASES)
def test_mla_decode_bf16(batch, s_q, h_q, causal):
    _check_decode(batch, s_q, h_q, causal, fp8=False)


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("s_q, causal", [(1, False), (2, True)])
def test_mla_decode_single_length(seqlen, s_q, causal):
    _check_decode(1, s_q, 64, causal, fp8=False, seqlens=[seqlen])


@pytest.mark.gpu
@pytest.mark.parametrize("batch, s_q, h_q, causal", PARITY_CASES[::2])
def test_mla_decode_fp8(batch, s_q, h_q, causal):
    _check_decode(batch, s_q, h_q, causal, fp8=True)


def _every_e4m3_value(power_of_two_scales):
    """Valid FP8 tokens get every non-NaN e4m3 byte (subnormals, -0) and scales either the format's
    powers of two from 2^-22 up to 2^10, or any fp32 from 2^-140 (subnormal) to 2^10 (what the
    kernel reads; larger ones overflow the attention's scores in both)."""
    def edit(kv):
        valid = ~(kv == NAN_BYTE).all(-1)  # make_cache fills whole invalid slots with NAN_BYTE
        raw = torch.randint(0, 254, kv.shape[:-1] + (512,), dtype=torch.int32, device=kv.device)
        kv[..., :512] = torch.where(valid[..., None], raw + (raw >= 0x7F).int(), NAN_BYTE).to(torch.uint8)
        shape = kv.shape[:-1] + (4,)
        if power_of_two_scales:
            scales = torch.exp2(torch.randint(SCALE_EXP_MIN, 11, shape, device=kv.device).float())
        else:
            scales = torch.exp2(torch.rand(shape, device=kv.device) * 150 - 140)
        kv[..., 512:528] = torch.where(valid[..., None], scales.view(torch.uint8), NAN_BYTE)
    return edit


@pytest.mark.gpu
@pytest.mark.parametrize("h_q", [16, 128])
@pytest.mark.parametrize("power_of_two_scales", [True, False])
def test_mla_decode_fp8_every_value_and_scale_range(h_q, power_of_two_scales):
    _check_decode(6, 1, h_q, False, fp8=True, edit_cache=_every_e4m3_value(power_of_two_scales))


@pytest.mark.gpu
def test_mla_decode_fp8_nan_value_reaches_its_request_only():
    """A NaN e4m3 in a visible token makes that request's output NaN, as in the reference."""
    q, kv, block_table, cache_seqlens = make_cache([130, 300, 64], 1, 16, "cuda", fp8=True)
    kv[block_table[0, 1], 5, 0, 77] = 0x7F
    ref_out, _ = reference_decode(q, kv, block_table, cache_seqlens, False)
    out, lse = deepseek_ops.mla_decode(q, kv, block_table, cache_seqlens, SCALE)
    assert ref_out[0].isnan().all() and out[0].isnan().all() and lse[0].isnan().all()
    assert calc_diff(out[1:], ref_out[1:]) < OUT_DIFF


@pytest.mark.gpu
def test_mla_decode_many_splits_and_packed_requests():
    """One very long request split over every SM next to many short ones sharing SMs."""
    _check_decode(40, 1, 128, False, fp8=False, seqlens=[65536] + [random.randint(0, 300) for _ in range(39)])


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 130])
def test_metadata_matches_reference(batch):
    seqlens = torch.randint(0, 20000, (batch,), dtype=torch.int32)
    seqlens[0] = 0
    got = deepseek_ops.get_mla_metadata(seqlens.cuda(), 2, 64)
    expected = reference.get_mla_metadata(seqlens, got[0].shape[0])
    assert_bitwise_equal(got[0].cpu(), expected[0], "tile_sched")
    assert_bitwise_equal(got[1].cpu(), expected[1], "split_offsets")


@pytest.mark.gpu
def test_metadata_reused_across_layers():
    q, kv, block_table, cache_seqlens = make_cache(_seqlens(6), 2, 64, "cuda")
    meta = deepseek_ops.get_mla_metadata(cache_seqlens, 2, 64)
    for _ in range(2):  # two layers of one step: new q, same schedule
        q = torch.randn_like(q, dtype=torch.float32).to(torch.bfloat16)
        out, lse = deepseek_ops.mla_decode(q, kv, block_table, cache_seqlens, SCALE, causal=True, metadata=meta)
        ref_out, ref_lse = reference_decode(q, kv, block_table, cache_seqlens, True)
        assert calc_diff(out, ref_out) < OUT_DIFF
        assert_lse_close(lse, ref_lse)


@pytest.mark.gpu
def test_cuda_graph_replay():
    """Captured metadata + decode replayed on new lengths written in place: no host sync inside."""
    seqlens = [300, 5000, 64]
    q, kv, block_table, cache_seqlens = make_cache(seqlens, 1, 16, "cuda")
    out = torch.empty(3, 1, 16, 512, dtype=torch.bfloat16, device="cuda")
    deepseek_ops.mla_decode(q, kv, block_table, cache_seqlens, SCALE, out=out)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse = deepseek_ops.mla_decode(q, kv, block_table, cache_seqlens, SCALE, out=out)
    for new_lens in ([300, 5000, 64], [17, 4999, 0]):
        cache_seqlens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        poison_(out)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = reference_decode(q, kv, block_table, cache_seqlens, False)
        assert_written(out)
        assert calc_diff(out, ref_out) < OUT_DIFF
        assert_lse_close(lse, ref_lse)


@pytest.mark.gpu
def test_device_seqlens_past_block_table_are_clamped():
    """Contract breach with seqlens on the GPU: no fault, and only the request's own columns are read."""
    q, kv, block_table, cache_seqlens = make_cache([64, 128], 1, 16, "cuda", extra_cols=0)
    kv = torch.nan_to_num(kv, nan=0.0)
    block_table[0, 1] = block_table[1, 0]  # the clamped length reads column 1 of request 0's row: make it a page
    cache_seqlens.fill_(10**6)  # far past the 1 and 2 columns of the table
    out, lse = deepseek_ops.mla_decode(q, kv, block_table, cache_seqlens, SCALE)
    torch.cuda.synchronize()
    clamped = torch.tensor([128, 128], dtype=torch.int32, device="cuda")
    ref_out, ref_lse = reference_decode(q, kv, block_table, clamped, False)
    assert calc_diff(out, ref_out) < OUT_DIFF
    assert_lse_close(lse, ref_lse)


@pytest.mark.gpu
def test_quantize_mla_kv_matches_reference():
    kv = (torch.randn(37, 64, 1, 576, device="cuda") * torch.logspace(-3, 2, 576, device="cuda")).to(torch.bfloat16)
    kv[0, 0] = 0  # an all-zero token takes the scale floor
    assert_bitwise_equal(deepseek_ops.quantize_mla_kv(kv).cpu(), reference.quantize_mla_kv(kv.cpu()))


@pytest.mark.gpu
def test_quantize_mla_kv_every_value_and_scale_range_match_reference():
    """The kernel's scales are the reference's powers of two at the edges of the range, and every
    e4m3 value under every scale re-quantizes to its own bytes."""
    packed = every_e4m3_tokens()
    assert_bitwise_equal(deepseek_ops.quantize_mla_kv(reference.dequantize_mla_kv(packed).cuda()).cpu(), packed,
                         "re-quantized tokens")
    kv = extreme_latents()
    got, expected = deepseek_ops.quantize_mla_kv(kv.cuda()).cpu(), reference.quantize_mla_kv(kv)
    assert_bitwise_equal(got[:-1], expected[:-1], "finite tokens")
    # The token with an inf: inf * 0 is a NaN whose sign differs between x86 and the GPU; e4m3 keeps it.
    got_values, got_scales, got_rope = split_tokens(got[-1])
    values, scales, rope = split_tokens(expected[-1])
    assert_bitwise_equal(got_scales, scales, "scales of the token with an inf")
    assert torch.equal(got_values.isnan(), values.isnan()) and values.isnan().sum() == 1
    assert_bitwise_equal(got_values[~values.isnan()], values[~values.isnan()], "its other values")
    assert_bitwise_equal(got_rope, rope, "its RoPE")


@pytest.mark.gpu
def test_misaligned_q_and_out():
    """q at a 2-byte offset is copied to an aligned start (same result); such an out is rejected
    before launch, by the public function (ValueError) and by the op itself (RuntimeError)."""
    args = _good_args("cuda")
    expected, expected_lse = deepseek_ops.mla_decode(**args)
    q = misaligned(args["q"].shape, device="cuda")
    q.copy_(args["q"])
    out, lse = deepseek_ops.mla_decode(**{**args, "q": q})
    assert_bitwise_equal(out, expected)
    assert_bitwise_equal(lse, expected_lse, "lse")
    bad_out = misaligned(expected.shape, device="cuda")
    with pytest.raises(ValueError, match=r"'out'.*16-byte aligned"):
        deepseek_ops.mla_decode(**args, out=bad_out)
    meta = deepseek_ops.get_mla_metadata(args["cache_seqlens"], 2, 16)
    raw = (args["kv_cache"], args["block_table"], args["cache_seqlens"], SCALE, False, *meta)
    with pytest.raises(RuntimeError, match=r"mla_decode: q must start at a 16-byte aligned address"):
        torch.ops.deepseek_ops.mla_decode(q, *raw, out)
    with pytest.raises(RuntimeError, match=r"mla_decode: out must start at a 16-byte aligned address"):
        torch.ops.deepseek_ops.mla_decode(args["q"], *raw, bad_out)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_mla_cache_append_matches_reference(fp8):
    num_blocks, batch, tokens = 20, 5, 3
    kv = torch.randn(num_blocks, 64, 1, 576, device="cuda").to(torch.bfloat16)
    if fp8:
        kv = deepseek_ops.quantize_mla_kv(kv)
    block_table = torch.randperm(num_blocks, device="cuda")[:batch * 4].reshape(batch, 4).int()
    block_table[0, 3] = 10**6  # out of the cache: skipped
    positions = torch.stack([torch.randperm(135)[:tokens] + 65 for _ in range(batch)]).int().cuda()  # no repeats
    positions[0, 0], positions[1, 0], positions[2, 0], positions[0, 1] = -1, 300, 64, 200
    c_kv = torch.randn(batch, tokens, 512, device="cuda").to(torch.bfloat16)
    k_pe = torch.randn(batch, tokens, 64, device="cuda").to(torch.bfloat16)
    expected = kv.cpu().clone()
    reference.mla_cache_append(expected, block_table.cpu(), positions.cpu(), c_kv.cpu(), k_pe.cpu())
    deepseek_ops.mla_cache_append(kv, block_table, positions, c_kv, k_pe)
    assert_bitwise_equal(kv.cpu(), expected, "kv_cache")


@pytest.mark.gpu
def test_opcheck_cuda():
    _opcheck_all("cuda")
