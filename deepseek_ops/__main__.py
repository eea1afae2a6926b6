"""Command line: `python -m deepseek_ops info` and `python -m deepseek_ops check [OP ...]`."""
import argparse
import sys

import torch

import deepseek_ops
from deepseek_ops import _selftest, testing

INTERNAL_OPS = {"built_with_cuda"}


def registered_ops():
    """Names of every op in torch.ops.deepseek_ops, public ones only."""
    names = (n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("deepseek_ops::"))
    return sorted(n for n in names if n not in INTERNAL_OPS)


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"deepseek_ops::{op}", key)


def _print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def cmd_info(_args) -> int:
    print(f"deepseek_ops: {deepseek_ops.build_summary()}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU-only torch)'}")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{major}{minor}), {torch.cuda.device_count()} visible")
    else:
        print("GPU: none")
    print("CUDA kernels usable here: " + ("yes" if testing.hopper_available() else f"no ({testing.skip_reason()})"))
    print()
    built = deepseek_ops.cuda_kernels_built()
    rows = []
    for op in registered_ops():
        # In a build without CUDA every CUDA slot holds a stub that raises: not a kernel.
        cuda = "yes" if built and _has_kernel(op, "CUDA") else "no"
        rows.append((op, cuda, "yes" if _has_kernel(op, "CPU") else "no",
                     "yes" if _has_kernel(op, "Meta") else "no"))
    _print_table(("op", "CUDA kernel", "CPU (reference)", "fake/meta"), rows)
    return 0


def cmd_check(args) -> int:
    devices, why_not_cuda = _selftest.available_devices()
    unknown = [o for o in args.ops if o not in _selftest.CHECKS]
    if unknown:
        print(f"no self-test registered for {unknown}; known: {sorted(_selftest.CHECKS)}", file=sys.stderr)
        return 2
    if why_not_cuda:
        print(f"CUDA kernels not checked: {why_not_cuda}. Checking the CPU references.")
    rows = _selftest.run_checks(devices, args.ops)
    missing = [op for op in registered_ops() if op not in _selftest.CHECKS]
    _print_table(("op", "device", "error", "metric [unit], bound", "pass"),
                 [(op, dev, f"{err:.3g}", metric, "PASS" if ok else f"FAIL {note}".rstrip())
                  for op, dev, err, ok, note, metric in rows])
    failed = [r for r in rows if not r[3]]
    if missing and not args.ops:
        print(f"\nops without a self-test: {', '.join(missing)}")
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed on {', '.join(devices)}")
    return 1 if failed or not rows else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepseek_ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build, torch/CUDA versions, GPU, and which ops have CUDA kernels")
    check = sub.add_parser("check", help="parity self-test of every op on this machine")
    check.add_argument("ops", nargs="*", help="only these ops (default: all)")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
