"""A/B of the weight-gradient GEMM tile configurations against DeepGEMM, one process (kernel
development tool).

  python -m benchmarks.ab_wgrad [--configs auto,128x128,128x160,128x192] [--dense N:K,...]
                                [--k-grouped G:M:N:K,...] [--no-without-c] [--in-place-paths]

Shapes as benchmarks/bench_train.py's quick set (M = 4096 tokens; (N, K) of the weight; k-grouped: G
experts of M tokens each). Per shape: fp8_gemm_wgrad / k_grouped_fp8_gemm_wgrad under every config
(forced through DSO_FP8_GEMM_CONFIG, "auto" = the heuristic's pick), called as MODES says (with c into
a new d; "<config> in-place", accumulating into c as DeepGEMM does; "<config> no-c", as training calls
them), and DeepGEMM's sm90 1D1D kernels; each checked against the float64 reference first, then timed
by the protocol (timing.time_rounds: two rounds, the second reversed, L2 flushed before each run), then
the mean SM clock and energy per call of each over ~0.3 s of back-to-back calls (NVML). Prints one line
per shape and the geomean of DeepGEMM's time / ours per config and mode.
"""
import argparse
import math
import os
from typing import Callable, Dict, List

import torch

import deepseek_ops
from benchmarks import nvml
from benchmarks.ab_fp8_gemm import with_config
from benchmarks.bench_fp8_gemm import CALC_DIFF_BOUND
from benchmarks.bench_train import QUICK_K_GROUPED_SHAPES, QUICK_WEIGHTS, TOKENS
from benchmarks.peers import deepgemm_k_grouped_wgrad_fn, deepgemm_wgrad_fn
from benchmarks.timing import time_rounds
from deepseek_ops import reference
from deepseek_ops.testing import calc_diff

DEEPGEMM = "deepgemm"


def token_scaled(tokens: int, channels: int):
    """transpose_quant_fp8 of random bf16 [tokens, channels]: the wgrad operand layout."""
    return deepseek_ops.transpose_quant_fp8(torch.randn(tokens, channels, device="cuda", dtype=torch.bfloat16))


def dense_case(n: int, k: int):
    """(label, flops, {impl: fn}, {impl: error_of(out)}) of fp8_gemm_wgrad on a [N, K] weight."""
    a, a_scales = token_scaled(TOKENS, n)
    b, b_scales = token_scaled(TOKENS, k)
    c = torch.randn(n, k, device="cuda")
    ref = reference.fp8_gemm_wgrad(a, a_scales, b, b_scales).double()
    ref_c = ref + c.double()
    return (f"fp8_gemm_wgrad (M {TOKENS}, N {n}, K {k})", 2.0 * TOKENS * n * k,
            lambda mode: _ours(mode, c, lambda **kw: deepseek_ops.fp8_gemm_wgrad(a, a_scales, b, b_scales, **kw)),
            deepgemm_wgrad_fn(a, a_scales, b, b_scales, c),
            lambda with_c, out: calc_diff(out, ref_c if with_c else ref))


def k_grouped_case(groups: int, rows: int, n: int, k: int):
    tokens = groups * rows
    a, a_scales = token_scaled(tokens, n)
    b, b_scales = token_scaled(tokens, k)
    offsets = torch.arange(0, tokens + 1, rows, device="cuda", dtype=torch.int32)
    c = torch.randn(groups, n, k, device="cuda")
    ref = reference.k_grouped_fp8_gemm_wgrad(a, a_scales, b, b_scales, offsets)

    def error_of(with_c: bool, out: torch.Tensor) -> float:  # the worst expert
        return max(calc_diff(out[g], ref[g].double() + (c[g].double() if with_c else 0)) for g in range(groups))

    return (f"k_grouped_fp8_gemm_wgrad (G {groups}, M {rows}, N {n}, K {k})", 2.0 * tokens * n * k,
            lambda mode: _ours(mode, c, lambda **kw: deepseek_ops.k_grouped_fp8_gemm_wgrad(a, a_scales, b, b_scales,
                                                                                        offsets, **kw)),
            deepgemm_k_grouped_wgrad_fn(a, a_scales, b, b_scales, offsets, c), error_of)


# How ours is called: "c" reads c and writes a new d; "in-place" accumulates into a copy of c (c = out,
# as DeepGEMM's c = d; the first call, the checked one, gives c + dW), by the path the heuristic picks
# or ("in-place load" / "in-place reduce", with --in-place-paths) forced by DSO_FP8_GEMM_IN_PLACE;
# "no-c" writes dW alone, as training calls it.
MODES = {"c": "", "in-place": " in-place", "in-place-load": " in-place load", "in-place-reduce": " in-place reduce",
         "no-c": " no-c"}
IN_PLACE_PATH = "DSO_FP8_GEMM_IN_PLACE"


def _ours(mode: str, c: torch.Tensor, wgrad: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
    if mode.startswith("in-place"):
        acc = c.clone()
        path = mode.partition("in-place-")[2]

        def call():
            if path:
                os.environ[IN_PLACE_PATH] = path
            else:
                os.environ.pop(IN_PLACE_PATH, None)
            return wgrad(c=acc, out=acc)
        return call
    return lambda: wgrad(c=c if mode == "c" else None)


def measure(case, configs: List[str], without_c: bool, in_place_paths: bool, ratios: Dict[str, List[float]]):
    label, flops, ours, deepgemm, error_of = case
    impls: Dict[str, Callable[[], torch.Tensor]] = {}
    with_c_of: Dict[str, bool] = {}
    for config in configs:
        for mode, suffix in MODES.items():
            if (mode == "no-c" and not without_c) or (mode.startswith("in-place-") and not in_place_paths):
                continue
            name = config + suffix
            impls[name], with_c_of[name] = with_config(config, ours(mode)), mode != "no-c"
    if deepgemm is not None:
        impls[DEEPGEMM], with_c_of[DEEPGEMM] = deepgemm, True
    checked = {}
    for name, fn in impls.items():
        try:
            error = error_of(with_c_of[name], fn())
        except RuntimeError as exc:  # a config not instantiated for this type, or not fitting
            print(f"{label}: {name} skipped ({str(exc).splitlines()[0][:160]})", flush=True)
            continue
        if error >= CALC_DIFF_BOUND:
            if name != DEEPGEMM:
                raise AssertionError(f"{label}: {name} calc_diff {error:.3g} >= {CALC_DIFF_BOUND}")
            print(f"{label}: {name} calc_diff {error:.3g}; not timed", flush=True)
            continue
        checked[name] = fn
    times = time_rounds([checked], list(checked))
    line = [label]
    for name, ms in times.items():
        clock, mj = nvml.measure(checked[name], max(10, int(300 / ms)))
        extra = ""
        if DEEPGEMM in times and name != DEEPGEMM:
            ratio = times[DEEPGEMM] / ms
            ratios.setdefault(name, []).append(ratio)
            extra = f" {ratio:.3f}x dg"
        line.append(f"{name}: {ms * 1e3:.1f} us {flops / ms / 1e9:.0f} TF {clock:.0f} MHz {mj:.1f} mJ{extra}")
    os.environ.pop("DSO_FP8_GEMM_CONFIG", None)
    os.environ.pop(IN_PLACE_PATH, None)
    print(" | ".join(line), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="auto,128x128")
    parser.add_argument("--dense", default=",".join(f"{n}:{k}" for n, k in QUICK_WEIGHTS))
    parser.add_argument("--k-grouped", default=",".join(":".join(map(str, s)) for s in QUICK_K_GROUPED_SHAPES))
    parser.add_argument("--no-without-c", action="store_true", help="time ours with c only")
    parser.add_argument("--in-place-paths", action="store_true",
                        help="also time both in-place paths forced (DSO_FP8_GEMM_IN_PLACE=load / reduce)")
    args = parser.parse_args()
    configs = args.configs.split(",")
    parse = lambda spec: [tuple(int(v) for v in s.split(":")) for s in spec.split(",") if s]  # noqa: E731
    ratios: Dict[str, List[float]] = {}
    cases = [(dense_case, s) for s in parse(args.dense)] + [(k_grouped_case, s) for s in parse(args.k_grouped)]
    for make, shape in cases:
        measure(make(*shape), configs, not args.no_without_c, args.in_place_paths, ratios)
        torch.cuda.empty_cache()
    for name, r in ratios.items():
        print(f"{name}: geomean {math.exp(sum(map(math.log, r)) / len(r)):.3f}x DeepGEMM over {len(r)} shapes")


if __name__ == "__main__":
    main()
