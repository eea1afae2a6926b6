"""FP8 quantization ops: reference semantics and bad inputs (CPU), CUDA kernels bit for bit (gpu)."""
import itertools

import pytest
import torch

import deepseek_ops
from deepseek_ops import reference
from deepseek_ops._selftest import QUANT_ULP_BOUND, _e4m3_ulp
from deepseek_ops.testing import assert_bitwise_equal, assert_written

FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ops = torch.ops.deepseek_ops


def random_rows(m, k, dtype=torch.float32, device="cpu"):
    """Random values whose rows span 2**-12 .. 2**7 in magnitude (scales across many binades)."""
    x = torch.randn(m, k) * torch.exp2(torch.randint(-12, 8, (m, 1)).float())
    return x.to(dtype=dtype, device=device)


def group_amax(x, group):
    m, k = x.shape
    return x.double().reshape(m, k // group, group).abs().amax(-1)


def expected_scales(amax, ue8m0=False):
    # float64 quotient rounded once = IEEE fp32 division
    scale = (amax.clamp(min=deepseek_ops.FP8_SCALE_FLOOR) / 448.0).float()
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale.double()))).float()
    return scale


def assert_round_trip(x, q, scales_full):
    """|x - q * s| <= half an e4m3 ulp of q, times s (plus the fp32 quotient's rounding)."""
    exact = x.double() / scales_full.double()
    err = (exact - q.double()).abs() / _e4m3_ulp(q.double())
    assert float(err.max()) <= QUANT_ULP_BOUND, f"round trip error {float(err.max())} ulp"
    assert torch.all((x.double() - q.double() * scales_full.double()).abs()
                     <= QUANT_ULP_BOUND * _e4m3_ulp(q.double()) * scales_full.double())


# ----------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m,k", [(1, 128), (37, 384), (130, 1024)])
def test_token_group_scales_and_round_trip(dtype, group, m, k):
    x = random_rows(m, k, dtype)
    q, s = deepseek_ops.per_token_group_quant_fp8(x, group)
    assert q.dtype == FP8 and q.shape == (m, k)
    assert s.dtype == torch.float32 and s.shape == (m, k // group) and s.is_contiguous()
    assert torch.equal(s, expected_scales(group_amax(x, group)))
    assert_round_trip(x, q, s.repeat_interleave(group, 1))
    # The amax element of every group maps to +-448 (the scale uses the full e4m3 range).
    assert torch.all(q.float().reshape(m, k // group, group).abs().amax(-1) == 448.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [64, 128])
def test_token_group_ue8m0_power_of_two_at_least_true_scale(dtype, group):
    x = random_rows(65, 512, dtype)
    q, s = deepseek_ops.per_token_group_quant_fp8(x, group, scale_fmt="ue8m0")
    true_scale = group_amax(x, group).clamp(min=deepseek_ops.FP8_SCALE_FLOOR) / 448.0
    assert torch.all(s.view(torch.int32) & 0x7FFFFF == 0), "ue8m0 scales must be powers of two"
    assert torch.all(s.double() >= true_scale) and torch.all(s.double() < 2 * true_scale)
    assert torch.equal(s, expected_scales(group_amax(x, group), ue8m0=True))
    assert_round_trip(x, q, s.repeat_interleave(group, 1))


def test_ue8m0_exact_power_of_two_stays():
    # amax = 448 * 2**-3 gives a true scale of exactly 2**-3: rounding up must keep it.
    x = torch.rand(2, 128) * 50
    x[:, 5] = 56.0
    _, s = deepseek_ops.per_token_group_quant_fp8(x, 128, scale_fmt="ue8m0")
    assert torch.all(s == 0.125)


def test_scale_floor():
    x = (torch.rand(3, 256) * 2 - 1) * 1e-14  # amax far below the floor
    q, s = deepseek_ops.per_token_group_quant_fp8(x)
    assert torch.all(s == torch.tensor(deepseek_ops.FP8_SCALE_FLOOR / 448.0, dtype=torch.float32))
    assert_round_trip(x, q, s.repeat_interleave(128, 1))


def test_gradient_sized_groups_get_their_own_scale():
    """Activation gradients' 1 x 128 groups fall far below amax 1e-4 (the tiny preset's backward: ~1e-5
    and less): each is scaled by its own amax, so its largest value maps to e4m3's 448, not to a floor's
    fraction of it."""
    x = (torch.rand(3, 256) * 2 - 1) * 1e-6
    q, s = deepseek_ops.per_token_group_quant_fp8(x)
    assert torch.equal(s, expected_scales(group_amax(x, 128)))
    assert torch.all(q.float().abs().reshape(3, 2, 128).amax(-1) == 448)
    assert_round_trip(x, q, s.repeat_interleave(128, 1))


@pytest.mark.parametrize("m", [1, 5, 8, 129])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_column_major_scales(m, ue8m0):
    x = random_rows(m, 512)
    fmt = "ue8m0" if ue8m0 else None
    q_row, s_row = deepseek_ops.per_token_group_quant_fp8(x, 128, fmt)
    q_col, s_col = deepseek_ops.per_token_group_quant_fp8(x, 128, fmt, column_major_scales=True)
    m_pad = (m + 3) // 4 * 4
    assert s_col.shape == (m, 4) and s_col.stride() == (1, m_pad)
    assert s_col.untyped_storage().nbytes() >= 4 * m_pad * 4
    assert torch.equal(q_col.view(torch.uint8), q_row.view(torch.uint8))
    assert torch.equal(s_col, s_row)


@pytest.mark.parametrize("column_major", [False, True])
def test_token_group_empty(column_major):
    q, s = deepseek_ops.per_token_group_quant_fp8(torch.randn(0, 384), 128, None, column_major)
    assert q.shape == (0, 384) and q.dtype == FP8
    assert s.shape == (0, 3) and s.dtype == torch.float32


def test_token_group_non_contiguous_input():
    base = random_rows(256, 96 * 8)
    for x in (base[:, :384], base.t().contiguous().t()[:100], base[::2]):
        assert not x.is_contiguous()
        q, s = deepseek_ops.per_token_group_quant_fp8(x)
        q_ref, s_ref = deepseek_ops.per_token_group_quant_fp8(x.contiguous())
        assert_bitwise_equal(q, q_ref, "x_fp8")
        assert_bitwise_equal(s, s_ref, "scales")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 128, 200, 576])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_per_block_partial_edge_blocks(dtype, n, ue8m0):
    k = 384
    w = torch.randn(n, k).to(dtype)
    q, s = deepseek_ops.per_block_quant_fp8(w, 128, "ue8m0" if ue8m0 else None)
    nb = -(-n // 128)
    assert q.shape == (n, k) and q.dtype == FP8 and s.shape == (nb, 3)
    # Each scale comes from the rows that exist: the partial last block row is not padded with data.
    amax = torch.stack([w[i * 128:(i + 1) * 128].double().abs().reshape(-1, 3, 128).amax((0, 2))
                        for i in range(nb)])
    assert torch.equal(s, expected_scales(amax, ue8m0))
    assert_round_trip(w, q, reference.expand_block_scales(s, n, k))


def test_per_block_empty():
    q, s = deepseek_ops.per_block_quant_fp8(torch.randn(0, 256))
    assert q.shape == (0, 256) and s.shape == (0, 2)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 200, 576])
def test_dequant_inverts_block_quant(out_dtype, n):
    w = torch.randn(n, 256)
    q, s = deepseek_ops.per_block_quant_fp8(w)
    out = deepseek_ops.dequant_fp8_block(q, s, 128, out_dtype)
    assert out.dtype == out_dtype and out.shape == (n, 256)
    # One fp8 value times one fp32 scale is exact in float64; rounded once to fp32, then to out_dtype.
    rows = torch.arange(n) // 128
    exact = q.double() * s.double()[rows][:, torch.arange(256) // 128]
    assert_bitwise_equal(out, exact.float().to(out_dtype), "dequant")
    assert_round_trip(w, q, reference.expand_block_scales(s, n, 256))


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """The unfused activation the model computed before silu_mul_quant_fp8: (silu(gate) * up) in h's dtype."""
    k = h.shape[1] // 2
    return (torch.nn.functional.silu(h[:, :k].float()) * h[:, k:].float()).to(h.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(0, 128), (1, 128), (37, 384), (130, 1024)])
@pytest.mark.parametrize("column_major", [False, True])
def test_silu_mul_quant_is_quant_of_swiglu(dtype, m, k, column_major):
    h = random_rows(m, 2 * k, dtype)
    for scale_fmt in (None, "ue8m0"):
        q, s = deepseek_ops.silu_mul_quant_fp8(h, scale_fmt, column_major)
        q_ref, s_ref = deepseek_ops.per_token_group_quant_fp8(swiglu(h), 128, scale_fmt, column_major)
        assert_bitwise_equal(q, q_ref, "values")
        assert_bitwise_equal(s, s_ref, "scales")
        assert s.stride() == s_ref.stride()
    q, s = deepseek_ops.silu_mul_quant_fp8(h)
    act = swiglu(h).float()
    finite = act.isfinite().all(1)  # fp16 rows of large magnitude overflow (inf in both, bitwise checked above)
    if finite.any():
        assert_round_trip(act[finite], q.float()[finite], s.repeat_interleave(128, dim=1)[finite])


def test_bad_inputs_silu_mul_quant():
    f = deepseek_ops.silu_mul_quant_fp8
    with pytest.raises(ValueError, match=r"argument 'h': expected dtype .*got torch.int32"):
        f(torch.ones(2, 256, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"argument 'h': expected rank 2 .*got shape \(2, 3, 256\)"):
        f(torch.randn(2, 3, 256))
    with pytest.raises(ValueError, match=r"argument 'h': 2K \(h.shape\[1\].*must be a multiple of 256, got 384"):
        f(torch.randn(2, 384))
    with pytest.raises(ValueError, match=r"argument 'scale_fmt': expected one of .*got 'e8m0'"):
        f(torch.randn(2, 256), "e8m0")


# ----------------------------------------------------------------------------------- bad input


def test_bad_inputs_token_group():
    f = deepseek_ops.per_token_group_quant_fp8
    with pytest.raises(ValueError, match=r"argument 'x': expected dtype .*bfloat16.*got torch.int32"):
        f(torch.ones(2, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"argument 'x': expected dtype .*got torch.float8_e4m3fn"):
        f(torch.randn(2, 128).to(FP8))
    with pytest.raises(ValueError, match=r"argument 'x': expected rank 2 .*got shape \(2, 3, 128\)"):
        f(torch.randn(2, 3, 128))
    with pytest.raises(ValueError, match=r"argument 'x': K \(x.shape\[1\]\) must be a multiple of 128, got 200"):
        f(torch.randn(2, 200))
    with pytest.raises(ValueError, match=r"argument 'x': K \(x.shape\[1\]\) must be a multiple of 64, got 96"):
        f(torch.randn(2, 96), 64)
    with pytest.raises(ValueError, match=r"argument 'group_size': expected one of \(32, 64, 128\), got 96"):
        f(torch.randn(2, 384), 96)
    with pytest.raises(ValueError, match=r"argument 'scale_fmt': expected one of .*got 'e8m0'"):
        f(torch.randn(2, 128), 128, "e8m0")
    with pytest.raises(ValueError, match=r"argument 'x': expected a torch.Tensor, got list"):
        f([[1.0] * 128])


def test_bad_inputs_per_block():
    f = deepseek_ops.per_block_quant_fp8
    with pytest.raises(ValueError, match=r"argument 'w': expected dtype .*got torch.float64"):
        f(torch.randn(4, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"argument 'w': expected rank 2"):
        f(torch.randn(128))
    with pytest.raises(ValueError, match=r"argument 'w': K \(w.shape\[1\]\) must be a multiple of 128, got 200"):
        f(torch.randn(4, 200))
    with pytest.raises(ValueError, match=r"argument 'block_size': expected one of \(128,\), got 64"):
        f(torch.randn(4, 128), 64)
    with pytest.raises(ValueError, match=r"argument 'scale_fmt'"):
        f(torch.randn(4, 128), 128, "fp32")


def test_bad_inputs_dequant():
    q, s = deepseek_ops.per_block_quant_fp8(torch.randn(200, 256))
    f = deepseek_ops.dequant_fp8_block
    with pytest.raises(ValueError, match=r"argument 'scales': expected shape \(2, 2\) for w of shape "
                                         r"\(200, 256\), got \(1, 2\)"):
        f(q, s[:1])
    with pytest.raises(ValueError, match=r"argument 'scales': expected dtype torch.float32, got torch.bfloat16"):
        f(q, s.bfloat16())
    with pytest.raises(ValueError, match=r"argument 'w': expected dtype torch.float8_e4m3fn, got torch.float32"):
        f(q.float(), s)
    with pytest.raises(ValueError, match=r"argument 'out_dtype': expected one of .*got torch.int32"):
        f(q, s, 128, torch.int32)
    with pytest.raises(ValueError, match=r"argument 'w': K \(w.shape\[1\]\) must be a multiple of 128, got 192"):
        f(q[:, :192], s)
    # A device mix is refused before any kernel runs (a meta tensor stands in for the GPU here).
    with pytest.raises(ValueError, match=r"argument 'scales': expected device meta .*got cpu"):
        f(q.to("meta"), s)


@pytest.mark.gpu
def test_bad_inputs_cpu_cuda_mix():
    q, s = deepseek_ops.per_block_quant_fp8(torch.randn(200, 256, device="cuda"))
    with pytest.raises(ValueError, match=r"argument 'scales': expected device cuda:0 .*got cpu"):
        deepseek_ops.dequant_fp8_block(q, s.cpu())


# ---------------------------------------------------------------------- opcheck, compile, meta

OPCHECK_CASES = [
    ("per_token_group_quant_fp8", lambda dev: (random_rows(33, 384, device=dev), 128, False, False)),
    ("per_token_group_quant_fp8", lambda dev: (random_rows(7, 256, torch.bfloat16, dev), 64, True, True)),
    ("per_token_group_quant_fp8", lambda dev: (random_rows(0, 128, device=dev), 32, False, True)),
    ("silu_mul_quant_fp8", lambda dev: (random_rows(33, 512, torch.bfloat16, dev), False, False)),
    ("silu_mul_quant_fp8", lambda dev: (random_rows(5, 256, device=dev), True, True)),
    ("per_block_quant_fp8", lambda dev: (torch.randn(200, 256, device=dev, dtype=torch.float16), 128, False)),
    ("per_block_quant_fp8", lambda dev: (torch.randn(129, 128, device=dev), 128, True)),
    ("dequant_fp8_block", lambda dev: (*reference.per_block_quant_fp8(torch.randn(200, 256, device=dev), 128, False),
                                       128, torch.bfloat16)),
]


def _opcheck(op, args):
    test_utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if any(isinstance(a, torch.Tensor) and a.dtype == FP8 for a in args):
        # NOTE: torch's SchemaCheckMode compares inputs with allclose, which has no fp8 kernel; the
        # no-mutation part of test_schema is checked by hand instead.
        test_utils.remove("test_schema")
        before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
        getattr(ops, op).default(*args)
        for b, a in zip(before, [a for a in args if isinstance(a, torch.Tensor)]):
            assert_bitwise_equal(a, b, "input after the call")
    torch.library.opcheck(getattr(ops, op).default, args, test_utils=test_utils)


@pytest.mark.parametrize("op,make_args", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_cpu(op, make_args):
    _opcheck(op, make_args("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("op,make_args", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_cuda(op, make_args):
    _opcheck(op, make_args("cuda"))


def test_compile_fullgraph_cpu():
    def quantize_round_trip(x, w):
        xq, xs = deepseek_ops.per_token_group_quant_fp8(x, 128, column_major_scales=True)
        wq, ws = deepseek_ops.per_block_quant_fp8(w)
        return xq, xs, deepseek_ops.dequant_fp8_block(wq, ws, 128, torch.float32)

    x, w = random_rows(16, 256, torch.bfloat16), torch.randn(200, 256)
    compiled = torch.compile(quantize_round_trip, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, w), quantize_round_trip(x, w)):
        assert_bitwise_equal(got, want)


def test_meta_shapes():
    xq, xs = deepseek_ops.per_token_group_quant_fp8(torch.empty(10, 512, device="meta"), 64,
                                                    column_major_scales=True)
    assert xq.shape == (10, 512) and xq.dtype == FP8 and xs.shape == (10, 8) and xs.stride() == (1, 12)
    aq, as_ = deepseek_ops.silu_mul_quant_fp8(torch.empty(10, 512, device="meta"), column_major_scales=True)
    assert aq.shape == (10, 256) and aq.dtype == FP8 and as_.shape == (10, 2) and as_.stride() == (1, 12)
    wq, ws = deepseek_ops.per_block_quant_fp8(torch.empty(200, 384, device="meta"))
    assert wq.shape == (200, 384) and ws.shape == (2, 3)


# ------------------------------------------------------------------------------ CUDA kernels


def _poison_cuda_allocator(nbytes: int):
    """Leaves NaN bytes (0xFF is NaN in fp32 and e4m3) in the cached blocks the op will reuse, so
    elements the kernel fails to write show up as NaN in assert_written."""
    torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0xFF)


def _bitwise_vs_reference(fn_ours, fn_ref, *args):
    outs = fn_ours(*args)
    refs = fn_ref(*args)
    for name, got, want in zip(("values", "scales"), outs, refs):
        assert_written(got, name)
        assert_bitwise_equal(got, want, name)
        assert got.stride() == want.stride(), f"{name}: strides {got.stride()} != {want.stride()}"


TOKEN_CASES = list(itertools.product(DTYPES, [0, 1, 7, 129, 1000, 4096], [128, 384, 7168], [32, 64, 128]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,m,k,group", TOKEN_CASES)
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("column_major", [False, True])
def test_cuda_token_group_bitwise(dtype, m, k, group, ue8m0, column_major):
    x = random_rows(m, k, dtype, "cuda")
    _poison_cuda_allocator(2 * m * k + 64)
    _bitwise_vs_reference(
        lambda t: deepseek_ops.per_token_group_quant_fp8(t, group, "ue8m0" if ue8m0 else None, column_major),
        lambda t: reference.per_token_group_quant_fp8(t, group, ue8m0, column_major), x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,m,k", list(itertools.product(DTYPES, [0, 1, 7, 129, 1000], [128, 2048])))
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("column_major", [False, True])
def test_cuda_silu_mul_quant_bitwise(dtype, m, k, ue8m0, column_major):
    """Against the reference run on the GPU (PyTorch's CUDA silu: the same expf and rounding)."""
    # Rows up to 2**3 in magnitude: silu(gate) * up stays finite in fp16 (an inf would quantize to NaN,
    # which the poisoned-output check cannot tell from an unwritten element).
    h = (random_rows(m, 2 * k) / 16).to(device="cuda", dtype=dtype)
    _poison_cuda_allocator(2 * m * k + 64)
    _bitwise_vs_reference(lambda t: deepseek_ops.silu_mul_quant_fp8(t, "ue8m0" if ue8m0 else None, column_major),
                          lambda t: reference.silu_mul_quant_fp8(t, ue8m0, column_major), h)


@pytest.mark.gpu
def test_cuda_silu_mul_quant_non_contiguous_and_extremes():
    base = random_rows(300, 4096, torch.bfloat16, "cuda")
    base[0, :64] = 1e4  # exp(-g) underflows to 0: silu(g) = g
    base[1, :64] = -1e4  # exp(-g) overflows to inf: silu(g) = -0, a group of zeros gets the floor scale
    for h in (base, base[::2], base[:, 1024:3072]):
        q, s = deepseek_ops.silu_mul_quant_fp8(h)
        q_ref, s_ref = reference.silu_mul_quant_fp8(h.contiguous(), False, False)
        assert_bitwise_equal(q, q_ref, "values")
        assert_bitwise_equal(s, s_ref, "scales")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_token_group_matches_cpu_reference(dtype):
    # The references above ran on the GPU; the CPU kernel is the definition.
    x = random_rows(1000, 7168, dtype, "cuda")
    for ue8m0 in (False, True):
        q, s = deepseek_ops.per_token_group_quant_fp8(x, 128, "ue8m0" if ue8m0 else None)
        q_ref, s_ref = deepseek_ops.per_token_group_quant_fp8(x.cpu(), 128, "ue8m0" if ue8m0 else None)
        assert_bitwise_equal(q, q_ref, "values")
        assert_bitwise_equal(s, s_ref, "scales")


@pytest.mark.gpu
def test_cuda_token_group_non_contiguous():
    base = random_rows(512, 2048, torch.bfloat16, "cuda")
    for x in (base[:, 256:1024], base.t().contiguous().t(), base[::3], base[:, :768].t().contiguous().t()):
        q, s = deepseek_ops.per_token_group_quant_fp8(x)
        q_ref, s_ref = reference.per_token_group_quant_fp8(x.contiguous(), 128, False, False)
        assert_bitwise_equal(q, q_ref, "values")
        assert_bitwise_equal(s, s_ref, "scales")


@pytest.mark.gpu
def test_cuda_misaligned_and_raw_op_inputs():
    # A contiguous view 2 bytes into its storage cannot be read with 16-byte loads, and the raw
    # torch.ops entry points skip the Python wrappers' .contiguous(): both must still be right.
    flat = torch.randn(64 * 512 + 1, device="cuda").bfloat16()
    x = flat[1:].view(64, 512)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    for fn_ours, fn_ref in [
        (lambda t: ops.per_token_group_quant_fp8(t, 128, False, False),
         lambda t: reference.per_token_group_quant_fp8(t.contiguous(), 128, False, False)),
        (lambda t: ops.per_block_quant_fp8(t, 128, True), lambda t: reference.per_block_quant_fp8(t, 128, True)),
    ]:
        for t in (x, random_rows(512, 256, torch.bfloat16, "cuda").t()):
            _bitwise_vs_reference(fn_ours, fn_ref, t)
    q, s = deepseek_ops.per_block_quant_fp8(torch.randn(256, 512, device="cuda"))
    q_odd = torch.cat([q.view(torch.uint8).flatten().new_zeros(1), q.view(torch.uint8).flatten()])[1:]
    q_odd = q_odd.view(FP8).view(256, 512)
    assert q_odd.data_ptr() % 16 != 0
    out = ops.dequant_fp8_block(q_odd, s.t().contiguous().t(), 128, torch.bfloat16)
    assert_bitwise_equal(out, reference.dequant_fp8_block(q, s, 128, torch.bfloat16), "dequant")


@pytest.mark.gpu
def test_cuda_token_group_saturates_and_extreme_values():
    # Exactly 448 * scale, the scale floor, fp16 max, and bf16 extremes: rounding must agree.
    x = random_rows(64, 1024, torch.float32, "cuda")
    x[0] = 1e-7
    x[1, ::7] = 65504.0
    x[2] = -3.0e38
    x[3, :] = 448.0 * torch.exp2(torch.randint(-20, 20, (1024,), device="cuda").float())
    for ue8m0 in (False, True):
        _bitwise_vs_reference(lambda t: deepseek_ops.per_token_group_quant_fp8(t, 128, "ue8m0" if ue8m0 else None),
                              lambda t: reference.per_token_group_quant_fp8(t, 128, ue8m0, False), x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 200, 576, 7168])
@pytest.mark.parametrize("k", [128, 7168])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_cuda_per_block_bitwise(dtype, n, k, ue8m0):
    w = torch.randn(n, k, device="cuda").to(dtype)
    _poison_cuda_allocator(2 * n * k + 64)
    _bitwise_vs_reference(lambda t: deepseek_ops.per_block_quant_fp8(t, 128, "ue8m0" if ue8m0 else None),
                          lambda t: reference.per_block_quant_fp8(t, 128, ue8m0), w)


@pytest.mark.gpu
def test_cuda_per_block_non_contiguous():
    base = torch.randn(700, 1024, device="cuda", dtype=torch.bfloat16)
    for w in (base[:, 128:640], base[::2], base.t().contiguous().t()):
        q, s = deepseek_ops.per_block_quant_fp8(w)
        q_ref, s_ref = reference.per_block_quant_fp8(w.contiguous(), 128, False)
        assert_bitwise_equal(q, q_ref, "values")
        assert_bitwise_equal(s, s_ref, "scales")


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1, 128), (200, 384), (576, 7168), (7168, 2048)])
def test_cuda_dequant_bitwise(out_dtype, n, k):
    q, s = deepseek_ops.per_block_quant_fp8(torch.randn(n, k, device="cuda"))
    _poison_cuda_allocator(4 * n * k + 64)
    out = deepseek_ops.dequant_fp8_block(q, s, 128, out_dtype)
    assert_written(out, "dequant")
    assert_bitwise_equal(out, reference.dequant_fp8_block(q, s, 128, out_dtype), "dequant")
    assert_bitwise_equal(out, deepseek_ops.dequant_fp8_block(q.cpu(), s.cpu(), 128, out_dtype), "dequant vs cpu")


@pytest.mark.gpu
def test_cuda_quant_on_side_stream_and_second_call():
    # The kernels run on the current stream: results on a side stream equal the default stream's.
    x = random_rows(300, 1024, torch.bfloat16, "cuda")
    expected = deepseek_ops.per_token_group_quant_fp8(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = deepseek_ops.per_token_group_quant_fp8(x)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(got, expected):
        assert_bitwise_equal(a, b)
