"""GRPO (Group Relative Policy Optimization) on our DeepSeek-V3: `python -m model.grpo`.

One step: sample P arithmetic problems; draw G answers for each with the sampler (model/generate.py:
batched prefill, paged latent cache, seeded temperature sampling on the device; decoding stops once
every answer has its eos); reward them (model/arithmetic_task.py);
advantages are the rewards' z-scores within each group; then `inner_steps` AdamW steps on the
clipped-ratio objective with a k3 KL penalty to the frozen reference (model/grpo_loss.py), with
gradient clipping; finally the sampler takes the new weights. A step whose loss or gradient norm
is not finite is skipped and counted.

The run: a random policy of the preset is trained supervised (model/grpo_warmup.py) until its
held-out greedy accuracy reaches --warmup-target, saved (HF format) to OUT/start, and loaded again
as the frozen reference; or --init CHECKPOINT gives both. Then GRPO. Written to OUT: grpo_log.jsonl
(one line a step: mean reward, accuracy, KL (mean and largest token), clip fraction, the largest
policy-sampler log-prob gap, response length, rollout tokens/s, held-out accuracy every --eval-every
steps), grpo_curves.png, summary.json, policy/ (the final checkpoint). Layout:
model/arithmetic_task.py (task, reward), model/grpo_rollout.py (sampling, log-probs, weight sync),
model/grpo_loss.py (the objective), model/grpo_warmup.py (starting policy).

CPU (reference backend, the tiny preset): the whole pipeline runs, but 2 cores learn arithmetic
slowly (1-2 digit additions need hundreds of warm-up steps), hence an easy task and a low target:
    python -m model.grpo --out /tmp/grpo-cpu --ops + --min-digits 1 --max-digits 2 \\
        --warmup-target 0.05 --steps 20 --eval-size 200
The H200 experiment (policy trains in fp32 on the reference backend; rollouts and evaluation run the
kernels backend with FP8 linears, refreshed from the policy after every step, the prefill and decode
steps replayed from CUDA graphs), within one device command's time:
    python -m model.grpo --preset grpo-h200 --device cuda --rollout-backend kernels --rollout-fp8 \\
        --ops + --min-digits 2 --max-digits 3 --warmup-batch 512 --warmup-eval-every 50 --lr 3e-5 \\
        --out runs/grpo-h200 --steps 5000 --prompts-per-step 64 --group-size 8 --eval-every 10 \\
        --eval-size 500 --time-budget-s 519
--warmup-batch 512: the warm-up reaches its 15% target in about a minute on an H100, where batch 64
took 190 s to reach 3.8%; GRPO at lr 3e-5 ended higher than at 1e-4 (benchmarks/RESULTS.md).
The rollout throughput against transformers' generate (record grpo_rollout):
    python -m benchmarks --only grpo_rollout
"""
import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from model.arithmetic_task import ArithmeticTask, Problem
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.grpo_loss import AGGREGATIONS, SEQ_MEAN_TOKEN_MEAN, group_advantages, grpo_loss
from model.grpo_rollout import RewardFn, Rollout, build_sampler, greedy_accuracy, rollout, sync_weights, token_logprobs
from model.grpo_warmup import WarmupConfig, supervised_warmup, trainable_parameters
from model.model import Transformer, random_model, use_batched_experts


@dataclasses.dataclass
class GRPOConfig:
    steps: int = 100
    prompts_per_step: int = 16  # P
    group_size: int = 8  # G
    inner_steps: int = 2  # optimisation steps per rollout batch
    clip_eps: float = 0.2
    beta: float = 0.04  # KL weight (DeepSeekMath's value)
    aggregation: str = SEQ_MEAN_TOKEN_MEAN
    lr: float = 1e-5
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    eval_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"GRPOConfig.aggregation = {self.aggregation!r}: expected one of {AGGREGATIONS}")
        for name in ("steps", "prompts_per_step", "inner_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} = {getattr(self, name)}: expected >= 1")
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size = {self.group_size}: expected >= 2 (a group-relative advantage)")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"GRPOConfig.clip_eps = {self.clip_eps}: expected in (0, 1)")
        if self.beta < 0 or self.temperature <= 0:
            raise ValueError(f"GRPOConfig: expected beta >= 0 and temperature > 0, got beta={self.beta}, "
                             f"temperature={self.temperature}")


def update_policy(policy: Transformer, optimizer: torch.optim.Optimizer, params, batch: Rollout,
                  advantages: torch.Tensor, ref_logp: torch.Tensor, cfg: GRPOConfig,
                  sampler_logp: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """cfg.inner_steps optimisation steps on one rollout batch; advantages [N], ref_logp [N, L - 1].
    Returns the means over the applied steps (kl_max: the largest), `skipped_steps` (non-finite loss or
    gradient norm), and with sampler_logp [N, L - 1] (the sampler's own log-probs of the batch)
    `sampler_gap`: the largest |log p_policy - log p_sampler| over the response tokens, in nats. The
    objective takes the policy's log-probs as those of the policy that sampled; an FP8 sampler draws
    from a slightly different distribution, and this is how far apart they came on this batch."""
    old_logp = None  # the policy that sampled: the first inner step's, before any update
    applied: List[Dict[str, float]] = []
    skipped = 0
    extra: Dict[str, float] = {}
    for _ in range(cfg.inner_steps):
        logp = token_logprobs(policy, batch.tokens, cfg.temperature)
        if old_logp is None:
            old_logp = logp.detach()
            if sampler_logp is not None:
                extra["sampler_gap"] = (old_logp - sampler_logp).abs().masked_fill(~batch.mask, 0.0).max().item()
        loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, batch.mask, cfg.clip_eps, cfg.beta,
                                cfg.aggregation)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            skipped += 1
            continue
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        optimizer.step()
        applied.append({"loss": loss.item(), "grad_norm": grad_norm.item(), **stats})
    means = {k: sum(a[k] for a in applied) / len(applied) for k in applied[0]} if applied else {}
    if applied:
        means["kl_max"] = max(a["kl_max"] for a in applied)
    return {**means, **extra, "skipped_steps": skipped}


def run_grpo(policy: Transformer, reference: Transformer, sampler: Transformer, task: ArithmeticTask,
             held_out: List[Problem], cfg: GRPOConfig, log: Optional[Callable[[Dict], None]] = None,
             progress: bool = True, reward_fn: Optional[RewardFn] = None,
             deadline: Optional[float] = None) -> List[Dict[str, float]]:
    """Trains the policy in place (the sampler follows it). Returns one record per step.
    reward_fn: (problem, response token ids) -> float; default the task's reward.
    deadline: a time.monotonic() value; the step that ends past it is the last, and is evaluated."""
    params = trainable_parameters(policy)
    for p in reference.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng, exclude = random.Random(cfg.seed), frozenset(held_out)
    history: List[Dict[str, float]] = []
    totals = {"reward_failures": 0, "skipped_steps": 0}
    bar = ProgressBar(cfg.steps, progress)
    for step in range(1, cfg.steps + 1):
        problems = task.sample(cfg.prompts_per_step, rng, exclude)
        seed = cfg.seed * 1_000_003 + step  # each step's samples reproducible on their own
        batch = rollout(sampler, task, problems, cfg.group_size, cfg.temperature, seed, reward_fn)
        advantages = group_advantages(batch.rewards.view(-1, cfg.group_size)).flatten()  # [N]
        with torch.no_grad():
            ref_logp = token_logprobs(reference, batch.tokens, cfg.temperature)
            sampler_logp = token_logprobs(sampler, batch.tokens, cfg.temperature)
        stats = update_policy(policy, optimizer, params, batch, advantages, ref_logp, cfg, sampler_logp)
        sync_weights(policy, sampler)
        totals["reward_failures"] += batch.reward_failures
        totals["skipped_steps"] += stats.pop("skipped_steps")
        record = {"step": step, "reward": batch.rewards.mean().item(), "accuracy": batch.correct.float().mean().item(),
                  **stats, "response_len": sum(map(len, batch.responses)) / len(batch.responses),
                  "rollout_tokens_per_s": batch.tokens_per_s, **totals}
        last = step == cfg.steps or (deadline is not None and time.monotonic() > deadline)
        if step % cfg.eval_every == 0 or last:
            record["heldout_acc"] = greedy_accuracy(sampler, task, held_out)
        history.append(record)
        if log is not None:
            log(record)
        bar.update(record)
        if last:
            break
    bar.close()
    return history


class ProgressBar:
    """tqdm over the steps with the step's numbers, or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, desc="grpo", file=sys.stderr)

    def update(self, record: Dict[str, float]) -> None:
        if self.bar is None:
            return
        shown = {k: record[k] for k in ("reward", "accuracy", "kl", "clip_frac", "heldout_acc") if k in record}
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_history(history: List[Dict[str, float]], path: Path, start_accuracy: Optional[float] = None) -> None:
    """The curves of a run, one panel each, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    panels = [("reward", "mean reward"), ("accuracy", "rollout accuracy"), ("heldout_acc", "held-out greedy accuracy"),
              ("kl", "KL to reference (k3)"), ("clip_frac", "clip fraction"), ("response_len", "response tokens")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in history if key in r]
        if key == "heldout_acc" and start_accuracy is not None:
            points = [(0, start_accuracy)] + points
        if points:
            ax.plot(*zip(*points), marker="o" if key == "heldout_acc" else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_xlim(0, max(steps))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for checkpoints, log, plot, summary")
    p.add_argument("--preset", default="tiny", help="model preset (grpo-h200 on the H200)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--policy-dtype", default="float32", help="dtype of the trained weights")
    p.add_argument("--rollout-backend", default="reference", choices=("reference", "kernels"))
    p.add_argument("--rollout-fp8", action="store_true", help="sampler linears in FP8 (the kernels' format)")
    p.add_argument("--rollout-dtype", default=None, help="sampler float dtype (default: bfloat16 with "
                   "--rollout-backend kernels, else the policy's)")
    p.add_argument("--init", type=Path, help="starting policy checkpoint (skips the warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="wall-clock budget of the whole run: the warm-up or GRPO step that ends past it is "
                        "the last (evaluated, saved, plotted as at the end)")
    task = p.add_argument_group("task")
    task.add_argument("--min-digits", type=int, default=2)
    task.add_argument("--max-digits", type=int, default=4)
    task.add_argument("--ops", default="+*")
    task.add_argument("--eval-size", type=int, default=500)
    task.add_argument("--eval-seed", type=int, default=12345)
    warm = p.add_argument_group("supervised warm-up")
    warm.add_argument("--warmup-lr", type=float, default=WarmupConfig.lr)
    warm.add_argument("--warmup-batch", type=int, default=WarmupConfig.batch_size)
    warm.add_argument("--warmup-max-steps", type=int, default=WarmupConfig.max_steps)
    warm.add_argument("--warmup-eval-every", type=int, default=WarmupConfig.eval_every)
    warm.add_argument("--warmup-target", type=float, default=WarmupConfig.target_accuracy,
                      help="stop once held-out greedy accuracy reaches this")
    grpo = p.add_argument_group("GRPO")
    grpo.add_argument("--steps", type=int, default=GRPOConfig.steps)
    grpo.add_argument("--prompts-per-step", type=int, default=GRPOConfig.prompts_per_step)
    grpo.add_argument("--group-size", type=int, default=GRPOConfig.group_size)
    grpo.add_argument("--inner-steps", type=int, default=GRPOConfig.inner_steps)
    grpo.add_argument("--clip-eps", type=float, default=GRPOConfig.clip_eps)
    grpo.add_argument("--beta", type=float, default=GRPOConfig.beta)
    grpo.add_argument("--aggregation", default=GRPOConfig.aggregation, choices=AGGREGATIONS)
    grpo.add_argument("--lr", type=float, default=GRPOConfig.lr)
    grpo.add_argument("--max-grad-norm", type=float, default=GRPOConfig.max_grad_norm)
    grpo.add_argument("--temperature", type=float, default=GRPOConfig.temperature)
    grpo.add_argument("--eval-every", type=int, default=GRPOConfig.eval_every)
    return p


def main(argv=None) -> None:
    opts = _parser().parse_args(argv)
    deadline = None if opts.time_budget_s is None else time.monotonic() + opts.time_budget_s
    torch.manual_seed(opts.seed)
    out: Path = opts.out
    out.mkdir(parents=True, exist_ok=True)
    if opts.init is not None:
        start = opts.init
        policy = load_checkpoint(start, "reference", device=opts.device, dtype=opts.policy_dtype).dequantize_()
    else:
        args = preset(opts.preset, num_nextn_predict_layers=0, fp8=False, dtype=opts.policy_dtype)
        policy = random_model(args, "reference", device=opts.device, seed=opts.seed)
    use_batched_experts(policy)  # the warm-up and GRPO train it: few launches and syncs per MoE layer
    task = ArithmeticTask(policy.args.bos_token_id, policy.args.eos_token_id, opts.min_digits, opts.max_digits,
                          opts.ops)
    held_out = task.held_out(opts.eval_size, opts.eval_seed)
    rollout_dtype = opts.rollout_dtype or ("bfloat16" if opts.rollout_backend == "kernels" else opts.policy_dtype)
    sampler = build_sampler(policy, opts.rollout_backend, opts.rollout_fp8, rollout_dtype)
    summary: Dict[str, object] = {"options": {k: str(v) for k, v in vars(opts).items()}}
    if opts.init is None:
        warm = WarmupConfig(opts.warmup_lr, opts.warmup_batch, opts.warmup_max_steps, opts.warmup_eval_every,
                            opts.warmup_target, seed=opts.seed)
        _, summary["warmup"] = supervised_warmup(policy, sampler, task, held_out, warm, deadline=deadline)
        start = out / "start"
        save_checkpoint(policy, start)
    reference = use_batched_experts(load_checkpoint(start, "reference", device=opts.device,
                                                    dtype=opts.policy_dtype).dequantize_())
    start_accuracy = greedy_accuracy(sync_weights(policy, sampler), task, held_out)
    print(f"starting policy: held-out greedy accuracy {start_accuracy:.3f} ({len(held_out)} problems)")

    cfg = GRPOConfig(opts.steps, opts.prompts_per_step, opts.group_size, opts.inner_steps, opts.clip_eps, opts.beta,
                     opts.aggregation, opts.lr, opts.max_grad_norm, opts.temperature, opts.eval_every, opts.seed)
    with open(out / "grpo_log.jsonl", "w") as log_file:
        def log(record: Dict) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                       file=sys.stderr)

        history = run_grpo(policy, reference, sampler, task, held_out, cfg, log, deadline=deadline)
    save_checkpoint(policy, out / "policy")
    plot_history(history, out / "grpo_curves.png", start_accuracy)
    final_accuracy = history[-1]["heldout_acc"]
    rates = [r["rollout_tokens_per_s"] for r in history[1:]] or [history[0]["rollout_tokens_per_s"]]
    summary.update(start_heldout_acc=start_accuracy, final_heldout_acc=final_accuracy,
                   best_heldout_acc=max(r["heldout_acc"] for r in history if "heldout_acc" in r),
                   rollout_tokens_per_s_median=sorted(rates)[len(rates) // 2],
                   reward_failures=history[-1]["reward_failures"], skipped_steps=history[-1]["skipped_steps"],
                   device=torch.cuda.get_device_name() if opts.device.startswith("cuda") else "cpu")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"held-out greedy accuracy {start_accuracy:.3f} -> {final_accuracy:.3f}; rollout "
          f"{summary['rollout_tokens_per_s_median']:.0f} tokens/s (median, first step excluded); "
          f"{summary['reward_failures']} reward failures, {summary['skipped_steps']} skipped steps; "
          f"curves in {out / 'grpo_curves.png'}")


if __name__ == "__main__":
    main()
