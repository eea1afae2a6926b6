"""grouped_fp8_gemm_contiguous / grouped_fp8_gemm_masked: per-group parity, layouts, bad inputs."""
import pytest
import torch

import deepseek_ops
from deepseek_ops import reference
from deepseek_ops.testing import (opcheck_fp8_safe, assert_bitwise_equal, assert_written, calc_diff,
                                  fp8_gemm_tile_configs, poison_)

FP8 = torch.float8_e4m3fn
CALC_DIFF_BOUND = 1e-5
CONTIGUOUS_CONFIGS = fp8_gemm_tile_configs("contiguous")
MASKED_CONFIGS = fp8_gemm_tile_configs("masked")
ALIGN = deepseek_ops.GROUPED_GEMM_ALIGNMENT


def random_b(g, n, k, device):
    b = (torch.randn(g, n, k, device=device) * 3).to(FP8)
    b_scales = torch.rand(g, -(-n // 128), k // 128, device=device) * 2 + 0.05
    return b, b_scales


def make_contiguous(sizes, n, k, device="cuda"):
    """Groups of `sizes` rows, each padded to the alignment; padding rows are -1 in m_indices."""
    padded = [-(-s // ALIGN) * ALIGN for s in sizes]
    offsets = [0]
    for p in padded:
        offsets.append(offsets[-1] + p)
    sum_m = offsets[-1]
    a = (torch.randn(sum_m, k, device=device) * 3).to(FP8)
    a_scales = reference.column_major_scales(torch.rand(sum_m, k // 128, device=device) * 2 + 0.05)
    m_indices = torch.full((sum_m,), -1, dtype=torch.int32, device=device)
    for g, (start, rows) in enumerate(zip(offsets, sizes)):
        m_indices[start:start + rows] = g
    b, b_scales = random_b(len(sizes), n, k, device)
    return a, a_scales, b, b_scales, m_indices, torch.tensor(offsets, dtype=torch.int32)


def make_masked(num_groups, m_max, n, k, device="cuda"):
    a = (torch.randn(num_groups, m_max, k, device=device) * 3).to(FP8)
    scales = torch.rand(num_groups * m_max, k // 128, device=device) * 2 + 0.05
    # The fast layout: M-major over the flattened rows, as quantizing a.view(G * M_max, K) gives.
    a_scales = reference.column_major_scales(scales).view(num_groups, m_max, k // 128)
    b, b_scales = random_b(num_groups, n, k, device)
    return a, a_scales, b, b_scales


def group_sizes(num_groups, max_rows):
    """Unequal sizes, always including an empty group and a single-row group when G allows."""
    sizes = torch.randint(0, max_rows + 1, (num_groups,)).tolist()
    if num_groups >= 2:
        sizes[0], sizes[-1] = 0, 1
    return sizes


def check_contiguous(out, a, a_scales, b, b_scales, m_indices):
    for g in range(b.shape[0]):
        rows = (m_indices == g).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        ref = reference.fp8_gemm(a[rows], a_scales[rows], b[g], b_scales[g], torch.float64)
        diff = calc_diff(out[rows], ref)
        assert diff < CALC_DIFF_BOUND, f"group {g} ({rows.numel()} rows): calc_diff {diff:.3g}"


def check_masked(out, a, a_scales, b, b_scales, masked_m):
    for g, rows in enumerate(masked_m.tolist()):
        rows = min(rows, a.shape[1])
        if rows == 0:
            continue
        ref = reference.fp8_gemm(a[g, :rows], a_scales[g, :rows], b[g], b_scales[g], torch.float64)
        diff = calc_diff(out[g, :rows], ref)
        assert diff < CALC_DIFF_BOUND, f"group {g} ({rows} rows): calc_diff {diff:.3g}"




# ---- contiguous ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("num_groups,max_rows,n,k", [(1, 300, 2112, 512), (4, 700, 4096, 1024), (8, 300, 112, 7168),
                                                     (32, 200, 2112, 256), (256, 40, 256, 256)])
def test_contiguous_parity(num_groups, max_rows, n, k):
    a, a_scales, b, b_scales, m_indices, offsets = make_contiguous(group_sizes(num_groups, max_rows), n, k)
    out = poison_(torch.empty(a.shape[0], n, device="cuda", dtype=torch.bfloat16))
    assert deepseek_ops.grouped_fp8_gemm_contiguous(a, a_scales, b, b_scales, m_indices, out=out) is out
    valid = m_indices >= 0
    assert_written(out[valid], "rows of groups")
    # Padding rows are never written (the documented contract): still NaN.
    assert torch.isnan(out[~valid].float()).all(), "padding rows were written"
    check_contiguous(out, a, a_scales, b, b_scales, m_indices)
    # Deterministic, and group_offsets describes the same layout.
    again = deepseek_ops.grouped_fp8_gemm_contiguous(a, a_scales, b, b_scales, group_offsets=offsets.cuda())
    assert_bitwise_equal(again[valid], out[valid])


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,cluster", CONTIGUOUS_CONFIGS)
def test_contiguous_every_config(gemm_config, block_m, block_n, cluster):
    gemm_config(block_m, block_n, cluster=cluster)
    a, a_scales, b, b_scales, m_indices, _ = make_contiguous([130, 0, 1, 257], 2112, 384)
    out = poison_(torch.empty(a.shape[0], 2112, device="cuda", dtype=torch.bfloat16))
    deepseek_ops.grouped_fp8_gemm_contiguous(a, a_scales, b, b_scales, m_indices, out=out)
    assert_written(out[m_indices >= 0])
    # Padding rows share row blocks with valid rows: the epilogue leaves them untouched.
    assert torch.isnan(out[m_indices < 0].float()).all(), "padding rows were written"
    check_contiguous(out, a, a_scales, b, b_scales, m_indices)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,cluster",
                         [c for c in CONTIGUOUS_CONFIGS if c in fp8_gemm_tile_configs("dense")])
def test_contiguous_matches_dense_per_group(gemm_config, block_m, block_n, cluster):
    # One group spanning everything is the dense GEMM: identical bits when both run the same tile
    # config (left to their heuristics they may pick different tiles, hence the forced config).
    gemm_config(block_m, block_n, cluster=cluster)
    a, a_scales, b, b_scales, m_indices, _ = make_contiguous([512], 1024, 1024)
    grouped = deepseek_ops.grouped_fp8_gemm_contiguous(a, a_scales, b, b_scales, m_indices)
    dense = deepseek_ops.fp8_gemm(a, a_scales, b[0], b_scales[0])
    assert_bitwise_equal(grouped, dense, f"grouped vs dense, config {block_m}x{block_n} cluster {cluster}")


@pytest.mark.gpu
def test_contiguous_opcheck_cuda():
    a, a_scales, b, b_scales, m_indices, _ = make_contiguous([128, 256], 144, 256)
    opcheck_fp8_safe(torch.ops.deepseek_ops.grouped_fp8_gemm_contiguous.default,
                          (a, a_scales, b, b_scales, m_indices))


# ---- masked ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("num_groups,m_max,n,k", [(1, 1024, 4096, 512), (4, 256, 7168, 2048), (8, 200, 2112, 512),
                                                  (32, 32, 7168, 256), (256, 16, 256, 256)])
def test_masked_parity(num_groups, m_max, n, k):
    a, a_scales, b, b_scales = make_masked(num_groups, m_max, n, k)
    masked_m = torch.tensor(group_sizes(num_groups, m_max), dtype=torch.int32, device="cuda")
    out = poison_(torch.empty(num_groups, m_max, n, device="cuda", dtype=torch.bfloat16))
    deepseek_ops.grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, expected_m=m_max // 2, out=out)
    rows = torch.arange(m_max, device="cuda")
    valid = rows[None, :] < masked_m[:, None]  # [G, M_max]
    assert_written(out[valid], "rows below masked_m")
    assert torch.isnan(out[~valid].float()).all(), "rows past masked_m were written"
    check_masked(out, a, a_scales, b, b_scales, masked_m)
    again = deepseek_ops.grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, expected_m=m_max // 2)
    assert_bitwise_equal(again[valid], out[valid])


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,cluster", MASKED_CONFIGS)
def test_masked_every_config(gemm_config, block_m, block_n, cluster):
    gemm_config(block_m, block_n, cluster=cluster)
    a, a_scales, b, b_scales = make_masked(3, 200, 2112, 384)
    masked_m = torch.tensor([200, 0, 65], dtype=torch.int32, device="cuda")
    out = poison_(torch.empty(3, 200, 2112, device="cuda", dtype=torch.bfloat16))
    deepseek_ops.grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, 100, out=out)
    assert_written(out[0])
    assert_written(out[2, :65])
    assert torch.isnan(out[1].float()).all() and torch.isnan(out[2, 65:].float()).all(), "rows past masked_m written"
    check_masked(out, a, a_scales, b, b_scales, masked_m)


@pytest.mark.gpu
def test_masked_row_major_scales_agree():
    a, a_scales, b, b_scales = make_masked(4, 96, 512, 512)
    masked_m = torch.tensor([96, 5, 0, 64], dtype=torch.int32, device="cuda")
    fast = deepseek_ops.grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, 64)
    slow = deepseek_ops.grouped_fp8_gemm_masked(a, a_scales.contiguous(), b, b_scales, masked_m, 64)
    for g, rows in enumerate(masked_m.tolist()):
        assert_bitwise_equal(slow[g, :rows], fast[g, :rows])


@pytest.mark.gpu
def test_masked_device_values_above_m_max_are_clamped():
    # A caller error on the device cannot be checked without a sync: it must stay in bounds.
    a, a_scales, b, b_scales = make_masked(2, 64, 256, 256)
    masked_m = torch.tensor([1000, 3], dtype=torch.int32, device="cuda")
    out = torch.zeros(2, 64, 256, device="cuda", dtype=torch.bfloat16)
    deepseek_ops.grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, 64, out=out)
    check_masked(out, a, a_scales, b, b_scales, masked_m)


@pytest.mark.gpu
def test_masked_cuda_graph_reads_masked_m_on_replay():
    a, a_scales, b, b_scales = make_masked(4, 128, 1024, 512)
    masked_m = torch.tensor([128, 128, 128, 128], dtype=torch.int32, device="cuda")
    out = torch.zeros(4, 128, 1024, device="cuda", dtype=torch.bfloat16)
    deepseek_ops.grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, 64, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deepseek_ops.grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, 64, out=out)
    masked_m.copy_(torch.tensor([3, 0, 77, 128], dtype=torch.int32))
    poison_(out)
    graph.replay()
    torch.cuda.synchronize()
    check_masked(out, a, a_scales, b, b_scales, masked_m)
    assert torch.isnan(out[1].float()).all() and torch.isnan(out[0, 3:].float()).all()


@pytest.mark.gpu
def test_masked_opcheck_cuda():
    a, a_scales, b, b_scales = make_masked(2, 64, 144, 256)
    masked_m = torch.tensor([64, 64], dtype=torch.int32, device="cuda")
    opcheck_fp8_safe(torch.ops.deepseek_ops.grouped_fp8_gemm_masked.default,
                          (a, a_scales, b, b_scales, masked_m, 64))


# ---- CPU: reference, opcheck, compile ---------------------------------------------------------

def test_cpu_contiguous_reference_and_opcheck():
    a, a_scales, b, b_scales, m_indices, offsets = make_contiguous([3, 0, 130], 48, 256, device="cpu")
    out = deepseek_ops.grouped_fp8_gemm_contiguous(a, a_scales, b, b_scales, m_indices)
    check_contiguous(out, a, a_scales, b, b_scales, m_indices)
    assert (out[m_indices < 0] == 0).all()
    # group_offsets has no padding: a group's tail rows are computed too, the valid rows agree.
    by_offsets = deepseek_ops.grouped_fp8_gemm_contiguous(a, a_scales, b, b_scales, group_offsets=offsets)
    valid = m_indices >= 0
    assert_bitwise_equal(by_offsets[valid], out[valid])
    opcheck_fp8_safe(torch.ops.deepseek_ops.grouped_fp8_gemm_contiguous.default,
                          (a, a_scales, b, b_scales, m_indices))
    buf = torch.zeros_like(out)
    opcheck_fp8_safe(torch.ops.deepseek_ops.grouped_fp8_gemm_contiguous_out.default,
                          (a, a_scales, b, b_scales, m_indices, buf), mutated=(5,))


def test_cpu_masked_reference_opcheck_and_compile():
    a, a_scales, b, b_scales = make_masked(3, 20, 32, 256, device="cpu")
    masked_m = torch.tensor([20, 0, 7], dtype=torch.int32)
    out = deepseek_ops.grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, 10)
    check_masked(out, a, a_scales, b, b_scales, masked_m)
    opcheck_fp8_safe(torch.ops.deepseek_ops.grouped_fp8_gemm_masked.default,
                          (a, a_scales, b, b_scales, masked_m, 10))
    opcheck_fp8_safe(torch.ops.deepseek_ops.grouped_fp8_gemm_masked_out.default,
                          (a, a_scales, b, b_scales, masked_m, 10, torch.zeros_like(out)), mutated=(6,))

    def f(a, a_scales, b, b_scales, masked_m):
        return deepseek_ops.grouped_fp8_gemm_masked(a, a_scales, b, b_scales, masked_m, 10).float().sum(-1)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(a, a_scales, b, b_scales, masked_m), f(a, a_scales, b, b_scales, masked_m))


# ---- bad inputs -----------------------------------------------------------------------------------

def test_contiguous_rejects_bad_inputs():
    a, a_scales, b, b_scales, m_indices, offsets = make_contiguous([5, 130], 32, 256, device="cpu")
    gc = deepseek_ops.grouped_fp8_gemm_contiguous
    with pytest.raises(ValueError, match="argument 'b_scales': expected shape \\(2, 1, 2\\)"):
        gc(a, a_scales, b, b_scales[:1], m_indices)
    with pytest.raises(ValueError, match="argument 'b': expected rank 3"):
        gc(a, a_scales, b[0], b_scales[0], m_indices)
    with pytest.raises(ValueError, match="argument 'm_indices': expected shape"):
        gc(a, a_scales, b, b_scales, m_indices[:128])
    with pytest.raises(ValueError, match="argument 'm_indices': expected dtype torch.int32"):
        gc(a, a_scales, b, b_scales, m_indices.long())
    bad = m_indices.clone()
    bad[0] = 2
    with pytest.raises(ValueError, match="argument 'm_indices': expected values in \\[-1, 2\\)"):
        gc(a, a_scales, b, b_scales, bad)
    mixed = m_indices.clone()
    mixed[100] = 1  # group 1 starting inside group 0's 128-row block
    with pytest.raises(ValueError, match="mix groups"):
        gc(a, a_scales, b, b_scales, mixed)
    with pytest.raises(ValueError, match="sum_M .* must be a multiple of 128"):
        gc(a[:200], a_scales[:200], b, b_scales, m_indices[:200])
    with pytest.raises(ValueError, match="exactly one of them, got both"):
        gc(a, a_scales, b, b_scales, m_indices, group_offsets=offsets)
    with pytest.raises(ValueError, match="exactly one of them, got neither"):
        gc(a, a_scales, b, b_scales)
    with pytest.raises(ValueError, match="argument 'group_offsets': every group must start at a multiple of 128"):
        gc(a, a_scales, b, b_scales, group_offsets=torch.tensor([0, 100, 256], dtype=torch.int32))
    with pytest.raises(ValueError, match="argument 'group_offsets': expected shape \\(3,\\)"):
        gc(a, a_scales, b, b_scales, group_offsets=torch.tensor([0, 256], dtype=torch.int32))
    with pytest.raises(ValueError, match="argument 'out': expected shape"):
        gc(a, a_scales, b, b_scales, m_indices, out=torch.empty(256, 16, dtype=torch.bfloat16))


def test_masked_rejects_bad_inputs():
    a, a_scales, b, b_scales = make_masked(3, 20, 32, 256, device="cpu")
    masked_m = torch.tensor([20, 0, 7], dtype=torch.int32)
    gm = deepseek_ops.grouped_fp8_gemm_masked
    with pytest.raises(ValueError, match="argument 'b': expected size 3 in dim 0"):
        gm(a, a_scales, b[:2], b_scales[:2], masked_m, 10)
    with pytest.raises(ValueError, match="argument 'masked_m': expected shape \\(3,\\)"):
        gm(a, a_scales, b, b_scales, masked_m[:2], 10)
    with pytest.raises(ValueError, match="argument 'masked_m': expected values in \\[0, 20\\]"):
        gm(a, a_scales, b, b_scales, torch.tensor([21, 0, 7], dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="argument 'expected_m'"):
        gm(a, a_scales, b, b_scales, masked_m, -1)
    with pytest.raises(ValueError, match="argument 'a_scales': expected shape \\(3, 20, 2\\)"):
        gm(a, a_scales[:, :10], b, b_scales, masked_m, 10)
    with pytest.raises(ValueError, match="argument 'a': expected rank 3"):
        gm(a[0], a_scales[0], b, b_scales, masked_m, 10)
    with pytest.raises(ValueError, match="argument 'masked_m': expected dtype torch.int32"):
        gm(a, a_scales, b, b_scales, masked_m.long(), 10)
