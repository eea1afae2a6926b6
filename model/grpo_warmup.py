"""GRPO's starting policy: brief supervised training on the arithmetic task.

Next-token cross-entropy on the response tokens only (answer + eos; the prompt is context), plain
PyTorch AdamW on the reference backend, until the held-out greedy accuracy reaches a target that
leaves room for reinforcement learning to show (e.g. 15%), or max_steps. A policy that never
starts right gets no reward signal in its groups; one that is already right has nothing to learn.
"""
import dataclasses
import random
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from model.arithmetic_task import ArithmeticTask, Problem
from model.grpo_rollout import greedy_accuracy, pack_sequences, sync_weights, token_logprobs
from model.model import Transformer


@dataclasses.dataclass
class WarmupConfig:
    lr: float = 1e-3
    batch_size: int = 64
    max_steps: int = 3000
    eval_every: int = 100
    target_accuracy: float = 0.15
    max_grad_norm: float = 1.0
    seed: int = 0


def trainable_parameters(model: Transformer) -> List[nn.Parameter]:
    """Turns on gradients for every float weight, except the routers' e_score_correction_bias (it
    steers expert choice only, through a top-k: no gradient reaches it), and returns them."""
    params = []
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point and not name.endswith("e_score_correction_bias"):
            params.append(p.requires_grad_(True))
    return params


def supervised_warmup(policy: Transformer, sampler: Transformer, task: ArithmeticTask, held_out: List[Problem],
                      cfg: WarmupConfig, log: Callable[[str], None] = print,
                      deadline: Optional[float] = None) -> Tuple[float, List[Dict[str, float]]]:
    """Trains the policy in place; returns the last held-out greedy accuracy (of the sampler, synced
    from the policy) and the evaluation history. deadline: a time.monotonic() value; the step that
    ends past it is the last, and is evaluated."""
    params = trainable_parameters(policy)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng, exclude = random.Random(cfg.seed), frozenset(held_out)
    device = policy.model.embed_tokens.weight.device
    history: List[Dict[str, float]] = []
    accuracy, losses, skipped = 0.0, [], 0
    for step in range(1, cfg.max_steps + 1):
        problems = task.sample(cfg.batch_size, rng, exclude)
        tokens, mask = pack_sequences([task.encode_prompt(p) for p in problems],
                                      [task.encode_answer(p) for p in problems], device)
        logp = token_logprobs(policy, tokens)  # [N, L - 1]
        loss = -(logp * mask).sum() / mask.sum()
        if not torch.isfinite(loss):
            skipped += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        out_of_time = deadline is not None and time.monotonic() > deadline
        if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
            accuracy = greedy_accuracy(sync_weights(policy, sampler), task, held_out)
            history.append({"step": step, "loss": sum(losses) / len(losses), "heldout_acc": accuracy,
                            "skipped_steps": skipped})
            log(f"warm-up step {step:5d}  loss {history[-1]['loss']:.4f}  held-out greedy accuracy {accuracy:.3f}")
            losses = []
            if accuracy >= cfg.target_accuracy:
                return accuracy, history
            if out_of_time:
                log(f"warm-up: out of time at step {step}, below the target accuracy {cfg.target_accuracy}")
                return accuracy, history
    log(f"warm-up: max_steps {cfg.max_steps} reached below the target accuracy {cfg.target_accuracy}")
    return accuracy, history
