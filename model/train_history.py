"""The record of a training run: HISTORY_FILE (JSON) in the run's --out-dir and beside each of its
checkpoints, continued across --resume (model/train.py writes it; model/train_report.py reads it).

    {"preset": "train-h200", "precision": "fp8", "tokens_per_step": 16384, "parameters": 150500224,
     "train_config": {"steps": 2000, "batch_size": 32, "seq_len": 512, "lr": 0.0006, ...},
     "skipped_steps": 0,
     "steps": [{"step": 1, "loss": 5.9, "main": 5.6, "mtp": 5.7, "grad_norm": 3.1, "load_spread": 0.4,
                "skipped": false, "time_s": 0.21}, ...],
     "validation": [[100, 2.71], ...],
     "sessions": [{"first_step": 1, "last_step": 812, "stopped_by": "time_budget", "wall_s": 212.4,
                   "gpu": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "commit": "abc1234"}, ...]}

"step" counts the optimizer steps done (the first step is 1), as the checkpoints' step-N folders and
the validation entries do; time_s is the step's wall time (the loss is read back, so the step has
finished on the device). A checkpoint's copy holds the history up to its step, so a run resumed from
it continues the record exactly where the checkpoint left it (from a checkpoint without one, the
record starts at its step).
"""
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.report import git_commit

HISTORY_FILE = "history.json"
STOPPED_BY = ("steps", "time_budget")


@dataclasses.dataclass
class TrainHistory:
    """One run's record (the module docstring's JSON); precision and tokens_per_step derive from train_config."""

    preset: Optional[str]
    train_config: Dict[str, object]  # model.train.TrainConfig as a dict
    parameters: int
    skipped_steps: int = 0
    steps: List[Dict[str, object]] = dataclasses.field(default_factory=list)
    validation: List[List[float]] = dataclasses.field(default_factory=list)  # [step, loss]
    sessions: List[Dict[str, object]] = dataclasses.field(default_factory=list)

    @property
    def precision(self) -> str:
        return self.train_config["precision"]

    @property
    def tokens_per_step(self) -> int:
        return self.train_config["batch_size"] * self.train_config["seq_len"]

    @property
    def last_step(self) -> int:
        return int(self.steps[-1]["step"]) if self.steps else 0

    def add_step(self, step: int, outputs: Dict[str, object], time_s: float) -> None:
        if self.steps and step != self.last_step + 1:
            raise ValueError(f"history: step {step} does not follow step {self.last_step}")
        self.steps.append({"step": step, **{k: outputs[k] for k in ("loss", "main", "mtp", "grad_norm",
                                                                       "load_spread", "skipped")},
                           "time_s": time_s})
        if self.sessions:
            self.sessions[-1]["last_step"] = step

    def add_validation(self, step: int, loss: float) -> None:
        self.validation.append([step, loss])

    def begin_session(self, first_step: int, device) -> None:
        """A process runs the run's steps from first_step on `device` (the first one, or a --resume)."""
        device = torch.device(device)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        self.sessions.append({"first_step": first_step, "last_step": first_step - 1, "stopped_by": None,
                              "wall_s": 0.0, "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                              "commit": git_commit()})

    def update_session(self, wall_s: float, stopped_by: Optional[str] = None) -> None:
        """The current session's wall time so far and, once it ends, why (STOPPED_BY); a copy written
        while it runs (a periodic checkpoint's) keeps stopped_by None."""
        if stopped_by is not None and stopped_by not in STOPPED_BY:
            raise ValueError(f"argument 'stopped_by': expected one of {STOPPED_BY}, got {stopped_by!r}")
        self.sessions[-1].update(wall_s=wall_s, stopped_by=stopped_by)

    def median_step_ms(self) -> float:
        """Median wall time of the steps, in ms (robust to the first step's warm-up and to evaluations)."""
        return 1e3 * statistics.median(float(s["time_s"]) for s in self.steps)

    def to_dict(self) -> dict:
        return {"preset": self.preset, "precision": self.precision, "tokens_per_step": self.tokens_per_step,
                **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainHistory":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def save(self, path: Path) -> None:
        """Writes the JSON file `path` (its folder made if needed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()) + "\n")


def load_history(path: Path) -> TrainHistory:
    """A run's history from its HISTORY_FILE, or from a folder (a run's --out-dir or a checkpoint) holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.exists():
        raise FileNotFoundError(f"no training history at {path} (model/train.py writes {HISTORY_FILE} into "
                                "--out-dir)")
    return TrainHistory.from_dict(json.loads(path.read_text()))
