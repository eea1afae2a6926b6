"""model/train_report.py on hand-made histories: the comparison at the last step both runs evaluated,
the relative difference against the 0.25% goal, the train_step JSON records, the plot, bad pairs."""
import dataclasses
import json
import statistics

import pytest

from model.train import TrainConfig
from model.train_history import HISTORY_FILE, TrainHistory, load_history
from model.train_report import main

CFG = TrainConfig(steps=300, batch_size=4, seq_len=64, eval_every=100)


def make_run(tmp_path, precision: str, validation, step_times, **config):
    cfg = dataclasses.replace(CFG, precision=precision, **config)
    run = TrainHistory("tiny", dataclasses.asdict(cfg), 1234)
    run.begin_session(1, "cpu")
    for i, time_s in enumerate(step_times):
        run.add_step(i + 1, {"loss": 3.0 - i / 100, "main": 2.5 - i / 100, "mtp": 2.6, "grad_norm": 1.0,
                             "load_spread": 0.1, "skipped": False}, time_s)
    for step, loss in validation:
        run.add_validation(step, loss)
    run.update_session(10.0, "time_budget")
    folder = tmp_path / precision
    run.save(folder / HISTORY_FILE)
    return folder


def test_report_compares_at_the_last_common_step(tmp_path, capsys):
    bf16 = make_run(tmp_path, "bf16", [(100, 2.0), (200, 1.5)], [0.3, 0.2, 0.2, 0.25])
    fp8 = make_run(tmp_path, "fp8", [(100, 2.01), (200, 1.503), (250, 1.2)], [0.2, 0.1, 0.15])  # went further
    main([str(fp8), str(bf16 / HISTORY_FILE), "--out", str(tmp_path / "out" / "report")])
    out = capsys.readouterr().out
    assert "validation loss at step 200" in out and "bf16 1.5000, fp8 1.5030" in out
    assert "= +0.200% (goal: within 0.25%: met)" in out
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["gpu"] == "cpu" and data["ceilings"] == {}
    records = {r["impl"]: r for r in data["records"]}
    assert set(records) == {"bf16", "fp8"}
    assert records["fp8"] == {"kernel": "train_step", "shape": {"preset": "tiny", "B": 4, "S": 64, "step": 200},
                              "impl": "fp8", "median_ms": pytest.approx(150.0), "tflops": None, "gbps": None,
                              "error": 1.503}
    assert records["bf16"]["median_ms"] == pytest.approx(1e3 * statistics.median([0.3, 0.2, 0.2, 0.25]))
    assert records["bf16"]["error"] == 1.5
    if "no plot" not in out:
        assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_says_when_the_goal_is_missed(tmp_path, capsys):
    bf16 = make_run(tmp_path, "bf16", [(100, 2.0)], [0.2])
    fp8 = make_run(tmp_path, "fp8", [(100, 1.994)], [0.2])
    main([str(bf16), str(fp8), "--out", str(tmp_path / "r.json")])
    assert "= -0.300% (goal: within 0.25%: NOT met)" in capsys.readouterr().out
    assert (tmp_path / "r.json").exists()


def test_report_rejects_runs_that_are_not_comparable(tmp_path):
    bf16 = make_run(tmp_path, "bf16", [(100, 2.0)], [0.2])
    with pytest.raises(ValueError, match="expected one bf16 run and one fp8 run, got precisions"):
        main([str(bf16), str(bf16)])
    fp8 = make_run(tmp_path, "fp8", [(100, 2.0)], [0.2], batch_size=8, eval_every=50)  # eval_every may differ
    with pytest.raises(ValueError, match="differ in more than their precision: batch_size: bf16 4, fp8 8$"):
        main([str(bf16), str(fp8)])
    fp8 = make_run(tmp_path, "fp8", [(50, 2.0)], [0.2])
    with pytest.raises(ValueError, match="no step with a validation loss in both runs"):
        main([str(bf16), str(fp8)])
    with pytest.raises(FileNotFoundError, match="no training history"):
        load_history(tmp_path / "nowhere")
