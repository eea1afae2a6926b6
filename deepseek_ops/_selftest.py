"""Parity self-test behind `python -m deepseek_ops check`: one check per op, per device.

CHECKS maps an op name to check(device) -> (error, passed); METRICS maps it to what `error` measures
on each device, with its unit and pass bound (printed in the table):
  device "cpu":  the op's CPU kernel (the reference) against an independent recomputation (float64
                 where that means something), and the fake/meta kernel's shapes, dtypes and strides
                 against the real outputs.
  device "cuda": only called when a Hopper GPU and the CUDA build are present; the CUDA kernel
                 against the CPU reference on the same inputs, with the op's metric (bitwise for
                 quantization and data movement, calc_diff or max_rel_error for GEMM/attention).
`error` is what the table prints (the metric's value); `passed` says whether it is within bound.
A check that raises counts as failed, with its message.

Adding the checks of a new op family: append to the END of this file (others append too)

    @register_check("fp8_gemm", GEMM_METRIC)
    def _check_fp8_gemm(device: torch.device) -> Tuple[float, bool]:
        ...fresh random inputs, call the public deepseek_ops function on `device`, compare...
        return error, error < bound

Use fresh random inputs (never zeros) of a few odd shapes, small enough to run in seconds on a
2-core CPU; `assert_meta_matches` covers the fake kernel.
"""
import math
import traceback
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch

import deepseek_ops
from deepseek_ops import ep, reference, testing
from deepseek_ops.constants import FP8_MAX, FP8_SCALE_FLOOR
from deepseek_ops.reference import column_major_scales, expand_block_scales

CheckFn = Callable[[torch.device], Tuple[float, bool]]
CHECKS: Dict[str, CheckFn] = {}
METRICS: Dict[str, Dict[str, str]] = {}

# What the checks measure, by device ("metric [unit], bound").
BITWISE = "rows not bitwise equal [fraction], == 0"
QUANT_METRIC = {"cpu": "error vs exact [e4m3 ulp], <= 0.5 + 2^-18; scales exact",
                "cuda": "rows not bitwise the CPU reference [fraction], == 0"}
GEMM_METRIC = {"cpu": "calc_diff vs float64 dequantize-and-matmul [1], < 1e-5",
               "cuda": "calc_diff vs float64 dequantize-and-matmul [1], < 1e-5"}
MLA_METRIC = "calc_diff of out vs float64 SDPA [1], < 1e-5; lse max_rel_error < 1e-5"


def register_check(op_name: str, metric: Union[str, Dict[str, str]]) -> Callable[[CheckFn], CheckFn]:
    """Decorator: registers `check(device) -> (error, passed)` as the self-test of op_name; metric: what
    `error` measures, its unit and bound (one string, or one per device type)."""

    def decorate(fn: CheckFn) -> CheckFn:
        if op_name in CHECKS:
            raise ValueError(f"a self-test for {op_name!r} is already registered")
        CHECKS[op_name] = fn
        METRICS[op_name] = metric if isinstance(metric, dict) else {"cpu": metric, "cuda": metric}
        return fn

    return decorate


def meta_matches(outputs, meta_outputs) -> bool:
    """The fake kernel's outputs have the real outputs' shapes, dtypes and strides."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    meta_outputs = meta_outputs if isinstance(meta_outputs, (tuple, list)) else (meta_outputs,)
    return len(outputs) == len(meta_outputs) and all(
        o.shape == m.shape and o.dtype == m.dtype and o.stride() == m.stride()
        for o, m in zip(outputs, meta_outputs))


def assert_meta_matches(fn: Callable, *args):
    """Runs fn on `args` and on their meta copies; raises if the outputs' metadata differ."""
    real = fn(*args)
    meta = fn(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
    if not meta_matches(real, meta):
        raise AssertionError(f"fake kernel disagrees with the real outputs: "
                             f"{_describe(real)} vs meta {_describe(meta)}")
    return real


def _describe(outputs) -> str:
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return ", ".join(f"{tuple(o.shape)}/{o.dtype}/{o.stride()}" for o in outputs)


def available_devices() -> Tuple[List[str], str]:
    """Devices to check on this machine, and why CUDA is left out (empty when it is not)."""
    if testing.hopper_available():
        return ["cpu", "cuda"], ""
    return ["cpu"], testing.skip_reason()


def run_checks(devices: Sequence[str], only: Sequence[str] = ()) -> List[Tuple[str, str, float, bool, str, str]]:
    """(op, device, error, passed, note, metric) for every registered check (or those named in `only`)."""
    rows = []
    for op_name, check in CHECKS.items():
        if only and op_name not in only:
            continue
        for device in devices:
            try:
                error, passed = check(torch.device(device))
                rows.append((op_name, device, float(error), bool(passed), "", METRICS[op_name][device]))
            except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check
                note = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                rows.append((op_name, device, math.nan, False, note, METRICS[op_name][device]))
                traceback.print_exc()
    return rows


# ---------------------------------------------------------------------------------------------
# FP8 quantization


def _e4m3_ulp(q: torch.Tensor) -> torch.Tensor:
    """Spacing of e4m3 values at q (float64): 2**(e - 3) for normals, 2**-9 for subnormals."""
    exponent = torch.floor(torch.log2(q.abs().clamp(min=2.0 ** -6)))
    return torch.exp2(exponent - 3)


# Round to nearest is within 0.5 ulp of the exact x / s. The op first forms x * (1 / s) in fp32
# (as the CUDA kernels do): two roundings of <= 2**-24 relative each, and |q| <= 16 ulps of q, so
# they can add up to 2**-19 ulp; the bound leaves room for that and nothing more.
QUANT_ULP_BOUND = 0.5 + 2.0 ** -18


def _quant_error_ulps(x: torch.Tensor, q: torch.Tensor, scales_full: torch.Tensor) -> float:
    """max |x / s - q| in e4m3 ulps of q (round to nearest: <= 0.5), all in float64."""
    if x.numel() == 0:
        return 0.0
    exact = x.double() / scales_full.double()
    qd = q.double()
    return float(((exact - qd).abs() / _e4m3_ulp(qd)).max())


def _expected_scales(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    """max(amax, FP8_SCALE_FLOOR) / FP8_MAX in float64, rounded once to fp32 (= IEEE fp32 division);
    ue8m0: the smallest power of two >= that scale."""
    scale = (amax.double().clamp(min=FP8_SCALE_FLOOR) / FP8_MAX).float()
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale.double()))).float()
    return scale


def _random_input(shape, dtype, device) -> torch.Tensor:
    # Rows of very different magnitudes, so that scales span many binades.
    x = torch.randn(shape, dtype=torch.float32)
    if x.dim() == 2 and x.shape[0] > 0:
        x = x * torch.exp2(torch.randint(-12, 8, (x.shape[0], 1)).float())
    return x.to(dtype=dtype, device=device)


def _bitwise_mismatch(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of elements whose bits differ (1.0 on a shape or dtype mismatch)."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return 1.0
    if out.numel() == 0:
        return 0.0
    a = out.contiguous().cpu().view(torch.uint8).reshape(out.numel(), -1)
    b = ref.contiguous().cpu().view(torch.uint8).reshape(ref.numel(), -1)
    return float((a != b).any(-1).double().mean())


_TOKEN_GROUP_CASES = [  # (M, K, group_size, dtype, ue8m0, column_major)
    (129, 768, 128, torch.bfloat16, False, False),
    (7, 384, 64, torch.float16, True, True),
    (33, 256, 32, torch.float32, False, True),
    (0, 128, 128, torch.bfloat16, True, False),
]


@register_check("per_token_group_quant_fp8", QUANT_METRIC)
def _check_per_token_group_quant(device: torch.device) -> Tuple[float, bool]:
    worst, passed = 0.0, True
    for m, k, group, dtype, ue8m0, column_major in _TOKEN_GROUP_CASES:
        x = _random_input((m, k), dtype, device)
        fn = lambda t: deepseek_ops.per_token_group_quant_fp8(  # noqa: E731
            t, group, "ue8m0" if ue8m0 else None, column_major)
        if device.type == "cpu":
            q, s = assert_meta_matches(fn, x)
            amax = x.double().reshape(m, k // group, group).abs().amax(-1) if m else x.new_zeros(0, k // group)
            scales_ok = torch.equal(s, _expected_scales(amax, ue8m0))
            err = _quant_error_ulps(x, q, s.repeat_interleave(group, 1))
            worst = max(worst, err)
            passed &= scales_ok and err <= QUANT_ULP_BOUND and (not column_major or s.stride(0) == 1)
        else:
            q, s = fn(x)
            q_ref, s_ref = fn(x.cpu())
            err = max(_bitwise_mismatch(q, q_ref), _bitwise_mismatch(s, s_ref))
            worst = max(worst, err)
            passed &= err == 0.0 and s.stride() == s_ref.stride()
    return worst, passed


_SILU_MUL_CASES = [  # (M, K, dtype, ue8m0, column_major): h is [M, 2K]
    (129, 256, torch.bfloat16, False, True),
    (7, 128, torch.float16, True, False),
    (0, 128, torch.float32, False, False),
]


@register_check("silu_mul_quant_fp8", BITWISE)
def _check_silu_mul_quant(device: torch.device) -> Tuple[float, bool]:
    """CPU: bitwise the token-group quantization of (silu(gate) * up) in h's dtype. GPU: bitwise the
    reference run on the GPU tensors (PyTorch's CUDA silu; its CPU silu may round differently)."""
    worst, passed = 0.0, True
    for m, k, dtype, ue8m0, column_major in _SILU_MUL_CASES:
        h = (_random_input((m, 2 * k), torch.float32, device) / 16).to(dtype)  # finite silu(gate) * up in fp16
        fn = lambda t: deepseek_ops.silu_mul_quant_fp8(t, "ue8m0" if ue8m0 else None, column_major)  # noqa: E731
        if device.type == "cpu":
            q, s = assert_meta_matches(fn, h)
            act = (torch.nn.functional.silu(h[:, :k].float()) * h[:, k:].float()).to(dtype)
            q_ref, s_ref = deepseek_ops.per_token_group_quant_fp8(act, 128, "ue8m0" if ue8m0 else None, column_major)
        else:
            q, s = fn(h)
            q_ref, s_ref = reference.silu_mul_quant_fp8(h, ue8m0, column_major)
        err = max(_bitwise_mismatch(q, q_ref), _bitwise_mismatch(s, s_ref))
        worst = max(worst, err)
        passed &= err == 0.0 and s.stride() == s_ref.stride()
    return worst, passed


_BLOCK_CASES = [  # (N, K, dtype, ue8m0)
    (200, 384, torch.bfloat16, False),
    (576, 256, torch.float32, True),
    (1, 128, torch.float16, False),
]


@register_check("per_block_quant_fp8", QUANT_METRIC)
def _check_per_block_quant(device: torch.device) -> Tuple[float, bool]:
    worst, passed = 0.0, True
    for n, k, dtype, ue8m0 in _BLOCK_CASES:
        w = torch.randn(n, k, dtype=torch.float32).to(dtype=dtype, device=device)
        fn = lambda t: deepseek_ops.per_block_quant_fp8(t, 128, "ue8m0" if ue8m0 else None)  # noqa: E731
        if device.type == "cpu":
            q, s = assert_meta_matches(fn, w)
            nb = -(-n // 128)
            amax = torch.stack([w[i * 128:(i + 1) * 128].double().abs().reshape(-1, k // 128, 128).amax((0, 2))
                                for i in range(nb)])
            scales_ok = torch.equal(s, _expected_scales(amax, ue8m0))
            err = _quant_error_ulps(w, q, expand_block_scales(s, n, k))
            worst = max(worst, err)
            passed &= scales_ok and err <= QUANT_ULP_BOUND
        else:
            q, s = fn(w)
            q_ref, s_ref = fn(w.cpu())
            err = max(_bitwise_mismatch(q, q_ref), _bitwise_mismatch(s, s_ref))
            worst = max(worst, err)
            passed &= err == 0.0
    return worst, passed


@register_check("dequant_fp8_block", BITWISE)
def _check_dequant(device: torch.device) -> Tuple[float, bool]:
    worst, passed = 0.0, True
    for n, k, out_dtype in [(200, 384, torch.bfloat16), (129, 256, torch.float32), (7, 128, torch.float16)]:
        w = torch.randn(n, k).to(device)
        q, s = deepseek_ops.per_block_quant_fp8(w)
        fn = lambda a, b: deepseek_ops.dequant_fp8_block(a, b, 128, out_dtype)  # noqa: E731
        if device.type == "cpu":
            out = assert_meta_matches(fn, q, s)
            # Independent: each element is one fp8 value times one fp32 scale, exact in float64,
            # then rounded once to out_dtype.
            rows = torch.arange(n).div(128, rounding_mode="floor")
            cols = torch.arange(k).div(128, rounding_mode="floor")
            expected = (q.double() * s.double()[rows][:, cols]).to(out_dtype)
            err = _bitwise_mismatch(out, expected)
        else:
            err = _bitwise_mismatch(fn(q, s), fn(q.cpu(), s.cpu()))
        worst = max(worst, err)
        passed &= err == 0.0
    return worst, passed


# ---------------------------------------------------------------------------------------------
# Expert parallelism (deepseek_ops.ep): layout counts, dispatch permutation, combine


def _ep_routing(num_tokens: int, num_experts: int, topk: int):
    topk_idx = torch.rand(num_tokens, num_experts).topk(topk, dim=1).indices
    topk_idx[torch.rand(num_tokens, topk) < 0.15] = -1
    return topk_idx, torch.rand(num_tokens, topk)


@register_check("ep_dispatch_layout", BITWISE)
def _check_ep_layout(device: torch.device) -> Tuple[float, bool]:
    worst = 0.0
    for num_tokens, num_experts, num_ranks, topk in [(37, 16, 4, 4), (300, 256, 8, 8), (1, 4, 1, 2)]:
        topk_idx, _ = _ep_routing(num_tokens, num_experts, topk)
        fn = lambda idx: ep.get_dispatch_layout(idx, num_experts, num_ranks)  # noqa: E731
        if device.type == "cpu":
            got = assert_meta_matches(fn, topk_idx)
            per_expert = torch.zeros(num_experts, dtype=torch.int32)
            in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool)
            for t, row in enumerate(topk_idx.tolist()):  # independent: one pair at a time
                for e in row:
                    if e >= 0:
                        per_expert[e] += 1
                        in_rank[t, e // (num_experts // num_ranks)] = True
            want = (in_rank.sum(0, dtype=torch.int32), per_expert, in_rank)
        else:
            got, want = fn(topk_idx.to(device)), fn(topk_idx)
        worst = max([worst] + [_bitwise_mismatch(g.cpu(), w) for g, w in zip(got, want)])
    return worst, worst == 0.0


@register_check("ep_permute", "pairs in the wrong row, or rows not bitwise equal [fraction], == 0")
def _check_ep_permute(device: torch.device) -> Tuple[float, bool]:
    ops = torch.ops.deepseek_ops
    worst = 0.0
    for num_tokens, hidden, num_experts, topk, alignment in [(45, 256, 8, 3, 16), (257, 512, 64, 8, 128)]:
        topk_idx, weights = _ep_routing(num_tokens, num_experts, topk)
        x = torch.randn(num_tokens, hidden).to(torch.bfloat16)
        num_rows = num_tokens * topk + num_experts * (alignment - 1)
        fn = lambda a, i, w: ops.ep_permute(a, None, w, i, num_experts, alignment, num_rows)  # noqa: E731
        if device.type == "cpu":
            got = assert_meta_matches(fn, x, topk_idx, weights)
            # Independent: pair (t, k) of expert e lands at e's aligned start + its rank among e's pairs.
            m_indices, row_of = got[3], got[4]
            counts = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts)
            starts = torch.cumsum((counts + alignment - 1) // alignment * alignment, 0)
            starts = torch.cat([torch.zeros(1, dtype=starts.dtype), starts[:-1]])
            seen = [0] * num_experts
            bad = 0
            for t, row in enumerate(topk_idx.tolist()):
                for k, e in enumerate(row):
                    want_row = -1 if e < 0 else int(starts[e]) + seen[e]
                    if e >= 0:
                        seen[e] += 1
                        bad += int(m_indices[want_row] != e) + int(not torch.equal(got[0][want_row], x[t]))
                    bad += int(row_of[t, k] != want_row)
            worst = max(worst, bad / max(1, num_tokens * topk))
        else:
            got = [g.cpu() for g in fn(x.to(device), topk_idx.to(device), weights.to(device))]
            want = fn(x, topk_idx, weights)
            valid = want[3] >= 0
            errs = [_bitwise_mismatch(got[i], want[i]) for i in (2, 3, 4, 5)]
            errs.append(_bitwise_mismatch(got[0][valid], want[0][valid]))
            worst = max([worst] + errs)
    return worst, worst == 0.0


@register_check("ep_combine", BITWISE)
def _check_ep_combine(device: torch.device) -> Tuple[float, bool]:
    ops = torch.ops.deepseek_ops
    worst = 0.0
    for num_tokens, hidden, num_experts, topk in [(45, 256, 8, 3), (129, 7168, 32, 8)]:
        topk_idx, weights = _ep_routing(num_tokens, num_experts, topk)
        num_rows = num_tokens * topk + num_experts * 127
        row_of = ops.ep_permute(torch.zeros(num_tokens, 16, dtype=torch.bfloat16), None, None, topk_idx,
                                num_experts, 128, num_rows)[4]
        y = torch.randn(num_rows, hidden).to(torch.bfloat16)
        if device.type == "cpu":
            out = assert_meta_matches(ops.ep_combine, y, row_of, weights)
            # Independent: token by token, pair by pair, in k order.
            want = torch.zeros(num_tokens, hidden)
            for t in range(num_tokens):
                for k in range(topk):
                    if row_of[t, k] >= 0:
                        want[t] = want[t] + weights[t, k] * y[row_of[t, k]].float()
            err = _bitwise_mismatch(out, want.to(torch.bfloat16))
        else:
            out = ops.ep_combine(y.to(device), row_of.to(device), weights.to(device))
            err = _bitwise_mismatch(out.cpu(), ops.ep_combine(y, row_of, weights))
        worst = max(worst, err)
    return worst, worst == 0.0


# ---------------------------------------------------------------------------------------------
# FP8 GEMMs (dense and grouped): calc_diff against float64 (DeepGEMM's metric, bound 1e-5)

GEMM_CALC_DIFF_BOUND = 1e-5


def _dequant_matmul64(a, a_scales, b, b_scales) -> torch.Tensor:
    """(a * a_scales) @ (b * b_scales)^T in float64, the scales expanded here (not by the reference)."""
    n = b.shape[0]
    a64 = a.double() * a_scales.double().repeat_interleave(128, 1)
    b64 = b.double() * b_scales.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    return a64 @ b64.T


def _gemm_operands(m, n, k, groups=None):
    """Random e4m3 a [m, k], b [(groups,) n, k] and positive scales that differ per row / block (CPU)."""
    lead = () if groups is None else (groups,)
    a = (torch.randn(m, k) * 3).to(torch.float8_e4m3fn)
    a_scales = torch.rand(m, k // 128) * 2 + 0.05
    b = (torch.randn(*lead, n, k) * 3).to(torch.float8_e4m3fn)
    b_scales = torch.rand(*lead, -(-n // 128), k // 128) * 2 + 0.05
    return a, a_scales, b, b_scales


@register_check("fp8_gemm", GEMM_METRIC)
def _check_fp8_gemm(device: torch.device) -> Tuple[float, bool]:
    worst = 0.0
    for m, n, k, out_dtype in [(65, 2112, 512, torch.bfloat16), (7, 112, 256, torch.float32),
                               (130, 144, 384, torch.bfloat16)]:
        a, a_scales, b, b_scales = _gemm_operands(m, n, k)
        a_scales = column_major_scales(a_scales)
        if device.type == "cpu":
            out = assert_meta_matches(lambda *t: deepseek_ops.fp8_gemm(*t, out_dtype=out_dtype), a, a_scales, b,
                                      b_scales)
        else:
            args = [t.to(device) for t in (a, a_scales, b, b_scales)]
            out = deepseek_ops.fp8_gemm(*args, out_dtype=out_dtype).cpu()
        want = _dequant_matmul64(a, a_scales, b, b_scales)
        worst = max(worst, testing.calc_diff(out, want))
    return worst, worst < GEMM_CALC_DIFF_BOUND


@register_check("grouped_fp8_gemm_contiguous", GEMM_METRIC)
def _check_grouped_fp8_gemm_contiguous(device: torch.device) -> Tuple[float, bool]:
    sizes, n, k = [3, 0, 130, 1], 272, 256
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + -(-s // 128) * 128)
    a, a_scales, b, b_scales = _gemm_operands(offsets[-1], n, k, groups=len(sizes))
    m_indices = torch.full((offsets[-1],), -1, dtype=torch.int32)
    for g, s in enumerate(sizes):
        m_indices[offsets[g]:offsets[g] + s] = g
    args = [t.to(device) for t in (a, a_scales, b, b_scales, m_indices)]
    out = torch.zeros(offsets[-1], n, dtype=torch.bfloat16, device=device)
    deepseek_ops.grouped_fp8_gemm_contiguous(*args, out=out)
    out = out.cpu()
    padding = out[m_indices < 0]  # never written
    worst, untouched = 0.0, padding.numel() > 0 and bool((padding == 0).all())
    for g in range(len(sizes)):
        rows = m_indices == g
        if rows.any():
            worst = max(worst, testing.calc_diff(out[rows], _dequant_matmul64(a[rows], a_scales[rows], b[g], b_scales[g])))
    if device.type == "cpu":
        assert_meta_matches(deepseek_ops.grouped_fp8_gemm_contiguous, a, a_scales, b, b_scales, m_indices)
    return worst, worst < GEMM_CALC_DIFF_BOUND and untouched


@register_check("grouped_fp8_gemm_masked", GEMM_METRIC)
def _check_grouped_fp8_gemm_masked(device: torch.device) -> Tuple[float, bool]:
    groups, m_max, n, k = 3, 70, 160, 384
    a = (torch.randn(groups, m_max, k) * 3).to(torch.float8_e4m3fn)
    _, a_scales, b, b_scales = _gemm_operands(groups * m_max, n, k, groups=groups)
    a_scales = a_scales.view(groups, m_max, k // 128)
    masked_m = torch.tensor([61, 0, 9], dtype=torch.int32)
    args = [t.to(device) for t in (a, a_scales, b, b_scales, masked_m)]
    out = torch.zeros(groups, m_max, n, dtype=torch.bfloat16, device=device)
    deepseek_ops.grouped_fp8_gemm_masked(*args, expected_m=32, out=out)
    out = out.cpu()
    untouched_rows = (out[0, 61:], out[1], out[2, 9:])  # rows at or past masked_m: never written
    worst, untouched = 0.0, all(r.numel() > 0 and bool((r == 0).all()) for r in untouched_rows)
    for g, rows in enumerate(masked_m.tolist()):
        if rows:
            want = _dequant_matmul64(a[g, :rows], a_scales[g, :rows], b[g], b_scales[g])
            worst = max(worst, testing.calc_diff(out[g, :rows], want))
    if device.type == "cpu":
        assert_meta_matches(lambda *t: deepseek_ops.grouped_fp8_gemm_masked(*t, 32), a, a_scales, b, b_scales,
                            masked_m)
    return worst, worst < GEMM_CALC_DIFF_BOUND and untouched


# ---------------------------------------------------------------------------------------------
# MLA decode: against float64 scaled_dot_product_attention over each request's keys, gathered by
# plain indexing (not the reference's gather); lse recomputed with logsumexp

MLA_CALC_DIFF_BOUND = 1e-5
MLA_LSE_BOUND = 1e-5


@register_check("mla_decode", MLA_METRIC)
def _check_mla_decode(device: torch.device) -> Tuple[float, bool]:
    seqlens, s_q, h_q, scale = [70, 2, 130], 2, 16, 576 ** -0.5
    pages = [-(-s // 64) for s in seqlens]
    num_blocks = sum(pages) + 2
    kv_cache = (torch.randn(num_blocks, 64, 1, 576) * 0.5).to(torch.bfloat16)
    block_table = torch.randperm(num_blocks)[:sum(pages)].to(torch.int32).split(pages)
    block_table = torch.stack([torch.cat([p, p.new_zeros(max(pages) - len(p))]) for p in block_table])
    q = torch.randn(len(seqlens), s_q, h_q, 576).to(torch.bfloat16)
    worst, passed = 0.0, True
    for causal in (False, True):
        args = [t.to(device) for t in (q, kv_cache, block_table, torch.tensor(seqlens, dtype=torch.int32))]
        out, lse = deepseek_ops.mla_decode(*args, scale, causal=causal)
        out, lse = out.cpu(), lse.cpu()
        for b, seqlen in enumerate(seqlens):
            keys = kv_cache[block_table[b, :pages[b]].long()].reshape(-1, 576)[:seqlen].double()  # [N, 576]
            query = q[b].double().transpose(0, 1)  # [h_q, s_q, 576]
            visible = torch.ones(s_q, seqlen, dtype=torch.bool)
            if causal:  # bottom-right aligned: query i sees keys < seqlen - s_q + 1 + i
                visible = torch.arange(seqlen)[None, :] < (seqlen - s_q + 1 + torch.arange(s_q))[:, None]
            want = torch.nn.functional.scaled_dot_product_attention(
                query, keys.expand(h_q, -1, -1), keys[:, :512].expand(h_q, -1, -1), attn_mask=visible, scale=scale)
            scores = (query @ keys.T * scale).masked_fill(~visible, float("-inf"))  # [h_q, s_q, N]
            want_lse = torch.logsumexp(scores, dim=-1)  # [h_q, s_q]
            diff = testing.calc_diff(out[b].transpose(0, 1), want)
            lse_err = testing.max_rel_error(lse[b], want_lse)
            worst = max(worst, diff)
            passed &= diff < MLA_CALC_DIFF_BOUND and lse_err < MLA_LSE_BOUND
    return worst, passed
