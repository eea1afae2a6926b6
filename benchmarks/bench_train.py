"""FP8 training on DeepSeek-V3's shapes (hidden 7168, 4096 tokens): the backward ops, the FP8 linear's
training step and one full decoder layer, against DeepGEMM and PyTorch bf16 in the same process.

Records (shape keys: M tokens or rows, N, K the weight [N, K], as the forward GEMM of that weight):
  transpose_quant_fp8       x [M, K] bf16 -> x^T [K, M] e4m3 + 1 x 128 token-axis scales, bit for bit
                            against the reference; peers torch (the reference, eager), torch_compile (not
                            in the quick set: it compiles per shape) and copy (a copy of the same bytes:
                            x<copy> is our fraction of copy bandwidth, goal >= 0.8). Shapes: the inputs and
                            output gradients whose transposes the layer's weight gradients contract.
  fp8_gemm_wgrad            dW = dy^T x + c, fp32 [N, K] (c: the gradient so far, accumulated into in place:
                            ours with out=c), its operands transpose_quant_fp8 of dy [M, N] and x [M, K];
                            peer deepgemm: fp8_gemm_nt with recipe (1, 1, 128), its sm90 1D1D kernel, in
                            place (c = d).
  k_grouped_fp8_gemm_wgrad  G experts' dW [G, N, K] + c (in place) in one launch, each over its M contiguous tokens
                            (shape G, M per expert, N, K); peer deepgemm: k_grouped_fp8_gemm_nt_contiguous,
                            its operands in its per-expert K-major layout (made once, outside the timing).
  fp8_linear_train          forward + backward (dx and dW) of one training linear on an fp32 master weight,
                            as model/train.py runs it: ours, --precision fp8 (the master quantized per
                            128 x 128 block each call, deepseek_ops.fp8_linear); peer torch_bf16, --precision
                            bf16 (F.linear under bf16 autocast). experts = 0: model.model.Linear; experts > 0
                            (M rows per expert): the routed experts' grouped_fp8_linear on expert-contiguous
                            rows, against a loop of bf16 F.linear over the same row ranges.
  train_layer               forward + backward of one decoder layer (model.model.DecoderLayer of the
                            deepseek-v3 preset: MLA, MoE with 1 shared and LAYER_EXPERTS routed experts, top-8
                            of 8 groups limited to 4), fp32 masters, the whole layer's --precision fp8 (ours)
                            against --precision bf16 (torch_bf16); 4096 tokens as LAYER_BATCH sequences of
                            LAYER_SEQ. The speedup is printed (goal >= 1.3x).

Weights of the layer used for the GEMM shapes, [N, K]: q_a_proj 1536 x 7168, q_b_proj 24576 x 1536,
kv_b_proj 32768 x 512, o_proj 7168 x 16384, the shared expert's gate_proj / up_proj 2048 x 7168 and
down_proj 7168 x 2048; the routed experts' stacked gate|up 4096 x 7168 and down 7168 x 2048 (the
k-grouped and grouped shapes). Not kv_a_proj_with_mqa (576 x 7168): fp8_linear's backward quantizes dy
per 1 x 128 along N, so training keeps that projection in bf16 (model/train.py).

Checks before timing: the GEMMs against the float64 reference of the same quantized operands (calc_diff
< CALC_DIFF_BOUND, peers too); the training linear's y, dx and dW against float64 autograd of the
weight each impl multiplies (ours the quantized master, bf16 the master; < GRAD_CALC_DIFF_BOUND); the
layer's output and gradients (its own contribution: y - x, dx - dy, and the gradient of every weight
but the routed experts' and the router's) against the same layer in fp32 without autocast
(< LAYER_CALC_DIFF_BOUND: FP8 rounding through several linears, and expert choices that near ties
flip). `error` is the largest of them.
Ours failing raises; a peer failing, or not importable, is left out with a printed line.
Every impl is timed in two rounds, the second in reversed order (timing.time_rounds); ops under ~50 us
by graph replay over copies of the inputs (transpose_quant_fp8), the others with an L2 flush before each run.
FLOPs: GEMMs 2 M N K (grouped: all rows); the training linear 6 M N K (forward, dgrad, wgrad).
Bytes: the GEMMs' operands, scales, c read and the fp32 output written.
"""
import functools
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F

import deepseek_ops
from benchmarks.bench_fp8_gemm import CALC_DIFF_BOUND
from benchmarks.bench_quant import measure_bitwise, transpose_quant_bytes, transpose_quant_impls
from benchmarks.peers import deepgemm_k_grouped_wgrad_fn, deepgemm_wgrad_fn, passes_check
from benchmarks.report import OURS, Record, throughput
from benchmarks.timing import host_overhead_us, pytest_benchmark, time_rounds
from deepseek_ops import reference
from deepseek_ops.testing import calc_diff
from model.config import FP8_BLOCK, preset
from model.model import Linear, MoE, grouped_fp8_linear_train
from model.train import fp8_training_modules, training_model

TOKENS = 4096
HIDDEN = 7168
# (N, K) of the layer's weights whose gradients train in FP8 (module docstring).
LAYER_WEIGHTS = [(1536, 7168), (24576, 1536), (32768, 512), (7168, 16384), (2048, 7168), (7168, 2048)]
QUICK_WEIGHTS = [(1536, 7168), (7168, 16384), (7168, 2048)]
# (M, K) of transpose_quant_fp8: x of q_a / kv_a / the shared expert and dy of o_proj / down (7168), q_b's x
# and q_a's dy (1536), the shared expert's activation and dy (2048), o_proj's x (16384), q_b's dy (24576);
# and the routed experts' rows of a 4096-token step (4096 x top-8) at their intermediate size.
TRANSPOSE_SHAPES = [(TOKENS, 7168), (TOKENS, 1536), (TOKENS, 2048), (TOKENS, 16384), (TOKENS, 24576), (32768, 2048)]
QUICK_TRANSPOSE_SHAPES = [(TOKENS, 7168), (TOKENS, 1536)]
# (G, M tokens per expert, N, K): the routed experts' stacked gate|up (4096 x 7168) and down (7168 x 2048)
# with a 4096-token step's 32768 rows over 8 or 32 local experts (expert parallelism over 32 or 8 GPUs).
K_GROUPED_SHAPES = [(8, 4096, 4096, 7168), (8, 4096, 7168, 2048), (32, 1024, 4096, 7168), (32, 1024, 7168, 2048)]
QUICK_K_GROUPED_SHAPES = [(8, 4096, 4096, 7168), (32, 1024, 7168, 2048)]
# (experts, M rows per expert, N, K) of the grouped training linear.
GROUPED_LINEAR_SHAPES = [(8, 4096, 4096, 7168), (8, 4096, 7168, 2048)]
GRAD_CALC_DIFF_BOUND = 1e-3  # one FP8 linear against float64 autograd (tests/test_train_ops.py)
LAYER_CALC_DIFF_BOUND = 1e-2
# The timed layer: 32 routed experts instead of V3's 256, whose fp32 master weights and gradients
# alone would take ~90 GB; 4096 tokens as 4 sequences of 1024, the shape of the recorded figures
# (benchmarks/RESULTS.md).
LAYER_EXPERTS = 32
LAYER_BATCH, LAYER_SEQ = 4, 1024
TORCH_BF16 = "torch_bf16"


def wgrad_bytes(num_groups: int, tokens: int, n: int, k: int) -> int:
    """e4m3 a [N, T] and b [K, T] with their scales, c read and the fp32 output written (T all tokens)."""
    return tokens * (n + k) + 4 * (tokens // 128) * (n + k) + 8 * num_groups * n * k


def _token_scaled(tokens: int, channels: int):
    """transpose_quant_fp8 of random bf16 [tokens, channels]: the wgrad operand layout."""
    return deepseek_ops.transpose_quant_fp8(torch.randn(tokens, channels, device="cuda", dtype=torch.bfloat16))


def _check_and_time(kernel: str, shape: dict, impls: Dict[str, Callable[[], object]], error_of, bound: float,
                    flops: Optional[float], bytes_moved: Optional[float] = None) -> List[Record]:
    """Runs each impl once and checks it (error_of(impl, output), ours must pass), then times the ones
    that passed in two rounds; one Record each, and a printed line with ours against each peer."""
    errors = {}
    for impl, fn in impls.items():
        try:
            out = fn()
        except Exception as exc:  # a peer's refusal of a shape
            if impl == OURS:
                raise
            print(f"{kernel} {shape}: {impl} unsupported ({str(exc).splitlines()[0][:120]})", flush=True)
            continue
        error = error_of(impl, out)
        del out
        if passes_check(f"{kernel} {shape}", impl, error, bound, OURS):
            errors[impl] = error
    times = time_rounds([impls], list(errors))
    records = []
    for impl, ms in times.items():
        tflops, gbps = throughput(ms, flops=flops, bytes_moved=bytes_moved)
        records.append(Record(kernel, dict(shape), impl, ms, tflops, gbps, errors[impl]))
    ours = times[OURS]
    peers = ", ".join(f"{p} {ms / ours:.2f}x" for p, ms in times.items() if p != OURS)
    tflops = "" if flops is None else f", {throughput(ours, flops=flops)[0]:.0f} TFLOP/s"
    print(f"{kernel} {shape}: ours {ours * 1e3:.1f} us (peer time / ours: {peers or 'no peer'}){tflops}; calc_diff "
          + ", ".join(f"{impl} {e:.2e}" for impl, e in errors.items()), flush=True)
    return records


# ---- transpose_quant_fp8 -------------------------------------------------------------------------

def measure_transpose_quant(tokens: int, channels: int, quick: bool) -> List[Record]:
    x = torch.randn(tokens, channels, device="cuda", dtype=torch.bfloat16)
    ref = reference.transpose_quant_fp8(x)

    def make_impls(t):
        impls = transpose_quant_impls(t)
        return {k: v for k, v in impls.items() if not (quick and k == "torch_compile")}

    records = measure_bitwise("transpose_quant_fp8", {"M": tokens, "K": channels}, make_impls, x, ref,
                              transpose_quant_bytes(tokens, channels))
    ours = next(r for r in records if r.impl == OURS)
    copy = next(r for r in records if r.impl == "copy")
    print(f"transpose_quant_fp8 [{tokens}, {channels}]: {ours.gbps:.0f} GB/s, {copy.median_ms / ours.median_ms:.1%} "
          f"of a copy of the same bytes (goal >= 80%)", flush=True)
    del x, ref
    torch.cuda.empty_cache()
    return records


# ---- the weight-gradient GEMMs -------------------------------------------------------------------

def measure_wgrad(m: int, n: int, k: int) -> List[Record]:
    a, a_scales = _token_scaled(m, n)  # dy^T [N, M]
    b, b_scales = _token_scaled(m, k)  # x^T [K, M]
    c = torch.randn(n, k, device="cuda")
    ref = reference.fp8_gemm_wgrad(a, a_scales, b, b_scales, c).double()
    acc = c.clone()  # accumulated in place, as DeepGEMM's c=d (the first call, checked, gives c + dW)
    impls = {OURS: lambda: deepseek_ops.fp8_gemm_wgrad(a, a_scales, b, b_scales, c=acc, out=acc),
             "deepgemm": deepgemm_wgrad_fn(a, a_scales, b, b_scales, c)}
    impls = {impl: fn for impl, fn in impls.items() if fn is not None}
    records = _check_and_time("fp8_gemm_wgrad", {"M": m, "N": n, "K": k}, impls, lambda _, out: calc_diff(out, ref),
                              CALC_DIFF_BOUND, 2.0 * m * n * k, wgrad_bytes(1, m, n, k))
    print(f"fp8_gemm_wgrad {(m, n, k)}: host overhead {host_overhead_us(impls[OURS]):.1f} us per eager call",
          flush=True)
    del a, b, c, acc, ref, impls
    torch.cuda.empty_cache()
    return records


def measure_k_grouped_wgrad(num_groups: int, rows: int, n: int, k: int) -> List[Record]:
    tokens = num_groups * rows
    a, a_scales = _token_scaled(tokens, n)
    b, b_scales = _token_scaled(tokens, k)
    offsets = torch.arange(0, tokens + 1, rows, device="cuda", dtype=torch.int32)
    c = torch.randn(num_groups, n, k, device="cuda")
    ref = reference.k_grouped_fp8_gemm_wgrad(a, a_scales, b, b_scales, offsets, c)
    acc = c.clone()  # accumulated in place, as DeepGEMM's c=d
    impls = {OURS: lambda: deepseek_ops.k_grouped_fp8_gemm_wgrad(a, a_scales, b, b_scales, offsets, c=acc, out=acc),
             "deepgemm": deepgemm_k_grouped_wgrad_fn(a, a_scales, b, b_scales, offsets, c)}
    impls = {impl: fn for impl, fn in impls.items() if fn is not None}

    def error_of(_, out):  # the worst expert
        return max(calc_diff(out[g], ref[g].double()) for g in range(num_groups))

    records = _check_and_time("k_grouped_fp8_gemm_wgrad", {"G": num_groups, "M": rows, "N": n, "K": k}, impls,
                              error_of, CALC_DIFF_BOUND, 2.0 * tokens * n * k, wgrad_bytes(num_groups, tokens, n, k))
    del a, b, c, ref, impls
    torch.cuda.empty_cache()
    return records


# ---- the training linear -------------------------------------------------------------------------

def _reference_grads(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, ranges=None):
    """float64 (y, dx, dW) of y = x @ w^T (grouped: rows [lo, hi) of x through w[g])."""
    x64, dy64 = x.detach().double(), dy.double()
    if ranges is None:
        w64 = w.double()
        return x64 @ w64.T, dy64 @ w64, dy64.T @ x64
    y, dx = torch.empty_like(dy64), torch.empty_like(x64)
    dw = torch.empty(w.shape, dtype=torch.float64, device=w.device)
    for g, (lo, hi) in enumerate(ranges):
        w64 = w[g].double()
        y[lo:hi], dx[lo:hi], dw[g] = x64[lo:hi] @ w64.T, dy64[lo:hi] @ w64, dy64[lo:hi].T @ x64[lo:hi]
    return y, dx, dw


def _dequantized_master(master: torch.Tensor) -> torch.Tensor:
    """The weight the FP8 forward multiplies: master quantized and dequantized per 128 x 128 block."""
    flat = master.detach().reshape(-1, master.shape[-1])
    return reference.dequant_fp8_block(*deepseek_ops.per_block_quant_fp8(flat), FP8_BLOCK,
                                       torch.float32).view(master.shape)


def _train_call(forward, x: torch.Tensor, master: torch.Tensor, dy: torch.Tensor):
    """A zero-argument call: fresh gradients, forward under bf16 autocast (as training runs), backward;
    returns (y, dx, dW)."""
    def call():
        x.grad = master.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = forward()
        y.backward(dy)
        return y.detach(), x.grad, master.grad

    return call


def measure_linear_train(m: int, n: int, k: int) -> List[Record]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    with torch.device("cuda"):
        linear = Linear(k, n, torch.float32, False, "reference")
    linear.weight = torch.nn.Parameter(torch.randn(n, k, device="cuda") / k ** 0.5)  # the fp32 master
    refs = {OURS: _reference_grads(x, _dequantized_master(linear.weight), dy),
            TORCH_BF16: _reference_grads(x, linear.weight.detach(), dy)}

    def forward(fp8: bool):
        def run_linear():
            linear.fp8_training = fp8
            return linear(x)

        return run_linear

    impls = {OURS: _train_call(forward(True), x, linear.weight, dy),
             TORCH_BF16: _train_call(forward(False), x, linear.weight, dy)}

    def error_of(impl, out):
        return max(calc_diff(o, r) for o, r in zip(out, refs[impl]))

    records = _check_and_time("fp8_linear_train", {"M": m, "N": n, "K": k, "experts": 0}, impls, error_of,
                              GRAD_CALC_DIFF_BOUND, 6.0 * m * n * k)
    del x, dy, linear, refs, impls
    torch.cuda.empty_cache()
    return records


def measure_grouped_linear_train(num_experts: int, rows: int, n: int, k: int) -> List[Record]:
    m = num_experts * rows
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    master = (torch.randn(num_experts, n, k, device="cuda") / k ** 0.5).requires_grad_()
    offsets = torch.arange(0, m + 1, rows, device="cuda")
    ranges = [(g * rows, (g + 1) * rows) for g in range(num_experts)]
    refs = {OURS: _reference_grads(x, _dequantized_master(master), dy, ranges),
            TORCH_BF16: _reference_grads(x, master.detach(), dy, ranges)}

    def bf16_loop():
        # split / unbind: one gradient buffer each for x and master in the backward (slicing would
        # allocate a full-size zero gradient per expert)
        return torch.cat([F.linear(rows_g, w_g) for rows_g, w_g in zip(x.split(rows), master.unbind(0))])

    impls = {OURS: _train_call(lambda: grouped_fp8_linear_train(x, master, offsets), x, master, dy),
             TORCH_BF16: _train_call(bf16_loop, x, master, dy)}

    def error_of(impl, out):
        return max(calc_diff(o, r) for o, r in zip(out, refs[impl]))

    records = _check_and_time("fp8_linear_train", {"M": rows, "N": n, "K": k, "experts": num_experts}, impls,
                              error_of, GRAD_CALC_DIFF_BOUND, 6.0 * m * n * k)
    del x, dy, master, refs, impls
    torch.cuda.empty_cache()
    return records


# ---- one decoder layer ---------------------------------------------------------------------------

def layer_args():
    """One MoE layer of the deepseek-v3 preset with LAYER_EXPERTS routed experts, fp32 masters (the
    embedding and head are not timed: a small vocabulary, no MTP)."""
    return preset("deepseek-v3", num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0,
                  vocab_size=256, n_routed_experts=LAYER_EXPERTS, dtype="float32", fp8=False)


def measure_train_layer() -> List[Record]:
    model = training_model(layer_args(), "bf16", "cuda", seed=None)  # initialized on the GPU
    # The bf16 peer runs the experts as the per-expert loop: whether MoE.experts_batched (what
    # training_model picks for bf16 runs) is faster for 32 full-width experts is not measured, and the
    # peer must be the faster of the two.
    for module in model.modules():
        if isinstance(module, MoE):
            module.batched_experts = False
    fp8_modules = fp8_training_modules(model)
    layer = model.main_layers[0]
    # Gradients compared: every weight's but the routed experts' (their float64 copies would take 11 GB)
    # and the router's, which an expert choice flipped by a near tie moves a lot (calc_diff up to ~1.5e-2
    # on the tiny preset's 128 tokens; the other gradients stay under ~5e-3 there).
    checked = [p for name, p in layer.named_parameters()
               if p.requires_grad and ".experts." not in name and not name.endswith("mlp.gate.weight")]
    ctx = model.context(LAYER_BATCH, LAYER_SEQ, "cuda")
    # The residual stream enters a layer in fp32 under autocast (embedding + bf16 branches).
    x = torch.randn(LAYER_BATCH, LAYER_SEQ, HIDDEN, device="cuda", requires_grad=True)
    dy = torch.randn(LAYER_BATCH, LAYER_SEQ, HIDDEN, device="cuda")

    def step(fp8: bool, autocast: bool = True):
        def call():
            for module in fp8_modules:
                module.fp8_training = fp8
            for p in layer.parameters():
                p.grad = None
            x.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                y = layer(x, ctx)
            y.backward(dy)
            return [(y - x).detach(), x.grad - dy] + [p.grad for p in checked]

        return call

    expected = [t.double() for t in step(fp8=False, autocast=False)()]  # fp32 math: the reference
    impls = {OURS: step(fp8=True), TORCH_BF16: step(fp8=False)}

    def error_of(_, out):
        return max(calc_diff(o, r) for o, r in zip(out, expected))

    impls[OURS]()  # the first FP8 step stacks the expert masters (model/master_stack.py), once: not in the peak
    torch.cuda.reset_peak_memory_stats()
    shape = {"B": LAYER_BATCH, "S": LAYER_SEQ, "hidden": HIDDEN, "experts": model.args.n_routed_experts}
    records = _check_and_time("train_layer", shape, impls, error_of, LAYER_CALC_DIFF_BOUND, None)
    times = {r.impl: r.median_ms for r in records}
    if TORCH_BF16 in times:
        print(f"train_layer {shape}: fp8 {times[OURS]:.1f} ms, bf16 {times[TORCH_BF16]:.1f} ms per forward + "
              f"backward: fp8 {times[TORCH_BF16] / times[OURS]:.2f}x faster (goal >= 1.3x); peak memory "
              f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB", flush=True)
    del model, layer, x, dy, expected, impls
    torch.cuda.empty_cache()
    return records


def run(quick: bool = False) -> List[Record]:
    records: List[Record] = []
    for tokens, channels in QUICK_TRANSPOSE_SHAPES if quick else TRANSPOSE_SHAPES:
        records += measure_transpose_quant(tokens, channels, quick)
    for n, k in QUICK_WEIGHTS if quick else LAYER_WEIGHTS:
        records += measure_wgrad(TOKENS, n, k)
    for shape in QUICK_K_GROUPED_SHAPES if quick else K_GROUPED_SHAPES:
        records += measure_k_grouped_wgrad(*shape)
    for n, k in QUICK_WEIGHTS[:2] if quick else LAYER_WEIGHTS:
        records += measure_linear_train(TOKENS, n, k)
    for shape in GROUPED_LINEAR_SHAPES[:1] if quick else GROUPED_LINEAR_SHAPES:
        records += measure_grouped_linear_train(*shape)
    records += measure_train_layer()
    return records


# pytest-benchmark entries (`pytest benchmarks/ --benchmark-only`).

@pytest.mark.gpu
def test_transpose_quant_fp8(benchmark):
    t, c = TRANSPOSE_SHAPES[0]
    x = torch.randn(t, c, device="cuda", dtype=torch.bfloat16)
    out, ref = deepseek_ops.transpose_quant_fp8(x), reference.transpose_quant_fp8(x)
    assert all(torch.equal(o.view(torch.uint8), r.view(torch.uint8)) for o, r in zip(out, ref))
    pytest_benchmark(benchmark, lambda: deepseek_ops.transpose_quant_fp8(x))


@pytest.mark.gpu
def test_fp8_gemm_wgrad(benchmark):
    a, a_scales = _token_scaled(TOKENS, 7168)
    b, b_scales = _token_scaled(TOKENS, 2048)
    ref = reference.fp8_gemm_wgrad(a, a_scales, b, b_scales)
    assert calc_diff(deepseek_ops.fp8_gemm_wgrad(a, a_scales, b, b_scales), ref) < CALC_DIFF_BOUND
    pytest_benchmark(benchmark, functools.partial(deepseek_ops.fp8_gemm_wgrad, a, a_scales, b, b_scales))
