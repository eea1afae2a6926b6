"""fp8_gemm / fp8_linear: parity with the float64 reference, every tile configuration, bad inputs."""
import re

import pytest
import torch

import deepseek_ops
from deepseek_ops import reference
from deepseek_ops.testing import (opcheck_fp8_safe, assert_bitwise_equal, assert_written, calc_diff,
                                  fp8_gemm_tile_configs, max_rel_error, poison_)

FP8 = torch.float8_e4m3fn
CALC_DIFF_BOUND = 1e-5
# max |out - ref| / max |ref|: bf16 rounding (2^-9 relative) dominates; fp32 output is far tighter.
MAX_REL_ERROR = {torch.bfloat16: 2 ** -7, torch.float32: 1e-3}

# (BLOCK_M, BLOCK_N, cluster size) of every compiled dense variant, as the extension reports them.
CONFIGS = fp8_gemm_tile_configs("dense")
CONFIGS_FP32 = fp8_gemm_tile_configs("dense", torch.float32)


def make_operands(m: int, n: int, k: int, device="cuda", column_major: bool = True):
    """Random e4m3 operands (values across the e4m3 range) and random positive scales that differ
    per row/block, so that a scale applied to the wrong rows, columns or K block shows."""
    a = (torch.randn(m, k, device=device) * 3).to(FP8)
    b = (torch.randn(n, k, device=device) * 3).to(FP8)
    a_scales = torch.rand(m, k // 128, device=device) * 2 + 0.05
    b_scales = torch.rand(-(-n // 128), k // 128, device=device) * 2 + 0.05
    if column_major:
        a_scales = reference.column_major_scales(a_scales)
    return a, a_scales, b, b_scales


def _worst(out, ref) -> str:
    """Where the output is furthest off: the pattern of bad rows/columns points at the culprit
    (fragment layout, scale block, edge tile)."""
    err = (out.double() - ref).abs().nan_to_num(float("inf"))
    bad = err > 2 ** -7 * ref.abs().max()
    rows = bad.any(1).nonzero().squeeze(1)[:8].tolist()
    cols = bad.any(0).nonzero().squeeze(1)[:8].tolist()
    idx = divmod(int(err.argmax()), err.shape[1])
    return (f"worst at {idx}: got {out[idx].item()}, expected {ref[idx].item()}; {int(bad.sum())} bad elements, "
            f"first bad rows {rows}, first bad columns {cols}")


def check_parity(out, a, a_scales, b, b_scales, c=None):
    ref = reference.fp8_gemm(a, a_scales, b, b_scales, torch.float64, c)
    assert out.shape == ref.shape
    diff = calc_diff(out, ref)
    rel = max_rel_error(out, ref)
    assert diff < CALC_DIFF_BOUND, f"calc_diff {diff:.3g} >= {CALC_DIFF_BOUND}; {_worst(out, ref)}"
    assert rel < MAX_REL_ERROR[out.dtype], f"max relative error {rel:.3g}; {_worst(out, ref)}"




# ---- GPU parity ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("block_m", [64, 128, 256])
def test_fp8_gemm_single_tile(gemm_config, block_m):
    # The smallest problem: one tile, one K block. If this fails, the rest will too; the message
    # says which rows/columns are wrong (descriptor, swizzle or fragment layout).
    gemm_config(block_m, 128)
    a, a_scales, b, b_scales = make_operands(block_m, 128, 128)
    check_parity(deepseek_ops.fp8_gemm(a, a_scales, b, b_scales), a, a_scales, b, b_scales)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n", [(128, 128), (64, 144), (128, 112), (256, 128), (256, 96)])
def test_fp8_gemm_unit_scales(gemm_config, block_m, block_n):
    # Triage: all scales 1 isolates the MMA path (descriptors, swizzle, fragment layout, edges)
    # from the scale bookkeeping; if this passes and the random-scale tests fail, look at scales.
    gemm_config(block_m, block_n)
    a, _, b, _ = make_operands(200, 2112, 640)
    a_scales = reference.column_major_scales(torch.ones(200, 5, device="cuda"))
    b_scales = torch.ones(17, 5, device="cuda")
    check_parity(deepseek_ops.fp8_gemm(a, a_scales, b, b_scales), a, a_scales, b, b_scales)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [128, 512, 7168])
@pytest.mark.parametrize("n", [16, 112, 2112, 7168])
@pytest.mark.parametrize("m", [0, 1, 7, 64, 65, 127, 128, 1000, 4096])
def test_fp8_gemm_parity(m, n, k):
    a, a_scales, b, b_scales = make_operands(m, n, k)
    out = poison_(torch.empty(m, n, device="cuda", dtype=torch.bfloat16))
    result = deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out=out)
    assert result is out
    assert_written(out)
    check_parity(out, a, a_scales, b, b_scales)
    # Deterministic: the same bits on a repeat (fixed accumulation order, no atomics).
    assert_bitwise_equal(deepseek_ops.fp8_gemm(a, a_scales, b, b_scales), out)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,cluster", CONFIGS)
def test_fp8_gemm_every_config(gemm_config, block_m, block_n, cluster):
    # N = 2112 is 16.5 scale blocks: tiles of widths not dividing 128 straddle two scale blocks,
    # and the last tile of every width is partial. M = 200 and 300 leave partial row blocks (of
    # 256-row tiles: one warpgroup's rows all past M). Clusters: odd column-block counts (a last column
    # in pairs of row blocks, one of them alone).
    gemm_config(block_m, block_n, cluster=cluster)
    for m, n, k in [(200, 2112, 640), (300, 1040, 384), (64, 7168, 256), (1, 16, 128)]:
        a, a_scales, b, b_scales = make_operands(m, n, k)
        out = poison_(torch.empty(m, n, device="cuda", dtype=torch.bfloat16))
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out=out)
        assert_written(out)
        check_parity(out, a, a_scales, b, b_scales)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,cluster", CONFIGS_FP32)
def test_fp8_gemm_every_config_fp32(gemm_config, block_m, block_n, cluster):
    gemm_config(block_m, block_n, cluster=cluster)
    a, a_scales, b, b_scales = make_operands(200, 2112, 640)
    c = torch.randn(200, 2112, device="cuda")
    out = poison_(torch.empty(200, 2112, device="cuda", dtype=torch.float32))
    deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out_dtype=torch.float32, c=c, out=out)
    assert_written(out)
    check_parity(out, a, a_scales, b, b_scales, c)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,stages,cluster", [(128, 128, 2, 1), (128, 128, 3, 1), (128, 128, 5, 1),
                                                           (64, 32, 10, 1), (256, 128, 2, 1), (256, 64, 3, 1),
                                                           (256, 128, 2, 2), (256, 96, 3, 2)])
def test_fp8_gemm_pipeline_depths(gemm_config, block_m, block_n, stages, cluster):
    # Few stages wrap the ring (and flip the mbarrier phase) many times per tile; narrow tiles run
    # the deepest rings. Clusters: the two CTAs' rings wrap in lock-step.
    gemm_config(block_m, block_n, stages, cluster)
    a, a_scales, b, b_scales = make_operands(300, 384, 2048)
    check_parity(deepseek_ops.fp8_gemm(a, a_scales, b, b_scales), a, a_scales, b, b_scales)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,splits", [(64, 64, 2), (64, 16, 4), (128, 112, 3), (64, 192, 8),
                                                    (128, 128, 7)])
@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (65, 2112, 1024), (7, 16, 1024), (200, 1040, 2048)])
def test_fp8_gemm_split_k(gemm_config, block_m, block_n, splits, m, n, k):
    # Split K: each split sums its share of the K blocks (uneven shares where splits does not divide
    # K / 128, e.g. 8 K blocks over 3 or 7 splits) into fp32 partials, a second kernel adds them into
    # out. Partial row and column blocks, and the same bits on a repeat.
    if splits > k // 128:
        pytest.skip("more splits than K blocks is rejected (test_fp8_gemm_split_k_is_validated)")
    gemm_config(block_m, block_n, splits=splits)
    a, a_scales, b, b_scales = make_operands(m, n, k)
    out = poison_(torch.empty(m, n, device="cuda", dtype=torch.bfloat16))
    deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out=out)
    assert_written(out)
    check_parity(out, a, a_scales, b, b_scales)
    assert_bitwise_equal(deepseek_ops.fp8_gemm(a, a_scales, b, b_scales), out)


@pytest.mark.gpu
def test_fp8_gemm_split_k_is_validated(gemm_config):
    a, a_scales, b, b_scales = make_operands(64, 256, 512)
    gemm_config(64, 64, splits=5)  # 4 K blocks
    with pytest.raises(RuntimeError, match="splits of K need"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales)
    gemm_config(64, 64, splits=2)  # split K writes bf16 only, without c
    with pytest.raises(RuntimeError, match="splits of K need"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="splits of K need"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, c=torch.zeros(64, 256, device="cuda"),
                              out_dtype=torch.float32)
    gemm_config(256, 128, cluster=2, splits=2)
    with pytest.raises(RuntimeError, match="splits of K need"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales)


@pytest.mark.gpu
def test_fp8_gemm_config_override_is_validated(gemm_config):
    a, a_scales, b, b_scales = make_operands(128, 128, 128)
    gemm_config(128, 120)
    with pytest.raises(RuntimeError, match="no fp8 gemm kernel"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales)
    gemm_config(128, 128, 99)
    with pytest.raises(RuntimeError, match="does not fit"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales)
    gemm_config(256, 128)  # 256-row tiles are bf16-output only
    with pytest.raises(RuntimeError, match="no fp8 gemm kernel"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out_dtype=torch.float32)
    gemm_config(128, 128, cluster=2)  # clusters serve 256-row tiles
    with pytest.raises(RuntimeError, match="no fp8 gemm kernel"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n", [(0, 0), (64, 64), (128, 112), (128, 160)])
@pytest.mark.parametrize("m,n,k", [(65, 2112, 512), (1000, 7168, 7168)])
def test_fp8_gemm_fp32_out_and_accumulate(gemm_config, block_m, block_n, m, n, k):
    if block_m:
        gemm_config(block_m, block_n)
    a, a_scales, b, b_scales = make_operands(m, n, k)
    out = poison_(torch.empty(m, n, device="cuda", dtype=torch.float32))
    deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out_dtype=torch.float32, out=out)
    assert_written(out)
    check_parity(out, a, a_scales, b, b_scales)
    c = torch.randn(m, n, device="cuda") * 100
    d = deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out_dtype=torch.float32, c=c)
    check_parity(d, a, a_scales, b, b_scales, c)
    # In place: out = c + a @ b^T (weight-gradient accumulation).
    acc = c.clone()
    deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out_dtype=torch.float32, out=acc, c=acc)
    assert_bitwise_equal(acc, d)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 64, 130])
def test_fp8_gemm_scale_layouts_agree(m):
    # Row-major scales are copied into the M-major layout first: the very same bits come out.
    a, a_scales_rm, b, b_scales = make_operands(m, 256, 1024, column_major=False)
    a_scales_cm = reference.column_major_scales(a_scales_rm)
    assert a_scales_cm.stride(0) == 1
    out_cm = deepseek_ops.fp8_gemm(a, a_scales_cm, b, b_scales)
    assert_bitwise_equal(deepseek_ops.fp8_gemm(a, a_scales_rm, b, b_scales), out_cm)
    check_parity(out_cm, a, a_scales_rm, b, b_scales)


@pytest.mark.gpu
def test_fp8_gemm_strided_rows():
    # a and b as column slices of wider buffers (row stride > K, 16-byte aligned starts).
    a_full, _, b_full, _ = make_operands(100, 64, 1024)
    a, b = a_full[:, 256:768], b_full[:, 128:640]
    _, a_scales, _, b_scales = make_operands(100, 64, 512)
    out = deepseek_ops.fp8_gemm(a, a_scales, b, b_scales)
    check_parity(out, a, a_scales, b, b_scales)
    assert_bitwise_equal(out, deepseek_ops.fp8_gemm(a.contiguous(), a_scales, b.contiguous(), b_scales))


@pytest.mark.gpu
def test_fp8_gemm_with_quantized_inputs():
    # End to end with the quantization ops: close to the bf16 product of the unquantized inputs.
    x = torch.randn(333, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1536, 2048, device="cuda", dtype=torch.bfloat16) / 40
    x_fp8, x_scales = deepseek_ops.per_token_group_quant_fp8(x, 128, column_major_scales=True)
    w_fp8, w_scales = deepseek_ops.per_block_quant_fp8(w, 128)
    out = deepseek_ops.fp8_gemm(x_fp8, x_scales, w_fp8, w_scales)
    check_parity(out, x_fp8, x_scales, w_fp8, w_scales)
    assert calc_diff(out, x.double() @ w.double().T) < 1e-3  # FP8 quantization error only


@pytest.mark.gpu
def test_fp8_linear_matches_reference():
    x = torch.randn(2, 5, 7168, device="cuda", dtype=torch.bfloat16)
    w_fp8, w_scales = deepseek_ops.per_block_quant_fp8(torch.randn(2112, 7168, device="cuda") / 80, 128)
    bias = torch.randn(2112, device="cuda", dtype=torch.bfloat16)
    y = deepseek_ops.fp8_linear(x, w_fp8, w_scales, bias)
    assert y.shape == (2, 5, 2112) and y.dtype == torch.bfloat16
    x_fp8, x_scales = reference.per_token_group_quant_fp8(x.reshape(-1, 7168), 128, False, False)
    ref = reference.fp8_gemm(x_fp8, x_scales, w_fp8, w_scales, torch.float64) + bias.double()
    assert calc_diff(y.reshape(10, 2112), ref) < CALC_DIFF_BOUND


@pytest.mark.gpu
def test_fp8_gemm_cuda_graph():
    a, a_scales, b, b_scales = make_operands(64, 7168, 2048)
    out = torch.empty(64, 7168, device="cuda", dtype=torch.bfloat16)
    deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out=out)  # warm-up outside the capture
    expected = out.clone()
    poison_(out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise_equal(out, expected)


@pytest.mark.gpu
def test_fp8_gemm_opcheck_cuda():
    a, a_scales, b, b_scales = make_operands(130, 144, 256)
    opcheck_fp8_safe(torch.ops.deepseek_ops.fp8_gemm.default, (a, a_scales, b, b_scales, torch.bfloat16, None))
    out = torch.empty(130, 144, device="cuda", dtype=torch.float32)
    c = torch.randn(130, 144, device="cuda")
    opcheck_fp8_safe(torch.ops.deepseek_ops.fp8_gemm_out.default, (a, a_scales, b, b_scales, c, out), mutated=(5,))


# ---- CPU: reference, opcheck, torch.compile ---------------------------------------------------

def test_reference_matches_dequant_matmul():
    # The CPU kernel (reference) against an independent path through dequant_fp8_block.
    a, a_scales, b, b_scales = make_operands(33, 272, 384, device="cpu", column_major=False)
    out = deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out_dtype=torch.float32)
    b_deq = deepseek_ops.dequant_fp8_block(b, b_scales, 128, torch.float32).double()
    a_deq = a.double() * a_scales.double().repeat_interleave(128, 1)
    ref = a_deq @ b_deq.T  # b_deq rounded to fp32: agreement to ~fp32 precision, not bits
    assert calc_diff(out, ref) < 1e-12 and max_rel_error(out, ref) < 1e-6


def test_fp8_linear_cpu_shapes():
    x = torch.randn(3, 4, 256, dtype=torch.float32)
    w_fp8, w_scales = deepseek_ops.per_block_quant_fp8(torch.randn(48, 256) / 10, 128)
    bias = torch.randn(48)
    y = deepseek_ops.fp8_linear(x, w_fp8, w_scales, bias)
    assert y.shape == (3, 4, 48) and y.dtype == torch.float32
    ref = x.reshape(12, 256).double() @ deepseek_ops.dequant_fp8_block(w_fp8, w_scales).double().T + bias.double()
    assert calc_diff(y.reshape(12, 48), ref) < 1e-3  # activation quantization error only


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_gemm_zero_rows(device):
    a, a_scales, b, b_scales = make_operands(0, 32, 256, device=device)
    out = deepseek_ops.fp8_gemm(a, a_scales, b, b_scales)
    assert out.shape == (0, 32) and out.dtype == torch.bfloat16


def test_fp8_gemm_opcheck_cpu():
    a, a_scales, b, b_scales = make_operands(9, 48, 256, device="cpu")
    opcheck_fp8_safe(torch.ops.deepseek_ops.fp8_gemm.default, (a, a_scales, b, b_scales, torch.bfloat16, None))
    c = torch.randn(9, 48)
    opcheck_fp8_safe(torch.ops.deepseek_ops.fp8_gemm.default, (a, a_scales, b, b_scales, torch.float32, c))
    out = torch.empty(9, 48)
    opcheck_fp8_safe(torch.ops.deepseek_ops.fp8_gemm_out.default, (a, a_scales, b, b_scales, c, out), mutated=(5,))


def test_fp8_gemm_torch_compile_cpu():
    a, a_scales, b, b_scales = make_operands(17, 64, 256, device="cpu")

    def f(a, a_scales, b, b_scales):
        return deepseek_ops.fp8_gemm(a, a_scales, b, b_scales).float() * 2

    compiled = torch.compile(f, fullgraph=True)
    assert_bitwise_equal(compiled(a, a_scales, b, b_scales), f(a, a_scales, b, b_scales))


# ---- bad inputs (CPU: the checks run before any dispatch) ---------------------------------------

def _ok(m=8, n=32, k=256):
    return make_operands(m, n, k, device="cpu")


def test_rejects_wrong_dtypes():
    a, a_scales, b, b_scales = _ok()
    with pytest.raises(ValueError, match="argument 'a': expected dtype"):
        deepseek_ops.fp8_gemm(a.to(torch.bfloat16), a_scales, b, b_scales)
    with pytest.raises(ValueError, match="argument 'b': expected dtype"):
        deepseek_ops.fp8_gemm(a, a_scales, b.to(torch.bfloat16), b_scales)
    with pytest.raises(ValueError, match="argument 'a_scales': expected dtype"):
        deepseek_ops.fp8_gemm(a, a_scales.half(), b, b_scales)
    with pytest.raises(ValueError, match="argument 'out_dtype'"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out_dtype=torch.float16)


def test_rejects_bad_k_and_n():
    a, a_scales, b, b_scales = make_operands(8, 32, 256, device="cpu")
    with pytest.raises(ValueError, match="K \\(a.shape\\[-1\\]\\) must be a multiple of 128"):
        deepseek_ops.fp8_gemm(a[:, :200], a_scales, b[:, :200], b_scales)
    with pytest.raises(ValueError, match="argument 'b': expected size 256 in dim -1"):
        deepseek_ops.fp8_gemm(a, a_scales, b[:, :128], b_scales[:, :1])
    with pytest.raises(ValueError, match="N \\(b.shape\\[-2\\]\\) must be a multiple of 16"):
        deepseek_ops.fp8_gemm(a, a_scales, b[:24], b_scales)
    empty = torch.empty(8, 0, dtype=FP8)
    with pytest.raises(ValueError, match="positive multiple of 128"):
        deepseek_ops.fp8_gemm(empty, a_scales[:, :0], torch.empty(32, 0, dtype=FP8), b_scales[:, :0])


def test_rejects_scale_shapes():
    a, a_scales, b, b_scales = _ok()
    with pytest.raises(ValueError, match="argument 'a_scales': expected shape \\(8, 2\\)"):
        deepseek_ops.fp8_gemm(a, a_scales[:, :1], b, b_scales)
    with pytest.raises(ValueError, match="argument 'b_scales': expected shape \\(1, 2\\)"):
        deepseek_ops.fp8_gemm(a, a_scales, b, torch.ones(2, 2))


def test_rejects_non_k_major_and_misaligned():
    a, a_scales, b, b_scales = _ok(m=32)
    a_t = a.t().contiguous().t()  # same values, column-major
    with pytest.raises(ValueError, match="argument 'a': expected K-major"):
        deepseek_ops.fp8_gemm(a_t, a_scales, b, b_scales)
    with pytest.raises(ValueError, match="argument 'b': expected K-major"):
        deepseek_ops.fp8_gemm(a, a_scales, b.t().contiguous().t(), b_scales)
    wide = torch.zeros(32, 256 + 8, dtype=FP8)
    with pytest.raises(ValueError, match="argument 'a': expected a row stride"):
        deepseek_ops.fp8_gemm(wide[:, :256], a_scales, b, b_scales)
    flat = torch.zeros(32 * 256 + 4, dtype=FP8)
    with pytest.raises(ValueError, match="argument 'a': expected a 16-byte aligned start"):
        deepseek_ops.fp8_gemm(flat[4:].view(32, 256), a_scales, b, b_scales)


def test_rejects_bad_out_and_c():
    a, a_scales, b, b_scales = _ok()
    with pytest.raises(ValueError, match="argument 'out': expected shape \\(8, 32\\)"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out=torch.empty(8, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="argument 'out': expected dtype torch.bfloat16"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out=torch.empty(8, 32))
    with pytest.raises(ValueError, match="argument 'out': expected a contiguous"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out=torch.empty(32, 8, dtype=torch.bfloat16).t())
    with pytest.raises(ValueError, match="argument 'c': accumulating into c needs out_dtype=torch.float32"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, c=torch.zeros(8, 32))
    with pytest.raises(ValueError, match="argument 'c': expected shape"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out_dtype=torch.float32, c=torch.zeros(8, 16))
    with pytest.raises(ValueError, match="argument 'out': expected device"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out=torch.empty(8, 32, dtype=torch.bfloat16, device="meta"))


def test_rejects_mixed_devices():
    a, a_scales, b, b_scales = _ok()
    with pytest.raises(ValueError, match="argument 'b_scales': expected device"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales.to("meta"))


def test_rejects_bad_linear_inputs():
    w_fp8, w_scales = deepseek_ops.per_block_quant_fp8(torch.randn(32, 256), 128)
    with pytest.raises(ValueError, match="argument 'x': expected size 256 in dim -1"):
        deepseek_ops.fp8_linear(torch.randn(4, 128), w_fp8, w_scales)
    with pytest.raises(ValueError, match="argument 'bias': expected size 32"):
        deepseek_ops.fp8_linear(torch.randn(4, 256), w_fp8, w_scales, torch.zeros(16))


def test_rejects_misaligned_out_and_c():
    a, a_scales, b, b_scales = _ok()
    flat = torch.empty(8 * 32 + 1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="argument 'out': expected a 16-byte aligned start, got storage offset 1 "
                                         "of 2-byte elements"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out=flat[1:].view(8, 32))
    flat32 = torch.zeros(8 * 32 + 1)
    with pytest.raises(ValueError, match="argument 'c': expected a 16-byte aligned start"):
        deepseek_ops.fp8_gemm(a, a_scales, b, b_scales, out_dtype=torch.float32, c=flat32[1:].view(8, 32))


def test_linear_errors_name_its_arguments():
    w_fp8, w_scales = deepseek_ops.per_block_quant_fp8(torch.randn(32, 256), 128)
    x = torch.randn(4, 256)
    with pytest.raises(ValueError, match=r"argument 'weight_scale': expected shape \(1, 2\)"):
        deepseek_ops.fp8_linear(x, w_fp8, w_scales[:, :1])
    with pytest.raises(ValueError, match="argument 'weight_scale': expected dtype torch.float32"):
        deepseek_ops.fp8_linear(x, w_fp8, w_scales.half())
    with pytest.raises(ValueError, match="argument 'weight': N \\(weight.shape\\[-2\\]\\) must be a multiple of 16"):
        deepseek_ops.fp8_linear(x, w_fp8[:24], w_scales)
    with pytest.raises(ValueError, match="argument 'weight': expected dtype torch.float8_e4m3fn"):
        deepseek_ops.fp8_linear(x, w_fp8.float(), w_scales)


def test_linear_rejects_integer_bias():
    w_fp8, w_scales = deepseek_ops.per_block_quant_fp8(torch.randn(32, 256), 128)
    with pytest.raises(ValueError, match="argument 'bias': expected dtype .*got torch.int64"):
        deepseek_ops.fp8_linear(torch.randn(4, 256), w_fp8, w_scales, torch.zeros(32, dtype=torch.int64))


# ---- the eager fast path of the checks ----------------------------------------------------------

def _offset(t: torch.Tensor, elements: int) -> torch.Tensor:
    """t's values in a fresh buffer starting `elements` elements past a (16-byte aligned) allocation."""
    flat = torch.empty(t.numel() + elements, dtype=t.dtype)
    return flat[elements:].view(t.shape).copy_(t)


def _wide(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t's values in rows `pad` elements longer than its last dim."""
    wide = torch.zeros(t.shape[0], t.shape[1] + pad, dtype=t.dtype)
    wide[:, :t.shape[1]] = t
    return wide[:, :t.shape[1]]


def _fast_path_variants(m, n, k, column_major):
    """Per argument of fp8_gemm: valid and broken values, the first one from make_operands."""
    a, a_scales, b, b_scales = make_operands(m, n, k, device="cpu", column_major=column_major)

    def fp8_variants(t):
        return [t, t.view(torch.uint8), t.float(), t[None], t[:, :0], t[:, :k - 128], t.t().contiguous().t(),
                _wide(t, 16), _wide(t, 8), _offset(t, 4), _offset(t, 16), t[:1], t[:0], t.to("meta"), "tensor"]

    def scale_variants(t):
        return [t, t.contiguous(), t.t(), t.half(), t[:, :1], t[None], t[:1], t.to("meta"), 1.0]

    bf16 = torch.bfloat16
    outs = [None, torch.empty(m, n, dtype=bf16), torch.empty(m, n), torch.empty(m, n + 16, dtype=bf16),
            torch.empty(n, m, dtype=bf16).t(), _offset(torch.empty(m, n, dtype=bf16), 1),
            _offset(torch.empty(m, n, dtype=bf16), 8), torch.empty(m, n, dtype=bf16, device="meta"), "out"]
    return [fp8_variants(a), scale_variants(a_scales), fp8_variants(b) + [b[:n - 8]], scale_variants(b_scales),
            [bf16, torch.float32, torch.float16, "bf16"], outs]


@pytest.mark.parametrize("m, n, k, column_major", [(8, 32, 256, True), (33, 272, 384, False), (1, 16, 128, True),
                                                   (0, 48, 384, True)])
def test_fast_path_accepts_only_what_the_checks_accept(m, n, k, column_major):
    # fp8_gemm skips its full checks when gemm._fp8_gemm_ok says they would pass. Over every pair of
    # arguments varied among valid and broken values: each call it accepts must pass the checks, and a
    # call it rejects still gets the checks' error.
    from deepseek_ops.gemm import _check_fp8_gemm, _fp8_gemm_ok

    variants = _fast_path_variants(m, n, k, column_major)
    base = [v[0] for v in variants]
    assert _fp8_gemm_ok(*base), "the fast path must take the usual call"
    accepted = rejected = 0
    for i in range(len(variants)):
        for j in range(i, len(variants)):
            for vi in variants[i]:
                for vj in variants[j]:
                    args = list(base)
                    args[i], args[j] = vi, vj
                    if _fp8_gemm_ok(*args):
                        _check_fp8_gemm(*args, None)  # raises if the fast path accepted a bad call
                        accepted += 1
                        continue
                    try:
                        _check_fp8_gemm(*args, None)
                    except ValueError as e:
                        with pytest.raises(ValueError, match=f"^{re.escape(str(e))}$"):
                            deepseek_ops.fp8_gemm(*args)
                        rejected += 1
    assert accepted > 20 and rejected > 100, (accepted, rejected)
