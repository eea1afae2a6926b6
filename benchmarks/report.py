"""Benchmark records, the ceiling probe, and the report (tables, JSON, roofline PNG).

The JSON schema and the kernel/peer names are fixed by benchmarks/README.md ("Output").
Our implementation's records use impl="deepseek_ops" (OURS); every other impl is a peer.
"""
import dataclasses
import datetime
import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.timing import bench

OURS = "deepseek_ops"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Datasheet dense peaks of the H100/H200 SXM (TFLOP/s), for "% of peak".
FP8_PEAK_TFLOPS = 1979.0
BF16_PEAK_TFLOPS = 989.0


@dataclasses.dataclass
class Record:
    """One measurement: one kernel, one shape, one implementation (a row of the JSON "records")."""

    kernel: str
    shape: Dict[str, object]
    impl: str
    median_ms: float
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    error: Optional[float] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def throughput(ms: float, *, flops: Optional[float] = None, bytes_moved: Optional[float] = None):
    """(tflops, gbps) for a median time in ms; None where the count is not given."""
    seconds = ms * 1e-3
    tflops = flops / seconds / 1e12 if flops is not None and seconds > 0 else None
    gbps = bytes_moved / seconds / 1e9 if bytes_moved is not None and seconds > 0 else None
    return tflops, gbps


def measure_ceilings() -> Dict[str, float]:
    """The same-run ceilings: device-to-device copy GB/s and bf16 torch.matmul TFLOP/s.

    copy_gbps: copy of a 2 GiB buffer into another, counting bytes read + written (4 GiB a copy).
    bf16_tflops: torch.matmul (cuBLAS) of random bf16 8192 x 8192 x 8192.
    """
    n_bytes = 2 * 1024 ** 3
    src = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src), flush_l2=False)  # 2 GiB already defeats the L2
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(n, n, dtype=torch.bfloat16, device="cuda")
    mm_ms = bench(lambda: torch.matmul(a, b, out=out))
    del a, b, out
    torch.cuda.empty_cache()
    return {"copy_gbps": 2 * n_bytes / (copy_ms * 1e-3) / 1e9,
            "bf16_tflops": 2 * n ** 3 / (mm_ms * 1e-3) / 1e12}


def git_commit() -> str:
    """HEAD's short hash; DSO_BENCH_COMMIT overrides it (a copy of the tree without .git, e.g. on a
    remote benchmark machine, would otherwise report a stale or unknown commit)."""
    if os.environ.get("DSO_BENCH_COMMIT"):
        return os.environ["DSO_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def results_stem(gpu: str, commit: str, when: datetime.datetime) -> str:
    return f"{gpu.replace(' ', '_')}-{when:%Y%m%d}-{commit}"


def report_payload(records: Sequence[Record], ceilings: Dict[str, float], **header) -> dict:
    """The JSON document of README "Output". Its header (gpu, commit, date, torch, cuda) describes this
    process unless given: a report of measurements made elsewhere passes theirs."""
    now = datetime.datetime.now(datetime.timezone.utc)
    header = {"gpu": gpu_name(), "commit": git_commit(), "date": now.isoformat(timespec="seconds"),
              "torch": torch.__version__, "cuda": torch.version.cuda, **header}
    return {**header, "ceilings": dict(ceilings), "records": [r.to_dict() for r in records]}


def write_json(records: Sequence[Record], ceilings: Dict[str, float], directory: Path = RESULTS_DIR,
               path: Optional[Path] = None, **header) -> Path:
    """Writes report_payload(records, ceilings, **header) to `path`, by default
    benchmarks/results/<gpu>-<yyyymmdd>-<commit>.json, and returns the path."""
    payload = report_payload(records, ceilings, **header)
    if path is None:
        when = datetime.datetime.fromisoformat(payload["date"])
        path = Path(directory) / f"{results_stem(payload['gpu'], payload['commit'], when)}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def datasheet_peak_tflops(kernel: str) -> float:
    """FP8 dense peak for kernels whose MMAs take FP8 operands, bf16 dense peak otherwise."""
    fp8 = "fp8_gemm" in kernel or kernel.startswith(("moe_layer", "fp8_linear"))
    return FP8_PEAK_TFLOPS if fp8 else BF16_PEAK_TFLOPS


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _shape_key(shape: dict) -> tuple:
    return tuple(shape.items())


def _shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def format_tables(records: Sequence[Record], ceilings: Dict[str, float]) -> str:
    """One table per kernel: shape | ours ms | each peer ms | speedup vs each peer | TFLOP/s | GB/s | %.

    speedup "x<peer>" = peer time / our time (> 1: ours is faster). "%copy" is our GB/s over the
    copy probe; "%mm" our TFLOP/s over the bf16 matmul probe; "%peak" over the datasheet peak.
    """
    lines: List[str] = []
    by_kernel: Dict[str, List[Record]] = {}
    for r in records:
        by_kernel.setdefault(r.kernel, []).append(r)
    copy_gbps = ceilings.get("copy_gbps")
    mm_tflops = ceilings.get("bf16_tflops")
    for kernel, rows in by_kernel.items():
        peers = list(dict.fromkeys(r.impl for r in rows if r.impl != OURS))
        shapes: Dict[tuple, Dict[str, Record]] = {}
        shape_dicts: Dict[tuple, dict] = {}
        for r in rows:
            shapes.setdefault(_shape_key(r.shape), {})[r.impl] = r
            shape_dicts[_shape_key(r.shape)] = r.shape
        header = (["shape", "ours ms"] + [f"{p} ms" for p in peers] + [f"x{p}" for p in peers]
                  + ["TFLOP/s", "GB/s", "%copy", "%mm", "%peak", "error"])
        table = [header]
        for key, impls in shapes.items():
            ours = impls.get(OURS)
            row = [_shape_str(shape_dicts[key]), _fmt(ours.median_ms if ours else None, ".4f")]
            row += [_fmt(impls[p].median_ms if p in impls else None, ".4f") for p in peers]
            for p in peers:
                speedup = impls[p].median_ms / ours.median_ms if ours and p in impls and ours.median_ms > 0 else None
                row.append(_fmt(speedup, ".2f"))
            tflops = ours.tflops if ours else None
            gbps = ours.gbps if ours else None
            row += [_fmt(tflops, ".1f"), _fmt(gbps, ".1f"),
                    _fmt(100 * gbps / copy_gbps if gbps and copy_gbps else None, ".1f"),
                    _fmt(100 * tflops / mm_tflops if tflops and mm_tflops else None, ".1f"),
                    _fmt(100 * tflops / datasheet_peak_tflops(kernel) if tflops else None, ".1f"),
                    _fmt(ours.error if ours else None, ".2e")]
            table.append(row)
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines.append(f"== {kernel} ==")
        for i, row in enumerate(table):
            lines.append(" | ".join(cell.ljust(w) if j == 0 else cell.rjust(w)
                                    for j, (cell, w) in enumerate(zip(row, widths))))
            if i == 0:
                lines.append("-+-".join("-" * w for w in widths))
        lines.append("")
    return "\n".join(lines)


def plot_roofline(records: Sequence[Record], ceilings: Dict[str, float], path: Path) -> Path:
    """Roofline PNG of our records.

    Left: records with both TFLOP/s and GB/s at their arithmetic intensity, under the measured
    copy bandwidth and the bf16 matmul probe (FP8 datasheet peak dashed). Right: records with only
    GB/s (quantization, data movement) as % of the copy probe.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in records if r.impl == OURS]
    compute = [r for r in ours if r.tflops and r.gbps]
    memory = [r for r in ours if r.gbps and not r.tflops]
    copy_gbps = ceilings.get("copy_gbps") or 4800.0
    mm_tflops = ceilings.get("bf16_tflops") or BF16_PEAK_TFLOPS
    fig, (ax_roof, ax_bw) = plt.subplots(1, 2, figsize=(14, 5.5))

    intensity = [10 ** (x / 20) for x in range(-20, 101)]  # 0.1 .. 1e5 FLOP/byte
    ax_roof.plot(intensity, [min(mm_tflops, i * copy_gbps / 1e3) for i in intensity], "k-",
                 label=f"copy {copy_gbps:.0f} GB/s, bf16 mm {mm_tflops:.0f} TFLOP/s")
    ax_roof.plot(intensity, [min(FP8_PEAK_TFLOPS, i * copy_gbps / 1e3) for i in intensity], "k--",
                 label=f"FP8 datasheet {FP8_PEAK_TFLOPS:.0f} TFLOP/s")
    for kernel in dict.fromkeys(r.kernel for r in compute):
        pts = [r for r in compute if r.kernel == kernel]
        ax_roof.scatter([r.tflops * 1e3 / r.gbps for r in pts], [r.tflops for r in pts], label=kernel, s=18)
    ax_roof.set_xscale("log")
    ax_roof.set_yscale("log")
    ax_roof.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax_roof.set_ylabel("TFLOP/s")
    ax_roof.set_title("roofline (deepseek_ops)")
    ax_roof.legend(fontsize=7)
    ax_roof.grid(True, which="both", alpha=0.3)

    labels = [f"{r.kernel}\n{_shape_str(r.shape)}" for r in memory]
    ax_bw.barh(range(len(memory)), [100 * r.gbps / copy_gbps for r in memory])
    ax_bw.set_yticks(range(len(memory)), labels, fontsize=6)
    ax_bw.axvline(100, color="k", linestyle="--")
    ax_bw.set_xlabel("% of measured copy bandwidth")
    ax_bw.set_title("bandwidth-bound kernels (deepseek_ops)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(records: Sequence[Record], ceilings: Dict[str, float],
                 directory: Path = RESULTS_DIR) -> Dict[str, Optional[Path]]:
    """JSON and, next to it, the roofline PNG (same stem; None, with a note, without matplotlib)."""
    json_path = write_json(records, ceilings, directory)
    try:
        png_path = plot_roofline(records, ceilings, json_path.with_suffix(".png"))
    except ImportError as exc:
        print(f"no roofline plot: {exc} (pip install matplotlib)")
        png_path = None
    return {"json": json_path, "png": png_path}
