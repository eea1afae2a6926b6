"""Pre-training DeepSeek-V3 on byte-level text: `python -m model.train --help`.

The objective of DeepSeek-V3: next-token cross-entropy plus MTP_WEIGHT times the MTP module's
cross-entropy on the token after next, plus the sequence-wise balance loss (alpha BALANCE_ALPHA).
Experts are balanced without an auxiliary loss: after each step every gate's
e_score_correction_bias moves by a fixed step toward equal load (no gradient).

Weights: fp32 master weights, AdamW, gradient clipping, linear warm-up then cosine decay.
--precision bf16: the math under bf16 autocast (PyTorch bf16 linears). --precision fp8: the same,
and every linear whose shape the FP8 training GEMMs take (K and N multiples of 128; not the head or
eh_proj, nor the embedding and the router, which are no Linear) quantizes its master weight per
128 x 128 block each call and runs deepseek_ops.fp8_linear, forward and backward in FP8
(deepseek_ops.linear_autograd); the routed experts run as two grouped FP8 linears
(MoE.experts_grouped_fp8_train), and so do the dense SwiGLU blocks (the dense layers' MLP and the
shared experts, as one group: MLP.forward_fp8_training), their SwiGLU and its backward fused into
the FP8 quantization. kv_b_proj stays in autocast's dtype: attention reads its weight directly, not
through Linear.forward.

Data-parallel through torch.distributed: `torchrun --nproc-per-node N -m model.train` (gloo on
CPU, nccl on CUDA) runs DDP; each rank takes its rows of the same global batch, so the losses
match one process's. A step whose loss or gradient is not finite is skipped with a warning and
counted. Checkpoints are HF-format folders (model.checkpoint.save_checkpoint; load_checkpoint reads
them) with the training state beside the weights (TRAINING_STATE_FILE): `--resume DIR` continues
the run from one (or from the latest in a run's --out-dir), bit for bit as if it had not stopped.
`--time-budget-s` stops a run cleanly after the step that ends past the budget (validation,
checkpoint and history written), so that a long run can go on in later, short commands. The run's
history (model.train_history: per-step losses and wall times, validation losses by step) goes to
--out-dir/history.json, continued across --resume.

The FP8-against-bf16 experiment (DeepSeek-V3's report: FP8 training loss within 0.25% of bf16), on
one H200 with the CUDA build: preset train-h200 (model/config.py, every linear but the head and
eh_proj in FP8), 16384 tokens a step, the same seed and data order for both runs:
    python -m model.train --preset train-h200 --precision bf16 --steps 2000 --batch-size 32 --seq-len 512 \\
        --lr 6e-4 --warmup-steps 100 --eval-every 100 --eval-batches 8 --time-budget-s 200 --out-dir runs/bf16
    python -m model.train --preset train-h200 --precision fp8 --steps 2000 --batch-size 32 --seq-len 512 \\
        --lr 6e-4 --warmup-steps 100 --eval-every 100 --eval-batches 8 --time-budget-s 200 --out-dir runs/fp8
Each command stops after about 200 s of training (plus the last step, the validation and the
checkpoint, a few seconds); the same command with `--resume runs/bf16` (`runs/fp8`) added continues
the run from its latest checkpoint, until --steps. Then
    python -m model.train_report runs/bf16 runs/fp8
plots both runs' training and validation curves, prints the validation losses at the last step
both runs evaluated and their relative difference, and writes the train_step benchmark records
(median step time, final validation loss) as benchmarks/results/<gpu>-<date>-<commit>-train_step.json.
"""
import argparse
import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from model.config import ModelArgs, preset
from model.data import Batches, load_tokens
from model.kernel_fallbacks import grouped_experts_fallback
from model.model import Gate, Linear, MoE, Transformer, random_model, use_batched_experts
from model.train_history import HISTORY_FILE, TrainHistory, load_history

MTP_WEIGHT = 0.3
BALANCE_ALPHA = 1e-4
BIAS_UPDATE_SPEED = 1e-3
PRECISIONS = ("bf16", "fp8")
# Linears kept in high precision, as in DeepSeek-V3's FP8 checkpoints.
HIGH_PRECISION_LINEARS = ("lm_head", "eh_proj")
TRAINING_STATE_FILE = "training_state.pt"  # beside the HF-format weights; the HF loader reads no other files
# TrainConfig fields a resumed run may change: none of them moves the weights or the losses.
RESUME_FREE_FIELDS = ("eval_every", "eval_batches", "save_every", "out_dir", "time_budget_s")


@dataclasses.dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8  # global, in sequences
    seq_len: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "bf16"
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 0  # 0: only at the end (when out_dir is set)
    out_dir: Optional[str] = None
    max_files: Optional[int] = None  # the first N files of each split (tests, quick runs)
    time_budget_s: Optional[float] = None  # stop after the step that ends past this many seconds (see train)


# ---- the objective ------------------------------------------------------------------------------

def objective(logits: torch.Tensor, targets: torch.Tensor, mtp_logits: Optional[torch.Tensor],
              mtp_targets: Optional[torch.Tensor], mtp_weight: float = MTP_WEIGHT):
    """(loss, next-token CE, MTP CE): CE(logits [B, S, V], targets [B, S]) + mtp_weight * CE of the
    MTP logits against the tokens after next (MTP CE is 0 without an MTP module)."""
    next_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    if mtp_logits is None:
        return next_token, next_token, torch.zeros_like(next_token)
    mtp = F.cross_entropy(mtp_logits.flatten(0, 1).float(), mtp_targets.flatten())
    return next_token + mtp_weight * mtp, next_token, mtp


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float = BALANCE_ALPHA) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over sequences: alpha * sum_i f_i * P_i with
    f_i = E / (K * S) * (tokens of the sequence routed to expert i), P_i = mean over the sequence of
    expert i's affinity normalized over all experts. scores [B, S, E] (sigmoid), indices [B, S, K]."""
    b, s, e = scores.shape
    k = indices.shape[-1]
    counts = torch.zeros(b, e, device=scores.device).scatter_add_(
        1, indices.reshape(b, s * k), torch.ones(b, s * k, device=scores.device))  # [B, E]
    f = counts * (e / (k * s))
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
    return alpha * (f * p).sum(-1).mean()


@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, load: torch.Tensor, speed: float = BIAS_UPDATE_SPEED) -> None:
    """Auxiliary-loss-free balancing: bias += speed * sign(mean load - load) (overloaded experts
    down, underloaded up, balanced ones unchanged). load [E]: tokens routed to each expert."""
    load = load.float()
    bias += speed * torch.sign(load.mean() - load)


class RouterStats:
    """Watches every Gate during a step: routed-token counts per expert (for the bias update and
    the load spread) and the sequence-wise balance loss of each call (with its gradient)."""

    def __init__(self, model: Transformer):
        self.gates: List[Gate] = [m for m in model.modules() if isinstance(m, Gate)]
        self.batch_shape = None  # (B, S) of the tokens the gates see, set by the step
        self.reset()
        for gate in self.gates:
            gate.register_forward_hook(self._hook)

    def reset(self):
        self.loads: Dict[int, torch.Tensor] = {}
        self.balance: List[torch.Tensor] = []

    def _hook(self, gate: Gate, inputs, output):
        if not torch.is_grad_enabled():
            return
        x, = inputs
        _, indices = output  # [N, K]
        e = gate.weight.shape[0]
        load = torch.bincount(indices.flatten(), minlength=e).float()
        self.loads[id(gate)] = self.loads.get(id(gate), 0) + load
        b, s = self.batch_shape
        scores = F.linear(x.float(), gate.weight.float()).sigmoid()  # as Gate.forward computes them
        self.balance.append(sequence_balance_loss(scores.view(b, s, e), indices.view(b, s, -1)))

    def update_biases(self, group=None) -> float:
        """Applies the bias update to every gate (loads summed over data-parallel ranks); returns
        the load spread, max over gates of (max load - min load) / mean load."""
        spread = 0.0
        for gate in self.gates:
            load = self.loads.get(id(gate))
            if load is None:
                continue
            if dist.is_initialized():
                dist.all_reduce(load, group=group)
            update_expert_bias(gate.e_score_correction_bias.data, load)
            spread = max(spread, float((load.max() - load.min()) / load.mean().clamp(min=1)))
        return spread


class TrainStep(nn.Module):
    """The loss of one batch [B, S + 2] (the module DDP wraps): its forward runs the model and MTP."""

    def __init__(self, model: Transformer, stats: RouterStats):
        super().__init__()
        self.model, self.stats = model, stats

    def forward(self, batch: torch.Tensor):
        inputs, targets, mtp_targets = batch[:, :-2], batch[:, 1:-1], batch[:, 2:]  # [B, S] each
        self.stats.batch_shape = inputs.shape
        logits, hidden = self.model(inputs)
        mtp_logits = self.model.forward_mtp(hidden, targets)[0] if self.model.mtp is not None else None
        loss, main, mtp = objective(logits, targets, mtp_logits, mtp_targets)
        balance = torch.stack(self.stats.balance).sum() if self.stats.balance else torch.zeros_like(loss)
        return loss + balance, main.detach(), mtp.detach()


# ---- model and optimizer ------------------------------------------------------------------------

def fp8_training_modules(model: Transformer) -> List[nn.Module]:
    """What --precision fp8 runs in FP8: every Linear whose shape the FP8 training GEMMs take (K and N
    multiples of 128) but HIGH_PRECISION_LINEARS, and every MoE whose routed experts can run as
    grouped FP8 linears (local experts, shapes the grouped GEMMs take). Each has an fp8_training flag."""
    modules = []
    for name, module in model.named_modules():
        if (isinstance(module, Linear) and not name.endswith(HIGH_PRECISION_LINEARS)
                and module.in_features % 128 == 0 and module.out_features % 128 == 0):
            modules.append(module)
        elif isinstance(module, MoE) and module.ep_group is None and grouped_experts_fallback(model.args) is None:
            modules.append(module)
    return modules


def training_model(args: ModelArgs, precision: str, device, seed: Optional[int]) -> Transformer:
    """A random model with fp32 master weights, every parameter trainable except the expert biases
    (zero, updated by update_expert_bias); --precision fp8 routes fp8_training_modules through FP8.
    seed None: initialized on the device (fast for large models; not reproducible across devices)."""
    if precision not in PRECISIONS:
        raise ValueError(f"argument 'precision': expected one of {PRECISIONS}, got {precision!r}")
    if args.fp8 or args.dtype != "float32":
        raise ValueError(f"training keeps fp32 master weights: expected ModelArgs(dtype='float32', fp8=False), "
                         f"got dtype={args.dtype!r}, fp8={args.fp8}")
    model = random_model(args, attn_impl="sdpa", device=device, seed=seed)
    for name, param in model.named_parameters():
        param.requires_grad_(not name.endswith("e_score_correction_bias"))
        if name.endswith("e_score_correction_bias"):
            param.data.zero_()
    if precision == "bf16":
        use_batched_experts(model)  # float experts in a few launches and one sync per MoE layer
    if precision == "fp8":
        for module in fp8_training_modules(model):
            module.fp8_training = True
    return model


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1 over warmup_steps, then cosine down to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Trainer:
    """One process's share of a (possibly data-parallel) run."""

    def __init__(self, args: ModelArgs, cfg: TrainConfig, device="cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.model = training_model(args, cfg.precision, self.device, cfg.seed)
        self.stats = RouterStats(self.model)
        step_module = TrainStep(self.model, self.stats)
        if self.world_size > 1:
            # Experts that get no token in a step have no gradient: DDP must look for unused parameters.
            step_module = nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True)
        self.step_module = step_module
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.skipped_steps = 0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any data-parallel rank (every rank must take the same branch)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def step(self, batch: torch.Tensor) -> Dict[str, float]:
        """One optimizer step on this rank's rows [B / world, S + 2]; returns the global losses."""
        self.model.train()
        self.stats.reset()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss, main, mtp = self.step_module(batch.to(self.device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        loss, main, mtp = self._mean(loss), self._mean(main), self._mean(mtp)
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        spread = float("nan")
        if finite:
            self.optimizer.step()
            spread = self.stats.update_biases()
        else:
            self.skipped_steps += 1
            warnings.warn(f"step {self.scheduler.last_epoch}: non-finite loss {float(loss)} or gradient norm "
                          f"{float(grad_norm)}: step skipped ({self.skipped_steps} so far)", stacklevel=2)
        self.scheduler.step()
        return {"loss": float(loss), "main": float(main), "mtp": float(mtp), "grad_norm": float(grad_norm),
                "load_spread": spread, "skipped": not finite}

    @torch.no_grad()
    def evaluate(self, batches: Batches) -> float:
        """Mean next-token cross-entropy over cfg.eval_batches fixed validation batches."""
        self.model.eval()
        losses = []
        for i in range(self.cfg.eval_batches):
            batch = batches.local_batch(i, self.rank, self.world_size).to(self.device)
            with self._autocast():
                logits, _ = self.model(batch[:, :-2])
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:-1].flatten()))
        return float(self._mean(torch.stack(losses).mean()))

    @property
    def steps_done(self) -> int:
        """Steps taken (skipped ones included), which is also the index of the next batch."""
        return self.scheduler.last_epoch

    def save(self, path: Path) -> None:
        """The HF-format checkpoint plus TRAINING_STATE_FILE beside it: everything else the next step
        depends on. The batches need only the step: Batches draws each from (seed, step) alone."""
        if self.rank != 0:
            return
        save_checkpoint(self.model, path)
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save({"train_config": dataclasses.asdict(self.cfg), "step": self.steps_done,
                    "skipped_steps": self.skipped_steps, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "rng": rng}, Path(path) / TRAINING_STATE_FILE)

    def load(self, path: Path) -> None:
        """Continues the run save() wrote to `path`: its weights (the expert biases among them), the
        optimizer and schedule, the step and the RNG. The model config and every TrainConfig field
        but RESUME_FREE_FIELDS must be this trainer's; any mismatch raises before anything changes."""
        path = Path(path)
        state_file = path / TRAINING_STATE_FILE
        if not state_file.exists():
            raise CheckpointError(f"resume from {path}: no {TRAINING_STATE_FILE}; the folder holds no training "
                                  "state (Trainer.save writes it beside the weights)")
        args, saved_args = self.model.args, read_config(path)
        differ = [f"{f.name}: checkpoint {getattr(saved_args, f.name)!r}, this run {getattr(args, f.name)!r}"
                  for f in dataclasses.fields(ModelArgs) if getattr(saved_args, f.name) != getattr(args, f.name)]
        if differ:
            raise CheckpointError(f"resume from {path}: the model config differs: {'; '.join(differ)}")
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        ours = dataclasses.asdict(self.cfg)
        differ = [f"{name}: checkpoint {value!r}, this run {ours.get(name)!r}"
                  for name, value in state["train_config"].items()
                  if name not in RESUME_FREE_FIELDS and value != ours.get(name)]
        if differ:
            raise CheckpointError(f"resume from {path}: the training config differs: {'; '.join(differ)} "
                                  f"(only {', '.join(RESUME_FREE_FIELDS)} may change on resume)")
        loaded = load_checkpoint(path, args=args, device=self.device, mtp=bool(args.num_nextn_predict_layers))
        # Into the trainer's own parameters: the optimizer and DDP hold these tensors.
        self.model.load_state_dict(loaded.state_dict())
        self.model.prepare()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = state["skipped_steps"]
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        assert self.steps_done == state["step"], (self.steps_done, state["step"])


def latest_checkpoint(path: Path) -> Path:
    """`path` itself if it holds a training state, else its step-N folder with the largest N that does
    (a run's --out-dir); else `path` (Trainer.load then says what is missing)."""
    path = Path(path)
    if (path / TRAINING_STATE_FILE).exists():
        return path
    steps = [(int(p.name[len("step-"):]), p) for p in path.glob("step-*")
             if p.name[len("step-"):].isdigit() and (p / TRAINING_STATE_FILE).exists()]
    return max(steps)[1] if steps else path


def _resumed_history(checkpoint: Path, step: int, fresh: TrainHistory) -> TrainHistory:
    """The history saved beside the checkpoint (up to its step), or `fresh` when there is none."""
    if not (checkpoint / HISTORY_FILE).exists():
        warnings.warn(f"resume from {checkpoint}: no {HISTORY_FILE}; the history starts at step {step + 1}",
                      stacklevel=3)
        return fresh
    history = load_history(checkpoint)
    if history.last_step != step:
        raise CheckpointError(f"resume from {checkpoint}: its {HISTORY_FILE} ends at step {history.last_step}, "
                              f"the training state at step {step}")
    return history


def train(args: ModelArgs, cfg: TrainConfig, device="cpu", progress: bool = True,
          resume: Optional[Path] = None, preset_name: Optional[str] = None) -> TrainHistory:
    """Runs cfg.steps steps, or with `resume` (a checkpoint folder Trainer.save wrote, or a run's
    --out-dir: its latest checkpoint) the steps after the checkpoint's; returns the run's history
    (model.train_history: every step since step 1, resumed sessions included).

    cfg.time_budget_s: the run stops after the first step that ends that many seconds after train()
    began (model building and data loading count), then evaluates (if eval_every), saves a
    checkpoint (if out_dir) and writes the history, so that --resume continues it; leave room for
    that last step, the evaluation and the save. With out_dir, the history is written to
    out_dir/HISTORY_FILE at every evaluation and save (the last step always saves), and beside each
    checkpoint.
    """
    started = time.perf_counter()
    deadline = None if cfg.time_budget_s is None else started + cfg.time_budget_s
    trainer = Trainer(args, cfg, device)
    history = TrainHistory(preset_name, dataclasses.asdict(cfg), sum(p.numel() for p in trainer.model.parameters()))
    if resume is not None:
        resume = latest_checkpoint(resume)
        trainer.load(resume)
        if trainer.steps_done >= cfg.steps:
            raise ValueError(f"resume from {resume}: the checkpoint is at step {trainer.steps_done} of "
                             f"{cfg.steps}: no step left to run")
        history = _resumed_history(resume, trainer.steps_done, history)
    train_batches = Batches(load_tokens("train", cfg.max_files), cfg.batch_size, cfg.seq_len, cfg.seed)
    val_batches = Batches(load_tokens("validation", cfg.max_files), cfg.batch_size, cfg.seq_len, cfg.seed + 1)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    history.begin_session(trainer.steps_done + 1, trainer.device)

    def write_history(folder: Path, stopped_by: Optional[str] = None):
        if trainer.rank == 0:
            history.update_session(time.perf_counter() - started, stopped_by)
            history.save(folder / HISTORY_FILE)

    bar = tqdm(range(trainer.steps_done, cfg.steps), initial=trainer.steps_done, total=cfg.steps,
               disable=not progress or trainer.rank != 0, dynamic_ncols=True)
    stopped_by = None
    for step in bar:
        start = time.perf_counter()
        out = trainer.step(train_batches.local_batch(step, trainer.rank, trainer.world_size))
        step_s = time.perf_counter() - start
        history.add_step(step + 1, out, step_s)
        history.skipped_steps = trainer.skipped_steps
        bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{cfg.batch_size * cfg.seq_len / step_s:.0f}",
                        load_spread=f"{out['load_spread']:.2f}")
        if step + 1 == cfg.steps:
            stopped_by = "steps"
        elif deadline is not None and trainer.any_rank(time.perf_counter() >= deadline):
            stopped_by = "time_budget"
        evaluate = bool(cfg.eval_every) and ((step + 1) % cfg.eval_every == 0 or stopped_by is not None)
        if evaluate:
            history.add_validation(step + 1, trainer.evaluate(val_batches))
            bar.write(f"step {step + 1}: validation loss {history.validation[-1][1]:.4f}")
        save = out_dir is not None and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or stopped_by is not None)
        if save:
            checkpoint = out_dir / f"step-{step + 1}"
            trainer.save(checkpoint)
            write_history(checkpoint, stopped_by)
        if out_dir is not None and (evaluate or save):
            write_history(out_dir, stopped_by)
        if stopped_by is not None:
            break
    bar.close()
    if stopped_by == "time_budget" and trainer.rank == 0:
        print(f"time budget of {cfg.time_budget_s:g} s reached after step {history.last_step} of {cfg.steps}"
              + (f"; continue with --resume {cfg.out_dir}" if cfg.out_dir else ""), flush=True)
    history.update_session(time.perf_counter() - started, stopped_by)
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TrainConfig()
    parser.add_argument("--preset", default="tiny", help="model.config preset (weights made fp32 masters)")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for field in ("steps", "batch_size", "seq_len", "warmup_steps", "seed", "eval_every", "eval_batches",
                  "save_every", "max_files"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    for field in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "time_budget_s"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=float, default=getattr(defaults, field))
    parser.add_argument("--out-dir", default=None, help=f"HF-format checkpoints go to OUT_DIR/step-N, the "
                        f"history to OUT_DIR/{HISTORY_FILE}")
    parser.add_argument("--resume", default=None, help="continue from a checkpoint folder (OUT_DIR/step-N), or "
                        "the latest one of OUT_DIR, of a run with the same options (evaluation, saving and "
                        "the time budget may differ)")
    opts = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(TrainConfig)
                         if hasattr(opts, f.name)})
    device = opts.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    args = preset(opts.preset, dtype="float32", fp8=False)
    history = train(args, cfg, device, resume=opts.resume, preset_name=opts.preset)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"step {history.last_step} of {cfg.steps}: final loss {history.steps[-1]['loss']:.4f}; skipped steps "
              f"{history.skipped_steps}; validation "
              f"{history.validation[-1][1] if history.validation else float('nan'):.4f}; median step "
              f"{history.median_step_ms():.1f} ms")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
