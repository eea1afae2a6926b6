"""A/B of FP8 GEMM tile configurations against DeepGEMM, one process (kernel development tool).

  python -m benchmarks.ab_fp8_gemm [--configs auto,128x128,256x128] [--m 4096] [--shapes N:K,...]

Per shape: every config (forced through DSO_FP8_GEMM_CONFIG, "auto" = the heuristic's pick) and
DeepGEMM, each checked against the float64 reference, timed by the protocol (timing.time_rounds: two
rounds, the second reversed), then the mean SM clock and energy per call of each over ~0.3 s of
back-to-back calls (NVML), and TFLOP/s per MHz of that clock. Prints one line per shape and the
geomean of time ratios to DeepGEMM.
--unchecked skips the check of our configs (DeepGEMM is still checked): for ablation builds whose
output is wrong by design (a stage's loads or the promotion removed), timed to bound where time goes.
"""
import argparse
import math
import os

import torch

import deepseek_ops
from benchmarks import nvml
from benchmarks.bench_fp8_gemm import CALC_DIFF_BOUND, NK_SHAPES, make_inputs
from benchmarks.peers import deepgemm_fp8_gemm_fn
from benchmarks.timing import input_copies, time_rounds
from deepseek_ops import reference
from deepseek_ops.testing import calc_diff


def with_config(config: str, fn):
    def call():
        if config == "auto":
            os.environ.pop("DSO_FP8_GEMM_CONFIG", None)
        else:
            os.environ["DSO_FP8_GEMM_CONFIG"] = config
        return fn()
    return call


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="auto")
    parser.add_argument("--m", type=int, nargs="+", default=[4096])
    parser.add_argument("--shapes", default=",".join(f"{n}:{k}" for n, k in NK_SHAPES))
    parser.add_argument("--unchecked", action="store_true")
    args = parser.parse_args()
    configs = args.configs.split(",")
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    ratios = {c: [] for c in configs}
    for m in args.m:
        for n, k in shapes:
            inp = make_inputs(m, n, k)
            ref = reference.fp8_gemm(inp["a"], inp["a_scales"], inp["b"], inp["b_scales"], torch.float64)

            def impls(t):
                fns = {c: with_config(c, lambda t=t: deepseek_ops.fp8_gemm(t["a"], t["a_scales"], t["b"],
                                                                           t["b_scales"])) for c in configs}
                dg = deepgemm_fp8_gemm_fn(t["a"], t["a_scales"], t["b"], t["b_scales"])
                if dg is not None:
                    fns["deepgemm"] = dg
                return fns

            copies = [impls(c) for c in input_copies(inp)]
            names = list(copies[0])
            for name in names:
                if args.unchecked and name != "deepgemm":
                    continue
                err = calc_diff(copies[0][name](), ref)
                assert err < CALC_DIFF_BOUND, f"{name} at {(m, n, k)}: calc_diff {err:.3g}"
            times = time_rounds(copies, names)
            line = [f"({m}, {n}, {k})" + (" unchecked" if args.unchecked else "")]
            for name in names:
                fn = copies[0][name]
                clock, mj = nvml.measure(fn, max(10, int(300 / times[name])))
                tflops = 2.0 * m * n * k / times[name] / 1e9
                extra = ""
                if "deepgemm" in times and name != "deepgemm":
                    ratios[name].append(times["deepgemm"] / times[name])
                    extra = f" {times['deepgemm'] / times[name]:.3f}x dg"
                # TF per MHz of that clock: the work per cycle, which the 700 W cap's clock drift does not move.
                line.append(f"{name}: {times[name] * 1e3:.1f} us {tflops:.0f} TF {clock:.0f} MHz "
                            f"{tflops / clock:.3f} TF/MHz {mj:.2f} mJ{extra}")
            os.environ.pop("DSO_FP8_GEMM_CONFIG", None)
            print(" | ".join(line), flush=True)
            del inp, ref, copies
            torch.cuda.empty_cache()
    for c, r in ratios.items():
        if r:
            print(f"{c}: geomean {math.exp(sum(map(math.log, r)) / len(r)):.3f}x DeepGEMM over {len(r)} shapes")


if __name__ == "__main__":
    main()
