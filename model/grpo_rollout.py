"""GRPO rollouts: G sampled answers per prompt through model/generate.py, their rewards, and the
per-token log-probs of a sampled sequence under any model.

The sampler is its own Transformer, refreshed from the trained policy by sync_weights after each
update: on the GPU it is backend "kernels" with FP8 linears (e4m3, 128 x 128 block scales) and a
bf16 paged cache, so rollouts run mla_decode, fp8_linear and the grouped FP8 expert GEMMs while the
policy trains float weights with autograd on the reference backend. On the CPU both are the
reference backend. The importance ratio's old log-probs are recomputed by the policy itself
(grpo.py), so the sampler's FP8 rounding never enters the objective.

Shapes: N sequences (P prompts x G samples, sample g of prompt p in row p * G + g), L tokens of
prompt + response, right-padded; V vocabulary.
"""
import dataclasses
import math
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from deepseek_ops import reference as ops_ref
from model.arithmetic_task import ArithmeticTask, Problem
from model.config import FP8_BLOCK
from model.generate import generate
from model.model import FP8, Linear, Transformer

RewardFn = Callable[[Problem, Sequence[int]], float]


@dataclasses.dataclass
class Rollout:
    problems: List[Problem]  # P
    group_size: int  # G
    responses: List[List[int]]  # N, each cut after its first eos
    tokens: torch.Tensor  # [N, L] int64: bos, prompt, response, padding
    mask: torch.Tensor  # [N, L - 1] bool: target tokens[:, 1:] is a response token
    rewards: torch.Tensor  # [N] fp32
    correct: torch.Tensor  # [N] bool: the exact answer
    reward_failures: int  # reward function raised or returned a non-finite value: scored 0
    generated_tokens: int  # every sampled token: N x decode steps (stopped once every response has its eos)
    tokens_per_s: float


# ----------------------------------------------------------------------------------------------
# Sampler weights
# ----------------------------------------------------------------------------------------------
def build_sampler(policy: Transformer, backend: str, fp8: bool, dtype: str) -> Transformer:
    """A Transformer of the policy's architecture for generation, holding the policy's weights."""
    args = dataclasses.replace(policy.args, fp8=fp8, dtype=dtype)
    with torch.device(policy.model.embed_tokens.weight.device):
        sampler = Transformer(args, backend)
    return sync_weights(policy, sampler)


def uses_cuda_graph(sampler: Transformer) -> bool:
    """Whether generation replays its prefill and decode steps from CUDA graphs: the kernels backend on
    CUDA with every op on its kernel (a reference fallback may read values on the host, which a capture
    forbids)."""
    return (sampler.backend == "kernels" and sampler.model.embed_tokens.weight.is_cuda
            and sampler.ep_group is None and not sampler.kernel_fallbacks())


@torch.no_grad()
def sync_weights(policy: Transformer, sampler: Transformer) -> Transformer:
    """Copies the policy's float weights into the sampler, quantizing the sampler's FP8 linears."""
    if any(isinstance(m, Linear) and m.is_fp8 for m in policy.modules()):
        raise ValueError("sync_weights: the policy must hold float weights (it is trained); got FP8 linears")
    source = policy.state_dict()
    for name, module in sampler.named_modules():
        if isinstance(module, Linear) and module.is_fp8:
            w_fp8, scales = ops_ref.per_block_quant_fp8(source[f"{name}.weight"].float(), FP8_BLOCK, False)
            module.weight.copy_(w_fp8)
            module.weight_scale_inv.copy_(scales)
    for key, dst in sampler.state_dict(keep_vars=True).items():
        if dst.dtype != FP8 and not key.endswith(".weight_scale_inv"):
            dst.copy_(source[key])
    return sampler.prepare()


# ----------------------------------------------------------------------------------------------
# Sequences and their log-probs
# ----------------------------------------------------------------------------------------------
def cut_at_eos(tokens: Sequence[int], eos_id: int) -> List[int]:
    tokens = list(tokens)
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def pack_sequences(prompts: List[List[int]], responses: List[List[int]], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> tokens [N, L] (prompt + response, right-padded with 0) and mask [N, L - 1], True where the
    target tokens[:, t + 1] is a response token."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    mask = torch.zeros(len(prompts), max(lengths) - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = True
    return tokens.to(device), mask.to(device)


def token_logprobs(model: Transformer, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """tokens [N, L] -> log-probs [N, L - 1] fp32 of tokens[:, 1:] under softmax(logits / temperature),
    the distribution the sampler drew from (differentiable when the model's weights are)."""
    logits, _ = model(tokens[:, :-1])  # [N, L - 1, V]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # in fp32, as generate.sample draws
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [N, L - 1]


# ----------------------------------------------------------------------------------------------
# Rewards, rollouts, evaluation
# ----------------------------------------------------------------------------------------------
def safe_rewards(reward_fn: RewardFn, problems: List[Problem], responses: List[List[int]]) -> Tuple[List[float], int]:
    """Each response's reward; one whose reward function raises or returns a non-finite value
    scores 0 and is counted (returned as the failure count)."""
    rewards, failures = [], 0
    for problem, response in zip(problems, responses):
        try:
            value = float(reward_fn(problem, response))
        except Exception:  # any bug in a reward function costs that sample, not the run
            value = math.nan
        if not math.isfinite(value):
            failures += 1
            value = 0.0
        rewards.append(value)
    return rewards, failures


@torch.no_grad()
def rollout(sampler: Transformer, task: ArithmeticTask, problems: List[Problem], group_size: int,
            temperature: float = 1.0, seed: Optional[int] = None, reward_fn: Optional[RewardFn] = None) -> Rollout:
    """group_size sampled responses per problem (one batched generate call), rewarded by reward_fn
    (default: the task's). The same seed and weights give the same samples."""
    if not problems:
        raise ValueError("argument 'problems': empty: a rollout needs at least one prompt")
    if group_size < 2:
        raise ValueError(f"argument 'group_size': expected >= 2 samples per prompt (a group-relative "
                         f"advantage), got {group_size}")
    if temperature <= 0:
        raise ValueError(f"argument 'temperature': rollouts sample, expected > 0, got {temperature}")
    problems_n = [p for p in problems for _ in range(group_size)]  # [N]: row p * G + g
    prompts = [task.encode_prompt(p) for p in problems_n]
    start = time.perf_counter()
    sampled, _ = generate(sampler, prompts, task.max_response_tokens, temperature=temperature, seed=seed,
                          eos_id=task.eos_id, cuda_graph=uses_cuda_graph(sampler))
    seconds = time.perf_counter() - start
    responses = [cut_at_eos(s, task.eos_id) for s in sampled]
    rewards, failures = safe_rewards(reward_fn or task.reward, problems_n, responses)
    correct = [task.parse_answer(r) == p.answer for p, r in zip(problems_n, responses)]
    device = sampler.model.embed_tokens.weight.device  # every tensor of the batch lives with the models
    tokens, mask = pack_sequences(prompts, responses, device)
    generated = sum(len(s) for s in sampled)
    return Rollout(list(problems), group_size, responses, tokens, mask, torch.tensor(rewards, device=device),
                   torch.tensor(correct, device=device), failures, generated, generated / max(seconds, 1e-9))


@torch.no_grad()
def greedy_accuracy(model: Transformer, task: ArithmeticTask, problems: List[Problem], batch_size: int = 256) -> float:
    """Share of problems whose greedy response is the exact answer."""
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        outputs, _ = generate(model, [task.encode_prompt(p) for p in chunk], task.max_response_tokens,
                              eos_id=task.eos_id, cuda_graph=uses_cuda_graph(model))
        correct += sum(task.parse_answer(cut_at_eos(o, task.eos_id)) == p.answer for p, o in zip(chunk, outputs))
    return correct / max(len(problems), 1)
