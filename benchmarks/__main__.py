"""`python -m benchmarks [--only NAME ...] [--quick]`: the benchmark report (the project's main job).

On a Hopper GPU with the CUDA build: warm-up, the ceiling probe, then every benchmarks/bench_*.py
module's run(quick) (found by glob, so new benches join by existing); prints one table per kernel
and writes benchmarks/results/<gpu>-<yyyymmdd>-<commit>.json and the roofline .png beside it.
A module that fails to import or run is reported and makes the exit status 1; the others still run.
Without a Hopper GPU it says why and runs `python -m deepseek_ops check` instead.
"""
import argparse
import importlib
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import List, Tuple

BENCH_DIR = Path(__file__).resolve().parent


def bench_modules() -> List[str]:
    """Names of the bench modules (bench_quant, bench_fp8_gemm, ...), sorted."""
    return sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))


def _selected(names: List[str], only: List[str]) -> List[str]:
    if not only:
        return names
    wanted = {o if o.startswith("bench_") else f"bench_{o}" for o in only}
    return [n for n in names if n in wanted]


def run_modules(names: List[str], quick: bool) -> Tuple[list, List[Tuple[str, str]]]:
    """All Records of the named modules, and (module, reason) for each one that failed."""
    records, failures = [], []
    for name in names:
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            got = list(module.run(quick=quick))
        except Exception as exc:  # noqa: BLE001 - one broken bench must not hide the others
            traceback.print_exc()
            failures.append((name, f"{type(exc).__name__}: {exc}".splitlines()[0]))
            print(f"[{name}] FAILED after {time.perf_counter() - start:.1f} s", flush=True)
            continue
        records.extend(got)
        print(f"[{name}] {len(got)} records in {time.perf_counter() - start:.1f} s", flush=True)
    return records, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME",
                        help="only these bench modules (quant or bench_quant, ...)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (each module's quick set)")
    args = parser.parse_args(argv)

    import deepseek_ops  # noqa: F401 - loads the extension and registers the ops
    from deepseek_ops import testing

    if not testing.hopper_available():
        print(f"No benchmark run: {testing.skip_reason()}; the benchmarks need a Hopper (sm_90) GPU "
              "and the CUDA build. Running the parity self-test instead: python -m deepseek_ops check",
              flush=True)
        return subprocess.call([sys.executable, "-m", "deepseek_ops", "check"])

    from benchmarks import report, timing

    names = _selected(bench_modules(), args.only)
    if not names:
        print(f"no bench module matches {args.only}; available: {bench_modules()}", file=sys.stderr)
        return 2
    timing.warm_up()
    ceilings = report.measure_ceilings()
    print(f"ceilings: copy {ceilings['copy_gbps']:.1f} GB/s, bf16 matmul {ceilings['bf16_tflops']:.1f} TFLOP/s",
          flush=True)
    records, failures = run_modules(names, args.quick)
    print()
    print(report.format_tables(records, ceilings))
    if records:
        paths = report.write_report(records, ceilings)
        print(f"wrote {paths['json']}" + (f" and {paths['png']}" if paths["png"] else ""))
    for name, reason in failures:
        print(f"FAILED: {name}: {reason}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
