"""Sweeps every instantiated tile configuration of the FP8 GEMMs on the issue's shapes (H200).

`python -m benchmarks.tune_fp8_gemm [--quick] [--m M ...]` prints, per shape, the time of each
compiled dense (BLOCK_M, BLOCK_N, cluster) forced through DSO_FP8_GEMM_CONFIG beside the heuristic's
pick, so the host heuristic (csrc/sm90_fp8_gemm_config.cpp) can be corrected from data. Short
ops are timed as the bench times them (graph replay over rotated input copies, operands from DRAM);
lines "SWEEP m n k block_m block_n cluster us" are printed for fitting.
Every configuration's output is checked against the float64 reference before it is timed.
"""
import argparse
import os
import sys

import torch

from benchmarks.bench_fp8_gemm import M_VALUES, NK_SHAPES, CALC_DIFF_BOUND, make_inputs
from benchmarks.timing import input_copies, time_op
import deepseek_ops
from deepseek_ops import reference
from deepseek_ops.testing import calc_diff, fp8_gemm_tile_configs


def sweep(m: int, n: int, k: int):
    inp = make_inputs(m, n, k)
    args = (inp["a"], inp["a_scales"], inp["b"], inp["b_scales"])
    fns = [lambda c=c: deepseek_ops.fp8_gemm(c["a"], c["a_scales"], c["b"], c["b_scales"]) for c in input_copies(inp)]
    ref = reference.fp8_gemm(*args, torch.float64)
    os.environ.pop("DSO_FP8_GEMM_CONFIG", None)
    results = {"heuristic": time_op(*fns)}
    for block_m, block_n, cluster in fp8_gemm_tile_configs("dense"):
        if block_n > max(16, n):
            continue
        name = f"{block_m}x{block_n}x0x{cluster}"
        os.environ["DSO_FP8_GEMM_CONFIG"] = name
        try:
            out = deepseek_ops.fp8_gemm(*args)
        except RuntimeError as exc:
            print(f"  {name}: {str(exc).splitlines()[0]}", file=sys.stderr)
            continue
        diff = calc_diff(out, ref)
        if not diff < CALC_DIFF_BOUND:
            print(f"  {name}: WRONG RESULT, calc_diff {diff:.3g}", file=sys.stderr)
            continue
        results[name] = time_op(*fns)
        print(f"SWEEP {m} {n} {k} {block_m} {block_n} {cluster} {results[name] * 1e3:.2f}", flush=True)
    os.environ.pop("DSO_FP8_GEMM_CONFIG", None)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two shapes per M only")
    parser.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="the M values to sweep")
    opts = parser.parse_args(argv)
    for m in opts.m:
        for n, k in NK_SHAPES[:2] if opts.quick else NK_SHAPES:
            results = sweep(m, n, k)
            best = min((v, c) for c, v in results.items() if c != "heuristic")
            flops = 2.0 * m * n * k
            print(f"M={m} N={n} K={k}: heuristic {results['heuristic'] * 1e3:.1f} us "
                  f"({flops / results['heuristic'] / 1e9:.0f} TFLOP/s), best {best[1]} {best[0] * 1e3:.1f} us "
                  f"({flops / best[0] / 1e9:.0f} TFLOP/s)", flush=True)
            ranked = sorted((v, c) for c, v in results.items() if c != "heuristic")[:5]
            print("   top: " + ", ".join(f"{c} {v * 1e3:.1f}us" for v, c in ranked), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
