"""A tiny DeepSeek-V3 fitted in a few dozen steps to a synthetic language, for free-running greedy
decoding tests.

Random weights give nearly flat logits: the best token leads the next by a small fraction of their
spread, FP8 rounding flips such near-ties, and a free-running greedy sequence differs from the
first flip on. A trained model predicts with margins. This one learns a Markov chain over the byte
tokens: after token t comes successor[t] with probability 0.9, else a uniform token. Greedy decoding
of the fitted model follows the chain, so a kernel that computes something else shows twice: as
tokens that differ from the reference backend's, and as tokens that leave the chain.
"""
import functools
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from deepseek_ops import reference as ops_ref
from model.config import FP8_BLOCK, preset
from model.model import Linear, Transformer, random_model

CHAIN_TOKENS = 256  # the byte tokens: bos / eos stay out of the language
FOLLOW_PROB = 0.9


def chain_successors(seed: int = 1) -> torch.Tensor:
    """successor [256] int64: the likely next token of each token."""
    return torch.randint(0, CHAIN_TOKENS, (CHAIN_TOKENS,), generator=torch.Generator().manual_seed(seed))


def chain_sequences(successor: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, length] int64 sequences of the chain (first token uniform)."""
    seq = torch.empty(batch, length, dtype=torch.long)
    seq[:, 0] = torch.randint(0, CHAIN_TOKENS, (batch,), generator=generator)
    for t in range(1, length):
        noise = torch.randint(0, CHAIN_TOKENS, (batch,), generator=generator)
        follow = torch.rand(batch, generator=generator) < FOLLOW_PROB
        seq[:, t] = torch.where(follow, successor[seq[:, t - 1]], noise)
    return seq


def train_tiny(successor: torch.Tensor, device, steps: int = 60, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Fits the tiny preset (float32, reference backend) to the chain; returns its state dict.
    Next-token cross-entropy, AdamW; 60 steps of 16 x 64 tokens reach ~0.9 nats (the chain's own
    entropy is 0.88)."""
    model = random_model(preset("tiny"), device=device, seed=seed)
    params = [p for p in model.parameters() if p.dtype.is_floating_point]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        tokens = chain_sequences(successor, 16, 64, generator).to(device)
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: t.detach() for name, t in model.state_dict().items()}


@torch.no_grad()
def checkpoint_model(state: Dict[str, torch.Tensor], backend: str, fp8: bool, fp8_activations: bool = False):
    """The trained float weights as a bf16 checkpoint holds them, FP8 (linears e4m3 with 128 x 128
    block scales, the rest bf16) or not, on the state's device."""
    device = next(iter(state.values())).device
    with torch.device(device):
        model = Transformer(preset("tiny", dtype="bfloat16", fp8=fp8), backend, fp8_activations=fp8_activations)
    fp8_linears = {name for name, m in model.named_modules() if isinstance(m, Linear) and m.is_fp8}
    for name, module in model.named_modules():
        if name in fp8_linears:
            module.weight.data, module.weight_scale_inv.data = ops_ref.per_block_quant_fp8(
                state[name + ".weight"].float(), FP8_BLOCK, False)
    rest = {key: value for key, value in state.items() if key.rsplit(".", 1)[0] not in fp8_linears}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [key for key in missing if key.rsplit(".", 1)[0] not in fp8_linears]
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"
    return model.prepare()


def chain_fraction(tokens, successor: torch.Tensor) -> float:
    """Fraction of the consecutive pairs of a token list that follow the chain."""
    follows = [int(successor[a]) == b for a, b in zip(tokens, tokens[1:]) if a < CHAIN_TOKENS]
    return sum(follows) / max(1, len(follows))


@functools.lru_cache(maxsize=None)
def _trained_state(device: str) -> Dict[str, torch.Tensor]:
    return train_tiny(chain_successors(), device)  # once per device and process


def trained_pair(device: str, fp8: bool) -> Tuple[Transformer, Transformer, torch.Tensor]:
    """(reference, kernels) backends on the same fitted weights (FP8 checkpoint: the reference with
    FP8 activations, as the kernels compute), and the chain."""
    state = _trained_state(device)
    return (checkpoint_model(state, "reference", fp8, fp8_activations=fp8), checkpoint_model(state, "kernels", fp8),
            chain_successors())
