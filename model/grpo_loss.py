"""GRPO's objective, as plain tensor math (no model): advantages, clipped ratio, k3 KL, averaging.

Shapes: P prompts, G samples per prompt (a group), N = P * G sequences, L token positions.
Per-token tensors are [N, L] with a mask [N, L] (True on response tokens).

    advantage  A_i = (r_i - mean(r_group)) / std(r_group)  (unbiased std; 0 where the group's
               rewards are all equal: such a group carries no preference, only the KL term)
    ratio      rho_t = exp(logp_t - logp_old_t)
    policy     l_t = max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps))   (PPO's clipped surrogate)
    KL (k3)    kl_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1: an unbiased, always
               non-negative estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020), the
               estimator DeepSeekMath's GRPO uses
    loss       aggregate(l_t + beta kl_t)

Averaging over tokens, named as in the literature (and verl's loss_agg_mode):
    "seq-mean-token-mean"  GRPO (Shao et al. 2024): each sequence's mean over its tokens, then the
                           mean over sequences (a short answer's tokens weigh more)
    "token-mean"           DAPO (Yu et al. 2025): the mean over every response token of the batch
"""
from typing import Dict, Tuple

import torch

SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
TOKEN_MEAN = "token-mean"
AGGREGATIONS = (SEQ_MEAN_TOKEN_MEAN, TOKEN_MEAN)
ZERO_STD = 1e-6  # a group whose reward std is below this has all-equal rewards: advantage 0


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: each reward's z-score within its group."""
    if rewards.dim() != 2:
        raise ValueError(f"argument 'rewards': expected [prompts, group_size], got shape {tuple(rewards.shape)}")
    num_prompts, group_size = rewards.shape
    if num_prompts == 0 or group_size == 0:
        raise ValueError(f"argument 'rewards': empty group (shape {tuple(rewards.shape)}): every prompt needs "
                         "a group of samples")
    if group_size < 2:
        raise ValueError(f"argument 'rewards': group_size {group_size}: a group-relative advantage needs >= 2 "
                         "samples per prompt")
    rewards = rewards.float()
    mean = rewards.mean(dim=1, keepdim=True)  # [P, 1]
    std = rewards.std(dim=1, keepdim=True)  # [P, 1]
    return torch.where(std > ZERO_STD, (rewards - mean) / std, torch.zeros_like(rewards))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref); logp, ref_logp [N, L] of the sampled tokens."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """logp, old_logp [N, L], advantages [N] -> (per-token loss [N, L], clipped [N, L] bool: where the
    clipped branch is the larger loss, so the token's gradient is zero)."""
    ratio = torch.exp(logp - old_logp)  # [N, L]
    adv = advantages[:, None]  # [N, 1]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """per_token [N, L], mask [N, L] bool -> scalar, averaged as `mode` says (see the module doc)."""
    mask = mask.to(per_token.dtype)
    if mode == TOKEN_MEAN:
        return (per_token * mask).sum() / mask.sum().clamp_min(1)
    if mode == SEQ_MEAN_TOKEN_MEAN:
        per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)  # [N]
        return per_seq.mean()
    raise ValueError(f"argument 'mode': expected one of {AGGREGATIONS}, got {mode!r}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04,
              mode: str = SEQ_MEAN_TOKEN_MEAN) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The GRPO loss (scalar, differentiable in logp) and its statistics, token means over the mask:
    kl (k3), clip_frac (share of tokens whose ratio was clipped), ratio; and kl_max, the largest
    token's k3 (a batch mean far above the median comes from a few tokens: this names their size)."""
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"argument {name!r}: expected shape {tuple(logp.shape)} (as logp), got {tuple(t.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"argument 'advantages': expected shape ({logp.shape[0]},), got {tuple(advantages.shape)}")
    policy, clipped = clipped_policy_loss(logp, old_logp, advantages, clip_eps)
    kl = k3_kl(logp, ref_logp)
    loss = aggregate(policy + beta * kl, mask, mode)
    with torch.no_grad():
        stats = {"kl": aggregate(kl, mask, TOKEN_MEAN).item(),
                 "clip_frac": aggregate(clipped.float(), mask, TOKEN_MEAN).item(),
                 "ratio": aggregate(torch.exp(logp - old_logp), mask, TOKEN_MEAN).item(),
                 "kl_max": kl.masked_fill(~mask.bool(), 0.0).max().item()}
    return loss, stats
