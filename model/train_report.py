"""FP8 against bf16 training: `python -m model.train_report RUN RUN [--out STEM]`.

Each RUN is a run's --out-dir (or its history JSON, model/train_history.py); one run is
--precision bf16, the other fp8, with the same preset and options otherwise. Prints both validation
losses at the last step both runs evaluated and their relative difference (fp8 - bf16) / bf16,
against the goal of GOAL_RELATIVE_DIFFERENCE; writes STEM.png (training and validation curves of
both, and the relative difference of validation over the steps) and STEM.json, the records
`train_step` (impls fp8 and bf16: median_ms the median step wall time, error the final validation
loss) in the format of benchmarks/report.py, its header from the runs' last session (GPU, commit,
torch, CUDA). Default STEM: benchmarks/results/<gpu>-<yyyymmdd>-<commit>-train_step.
"""
import argparse
import dataclasses
import datetime
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from benchmarks.report import RESULTS_DIR, Record, results_stem, write_json
from model.train import RESUME_FREE_FIELDS
from model.train_history import TrainHistory, load_history

GOAL_RELATIVE_DIFFERENCE = 0.0025  # DeepSeek-V3's report: FP8 training loss within 0.25% of bf16
SMOOTHING_STEPS = 50  # moving average of the plotted training loss


@dataclasses.dataclass
class Comparison:
    step: int  # the last step both runs evaluated
    bf16: float
    fp8: float

    @property
    def relative_difference(self) -> float:
        return (self.fp8 - self.bf16) / self.bf16

    @property
    def within_goal(self) -> bool:
        return abs(self.relative_difference) <= GOAL_RELATIVE_DIFFERENCE


def by_precision(runs: List[TrainHistory]) -> Dict[str, TrainHistory]:
    """{"bf16": ..., "fp8": ...}; raises unless the runs are one of each with the same options otherwise."""
    got = {run.precision: run for run in runs}
    if sorted(got) != ["bf16", "fp8"] or len(runs) != 2:
        raise ValueError(f"expected one bf16 run and one fp8 run, got precisions {[r.precision for r in runs]}")
    bf16, fp8 = got["bf16"], got["fp8"]
    ignored = set(RESUME_FREE_FIELDS) | {"precision"}
    differ = [f"{k}: bf16 {bf16.train_config.get(k)!r}, fp8 {fp8.train_config.get(k)!r}"
              for k in sorted(set(bf16.train_config) | set(fp8.train_config))
              if k not in ignored and bf16.train_config.get(k) != fp8.train_config.get(k)]
    if bf16.preset != fp8.preset:
        differ.insert(0, f"preset: bf16 {bf16.preset!r}, fp8 {fp8.preset!r}")
    if differ:
        raise ValueError(f"the runs differ in more than their precision: {'; '.join(differ)}")
    return got


def validation(run: TrainHistory) -> Dict[int, float]:
    """{step: validation loss}."""
    return {int(step): float(loss) for step, loss in run.validation}


def compare(bf16: TrainHistory, fp8: TrainHistory) -> Comparison:
    """Both validation losses at the last step both runs evaluated."""
    bf16_val, fp8_val = validation(bf16), validation(fp8)
    common = sorted(set(bf16_val) & set(fp8_val))
    if not common:
        raise ValueError(f"no step with a validation loss in both runs (bf16: {sorted(bf16_val)}, fp8: "
                         f"{sorted(fp8_val)}); train with --eval-every")
    return Comparison(common[-1], bf16_val[common[-1]], fp8_val[common[-1]])


def records(runs: Dict[str, TrainHistory], comparison: Comparison) -> List[Record]:
    """The train_step records: shape preset, B, S and the step compared; error the validation loss there."""
    out = []
    for impl, run in runs.items():
        shape = {"preset": run.preset, "B": run.train_config["batch_size"], "S": run.train_config["seq_len"],
                 "step": comparison.step}
        out.append(Record("train_step", shape, impl, run.median_step_ms(), error=getattr(comparison, impl)))
    return out


def _moving_average(values: List[float], width: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def plot(runs: Dict[str, TrainHistory], comparison: Comparison, path: Path) -> Path:
    """Training next-token loss (moving average), validation loss, and the validation's relative
    difference over the steps both runs evaluated, with the goal's band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val, ax_diff) = plt.subplots(1, 3, figsize=(17, 5))
    for impl, run in runs.items():
        steps = [int(s["step"]) for s in run.steps]
        ax_train.plot(steps, _moving_average([float(s["main"]) for s in run.steps], SMOOTHING_STEPS), label=impl,
                      linewidth=1)
        val = validation(run)
        ax_val.plot(list(val), list(val.values()), "o-", label=impl, markersize=3)
    ax_train.set_title(f"training next-token loss (moving average of {SMOOTHING_STEPS} steps)")
    ax_val.set_title("validation next-token loss")
    bf16_val, fp8_val = validation(runs["bf16"]), validation(runs["fp8"])
    common = sorted(set(bf16_val) & set(fp8_val))
    ax_diff.plot(common, [100 * (fp8_val[s] - bf16_val[s]) / bf16_val[s] for s in common], "o-", markersize=3)
    for bound in (-100 * GOAL_RELATIVE_DIFFERENCE, 100 * GOAL_RELATIVE_DIFFERENCE):
        ax_diff.axhline(bound, color="k", linestyle="--", linewidth=1)
    ax_diff.axhline(0, color="k", linewidth=0.5)
    ax_diff.set_title("validation (fp8 - bf16) / bf16, % (goal: within the dashed band)")
    for ax in (ax_train, ax_val, ax_diff):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in (ax_train, ax_val):
        ax.set_ylabel("cross-entropy (nats / byte)")
        ax.legend()
    run = runs["fp8"]
    fig.suptitle(f"{run.preset}: {run.parameters / 1e6:.0f}M parameters, {run.tokens_per_step} tokens / step; "
                 f"step {comparison.step}: bf16 {comparison.bf16:.4f}, fp8 {comparison.fp8:.4f} "
                 f"({100 * comparison.relative_difference:+.3f}%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _header(run: TrainHistory) -> Dict[str, object]:
    """The benchmark JSON header of the machine and code that trained (the run's last session)."""
    session = run.sessions[-1] if run.sessions else {}
    return {key: session[key] for key in ("gpu", "commit", "torch", "cuda") if key in session}


def report(paths: List[Path], out: Optional[Path] = None) -> Tuple[Comparison, Path, Optional[Path]]:
    """Prints the comparison and writes the JSON and the plot; returns (comparison, json path, png path
    or None without matplotlib)."""
    runs = by_precision([load_history(p) for p in paths])
    comparison = compare(runs["bf16"], runs["fp8"])
    header = _header(runs["fp8"])
    if out is None:
        when = datetime.datetime.now(datetime.timezone.utc)
        name = results_stem(header.get("gpu", "unknown"), header.get("commit", "unknown"), when)
        out = RESULTS_DIR / f"{name}-train_step"
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".json", ".png") else out
    json_path = write_json(records(runs, comparison), {}, path=stem.parent / f"{stem.name}.json", **header)
    verdict = "met" if comparison.within_goal else "NOT met"
    print(f"validation loss at step {comparison.step} (the last step both runs evaluated): bf16 "
          f"{comparison.bf16:.4f}, fp8 {comparison.fp8:.4f}; (fp8 - bf16) / bf16 = "
          f"{100 * comparison.relative_difference:+.3f}% (goal: within {100 * GOAL_RELATIVE_DIFFERENCE:.2f}%: "
          f"{verdict})")
    bf16_ms, fp8_ms = runs["bf16"].median_step_ms(), runs["fp8"].median_step_ms()
    print(f"median step: bf16 {bf16_ms:.1f} ms, fp8 {fp8_ms:.1f} ms (bf16 / fp8 = {bf16_ms / fp8_ms:.2f}x); steps "
          f"run: bf16 {runs['bf16'].last_step}, fp8 {runs['fp8'].last_step}")
    try:
        png_path = plot(runs, comparison, stem.parent / f"{stem.name}.png")
    except ImportError as exc:
        print(f"no plot: {exc} (pip install matplotlib)")
        png_path = None
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return comparison, json_path, png_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs=2, type=Path, help="the two runs' --out-dir (or history JSON files)")
    parser.add_argument("--out", type=Path, default=None, help="STEM of the .json and .png written")
    args = parser.parse_args(argv)
    report(args.runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
