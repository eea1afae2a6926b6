"""swiglu_backward_quant_fp8 and grouped_fp8_linear_swiglu: the reference against autograd of the unfused
SwiGLU (bit for bit in h's dtype, and against float64), the op against the unfused quantizations, opcheck,
compile, bad input; the CUDA kernel (gpu) bit for bit against the reference run on the GPU."""
import pytest
import torch

import deepseek_ops
from deepseek_ops import reference
from deepseek_ops.testing import assert_bitwise_equal, assert_written, calc_diff, opcheck_fp8_safe

FP8 = torch.float8_e4m3fn
F = torch.nn.functional


def swiglu_inputs(m: int, k: int, dtype, device="cpu"):
    """h [M, 2K] (gate | up) and dact [M, K] with magnitudes that vary per token and per channel, so each
    1 x 128 group has its own amax both ways; gate spans silu's flat, bent and linear parts."""
    h = torch.randn(m, 2 * k) * 4 * torch.exp2(torch.randint(-3, 3, (1, 2 * k)).float())
    dact = torch.randn(m, k) * torch.exp2(torch.randint(-10, 6, (m, 1)).float())
    dact = dact * torch.exp2(torch.randint(-3, 3, (1, k)).float())
    return dact.to(dtype=dtype, device=device), h.to(dtype=dtype, device=device)


def unfused_dh(dact: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dh by autograd of the line the model ran before the fused op."""
    h = h.detach().clone().requires_grad_()
    gate, up = h.chunk(2, dim=-1)
    act = (F.silu(gate.float()) * up.float()).to(h.dtype)
    (dh,) = torch.autograd.grad(act, h, dact)
    return dh


def dequant_rows(t, scales):
    return t.double() * scales.double().repeat_interleave(128, dim=1)


# ---- reference and CPU op ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 128), (130, 256), (300, 128)])
def test_reference_is_autograd_of_the_unfused_swiglu(dtype, m, k):
    dact, h = swiglu_inputs(m, k, dtype)
    dh = reference.swiglu_backward(dact, h)
    assert dh.dtype == dtype and dh.shape == (m, 2 * k)
    assert_bitwise_equal(dh, unfused_dh(dact, h), "dh")
    # The math, in float64: d/dg silu(g) u = u s (1 + g (1 - s)), d/du = silu(g).
    h64 = h.double().requires_grad_()
    gate, up = h64.chunk(2, dim=-1)
    (dh64,) = torch.autograd.grad(F.silu(gate) * up, h64, dact.double())
    assert calc_diff(dh, dh64) < {torch.float32: 1e-12, torch.float16: 1e-6, torch.bfloat16: 1e-4}[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 128), (130, 256), (256, 384)])
def test_op_is_the_unfused_quantizations(dtype, m, k):
    dact, h = swiglu_inputs(m, k, dtype)
    dh = unfused_dh(dact, h)
    dh_fp8, dh_scales, dh_t, dh_t_scales = deepseek_ops.swiglu_backward_quant_fp8(dact, h)
    m_pad = -(-m // 128) * 128
    assert dh_fp8.shape == (m, 2 * k) and dh_scales.shape == (m, 2 * k // 128)
    assert dh_t.shape == (2 * k, m_pad) and dh_t_scales.shape == (2 * k, m_pad // 128)
    want_fp8, want_scales = deepseek_ops.per_token_group_quant_fp8(dh, 128)
    want_t, want_t_scales = deepseek_ops.transpose_quant_fp8(dh)
    assert_bitwise_equal(dh_fp8, want_fp8, "dh_fp8")
    assert_bitwise_equal(dh_scales, want_scales, "dh_scales")
    assert_bitwise_equal(dh_t, want_t, "dh_t")
    assert_bitwise_equal(dh_t_scales, want_t_scales, "dh_t_scales")
    # Both operands dequantize to dh within e4m3's rounding (3 mantissa bits: relative 2**-4 at most).
    assert calc_diff(dequant_rows(dh_fp8, dh_scales), dh) < 1e-3
    assert calc_diff(dequant_rows(dh_t, dh_t_scales)[:, :m].T, dh) < 1e-3
    # Without the transposed operand: empty [2K, 0] tensors, the same dgrad operand.
    q, s, t, ts = deepseek_ops.swiglu_backward_quant_fp8(dact, h, transposed=False)
    assert t.shape == (2 * k, 0) and ts.shape == (2 * k, 0) and t.dtype == FP8 and ts.dtype == torch.float32
    assert_bitwise_equal(q, dh_fp8) and assert_bitwise_equal(s, dh_scales)


def test_swiglu_backward_quant_opcheck_and_compile_cpu():
    dact, h = swiglu_inputs(130, 256, torch.bfloat16)
    for transposed in (True, False):
        opcheck_fp8_safe(torch.ops.deepseek_ops.swiglu_backward_quant_fp8.default, (dact, h, transposed))
    meta = torch.ops.deepseek_ops.swiglu_backward_quant_fp8(dact.to("meta"), h.to("meta"), True)
    assert [tuple(t.shape) for t in meta] == [(130, 512), (130, 4), (512, 256), (512, 2)]

    def f(dact, h):
        return deepseek_ops.swiglu_backward_quant_fp8(dact, h)

    for got, want in zip(torch.compile(f, fullgraph=True)(dact, h), f(dact, h)):
        assert_bitwise_equal(got, want)


def test_swiglu_backward_quant_rejects_bad_inputs():
    dact, h = swiglu_inputs(4, 128, torch.bfloat16)
    f = deepseek_ops.swiglu_backward_quant_fp8
    with pytest.raises(ValueError, match="argument 'dact': expected dtype"):
        f(dact.to(torch.int32), h)
    with pytest.raises(ValueError, match="argument 'h': expected dtype torch.bfloat16"):
        f(dact, h.float())
    with pytest.raises(ValueError, match="argument 'h': expected rank 2"):
        f(dact, h[None])
    with pytest.raises(ValueError, match=r"argument 'h': 2K \(h.shape\[1\]: gate and up, K a multiple of 128\) must "
                                         r"be a multiple of 256, got 128"):
        f(dact[:, :64], h[:, :128])
    with pytest.raises(ValueError, match=r"argument 'dact': expected shape \(4, 128\), got \(3, 128\)"):
        f(dact[:3], h)
    with pytest.raises(ValueError, match="argument 'h': expected device"):
        f(dact, h.to("meta"))


# ---- grouped_fp8_linear_swiglu: the model's gate/up projection + SwiGLU --------------------------

def _grouped_case(device="cpu"):
    g, n, k = 3, 256, 256  # N = 2 x 128: gate rows then up rows
    offsets = torch.tensor([0, 128, 128, 384], device=device)
    master = (torch.randn(g, n, k) / k ** 0.5).to(device).requires_grad_()
    quant = [deepseek_ops.per_block_quant_fp8(master[e].detach()) for e in range(g)]
    w, w_scale = torch.stack([q[0] for q in quant]), torch.stack([q[1] for q in quant])
    x = torch.randn(384, k, dtype=torch.bfloat16, device=device, requires_grad=True)
    return x, w, w_scale, offsets, master


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_grouped_fp8_linear_swiglu_is_the_unfused_sequence(device):
    x, w, w_scale, offsets, master = _grouped_case(device)
    act = deepseek_ops.grouped_fp8_linear_swiglu(x, w, w_scale, offsets, master_weight=master)
    gate, up = deepseek_ops.grouped_fp8_linear(x, w, w_scale, offsets, master_weight=master).chunk(2, dim=-1)
    act_ref = (F.silu(gate.float()) * up.float()).to(gate.dtype)
    assert act.shape == (384, 128) and act.dtype == torch.bfloat16
    assert_bitwise_equal(act.detach(), act_ref.detach(), "act")
    d_act = torch.randn_like(act)
    grads = torch.autograd.grad(act, (x, master), d_act)
    grads_ref = torch.autograd.grad(act_ref, (x, master), d_act)
    # Bit for bit: the same quantized dy operands reach the same backward GEMMs.
    assert_bitwise_equal(grads[0], grads_ref[0], "dx")
    assert_bitwise_equal(grads[1], grads_ref[1], "dW")
    assert grads[1][1].abs().sum() == 0  # the expert without tokens
    # Only dx (frozen experts): the backward skips the transposed operand.
    (dx,) = torch.autograd.grad(deepseek_ops.grouped_fp8_linear_swiglu(x, w, w_scale, offsets), x, d_act)
    assert_bitwise_equal(dx, grads_ref[0], "dx without dW")


def test_grouped_fp8_linear_swiglu_opcheck_and_bad_inputs():
    x, w, w_scale, offsets, master = _grouped_case()
    torch.library.opcheck(torch.ops.deepseek_ops.grouped_fp8_linear_swiglu_fwd.default,
                          (x, w, w_scale, offsets, master, True),
                          test_utils=["test_autograd_registration", "test_faketensor"])
    with pytest.raises(ValueError, match=r"argument 'weight': N \(weight.shape\[1\]: gate and up rows"):
        deepseek_ops.grouped_fp8_linear_swiglu(x, w[:, :128], w_scale[:, :1], offsets)
    with pytest.raises(ValueError, match="argument 'group_offsets': expected shape"):
        deepseek_ops.grouped_fp8_linear_swiglu(x, w, w_scale, offsets[:3])


# ---- CUDA kernel ----------------------------------------------------------------------------------

# (M, K): M around and off multiples of 128 (partial token tiles), K from one 128-channel tile to the
# model's expert width.
CUDA_SHAPES = [(1, 128), (127, 256), (128, 128), (129, 384), (300, 2048), (1000, 128), (4133, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", CUDA_SHAPES)
@pytest.mark.parametrize("transposed", [True, False])
def test_cuda_swiglu_backward_quant_bitwise(dtype, m, k, transposed):
    dact, h = swiglu_inputs(m, k, dtype, "cuda")
    m_pad = -(-m // 128) * 128
    torch.empty(2 * (4 * m * k + 2 * k * m_pad + 4096), dtype=torch.uint8, device="cuda").fill_(0xFF)  # NaN bytes
    got = deepseek_ops.swiglu_backward_quant_fp8(dact, h, transposed)
    want = reference.swiglu_backward_quant_fp8(dact, h, transposed)  # on the GPU: PyTorch's CUDA silu kernels
    for name, g, w in zip(("dh_fp8", "dh_scales", "dh_t", "dh_t_scales"), got, want):
        assert_written(g, name)
        assert_bitwise_equal(g, w, name)


@pytest.mark.gpu
def test_cuda_swiglu_backward_quant_extremes_and_layouts():
    m, k = 300, 256
    dact, h = swiglu_inputs(m, k, torch.float32, "cuda")
    h[:, 0] = torch.linspace(-100, 100, m, device="cuda")  # exp(-g) overflows / underflows
    h[:, 1] = 0.0
    dact[:, 2] = 0.0  # an all-zero channel: the scale floor along tokens
    dact[7] = 0.0  # an all-zero token: the scale floor along channels
    dact[9, 3], h[9, 3], h[9, k + 3] = 1e30, 1.5, 2.0  # one huge (finite) value: the rest of both groups -> 0
    for dtype in (torch.float32, torch.bfloat16):
        d, hh = dact.to(dtype), h.to(dtype)
        got = deepseek_ops.swiglu_backward_quant_fp8(d, hh)
        for name, g, w in zip(("dh_fp8", "dh_scales", "dh_t", "dh_t_scales"), got,
                              reference.swiglu_backward_quant_fp8(d, hh, True)):
            assert_bitwise_equal(g, w, f"{name} {dtype}")
    # Misaligned and strided inputs through the raw op (which copies them into the kernel's layout).
    flat = torch.randn(m * 2 * k + 1, device="cuda").bfloat16()
    h_misaligned = flat[1:].view(m, 2 * k)
    d_strided = torch.randn(k, m, device="cuda").bfloat16().t()
    want = reference.swiglu_backward_quant_fp8(d_strided.contiguous(), h_misaligned.contiguous(), True)
    for got in (deepseek_ops.swiglu_backward_quant_fp8(d_strided, h_misaligned),
                torch.ops.deepseek_ops.swiglu_backward_quant_fp8(d_strided, h_misaligned, True)):
        for g, w in zip(got, want):
            assert_bitwise_equal(g, w)
    empty = deepseek_ops.swiglu_backward_quant_fp8(dact[:0].bfloat16(), h[:0].bfloat16())
    assert [tuple(t.shape) for t in empty] == [(0, 512), (0, 4), (512, 0), (512, 0)]


@pytest.mark.gpu
def test_cuda_swiglu_backward_quant_opcheck_and_raw_op_checks():
    dact, h = swiglu_inputs(130, 256, torch.bfloat16, "cuda")
    opcheck_fp8_safe(torch.ops.deepseek_ops.swiglu_backward_quant_fp8.default, (dact, h, True))
    with pytest.raises(RuntimeError, match="swiglu_backward_quant_fp8: dact has shape"):
        torch.ops.deepseek_ops.swiglu_backward_quant_fp8(dact[:, :128], h, True)
    with pytest.raises(RuntimeError, match="swiglu_backward_quant_fp8: dact is Float"):
        torch.ops.deepseek_ops.swiglu_backward_quant_fp8(dact.float(), h, True)
