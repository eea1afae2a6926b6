"""Stacked fp32 master weights for the grouped FP8 linears of training, without a copy per call.

FP8 training feeds a grouped FP8 linear one master [G, R, C]: the routed experts' [gate | up] rows
([E, 2I, D]) or their down projections ([E, D, I]), a dense SwiGLU block's [gate | up] ([1, 2I, D]).
Stacking the Parameters at each call (torch.stack / torch.cat) copies every expert's master, and the
gradient comes back through the stack's backward as one more pass over the same bytes: at 32 experts
of DeepSeek-V3's width that is ~17 GB of memory traffic a step. Instead the Parameters become slices
of one stacked tensor, made at the first call and made again when a Parameter no longer lies where
the stack puts it (moved by .to(), its .data replaced); `stacked_master` hands that tensor on as is,
and the gradient's slices become the Parameters' gradients (autograd keeps such a slice as .grad,
without a copy, when the Parameter had none). The Parameters stay the ones the optimizer, the
checkpoints and the bf16 path know.
"""
from typing import List, Sequence

import torch
import torch.nn as nn


class _Stacked(torch.autograd.Function):
    """stack (the tensor the params are slices of) -> stack; its gradient -> the params' slices."""

    @staticmethod
    def forward(ctx, stack: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.rows = [p.shape[0] for p in params]
        ctx.params_per_group = len(params) // stack.shape[0]
        return stack.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pieces, row = [], 0
        for i, rows in enumerate(ctx.rows):
            if i % ctx.params_per_group == 0:
                row = 0
            pieces.append(grad[i // ctx.params_per_group, row:row + rows])
            row += rows
        return (None, *pieces)


def _lies_in(stack: torch.Tensor, groups: Sequence[Sequence[torch.Tensor]]) -> bool:
    """Whether every param of groups[g] is rows [r0, r1) of stack[g], in order."""
    if stack.shape[0] != len(groups):
        return False
    row_bytes = stack.shape[2] * stack.element_size()
    for g, params in enumerate(groups):
        row = 0
        for p in params:
            if (p.dtype != stack.dtype or p.device != stack.device or p.dim() != 2 or p.shape[1] != stack.shape[2]
                    or p.stride() != (stack.shape[2], 1)
                    or p.data_ptr() != stack.data_ptr() + (g * stack.shape[1] + row) * row_bytes):
                return False
            row += p.shape[0]
        if row != stack.shape[1]:
            return False
    return True


@torch.no_grad()
def _restack(groups: Sequence[Sequence[nn.Parameter]]) -> torch.Tensor:
    stack = torch.stack([torch.cat(list(params)) for params in groups])
    for g, params in enumerate(groups):
        row = 0
        for p in params:
            p.data = stack[g, row:row + p.shape[0]]
            row += p.shape[0]
    return stack


def stacked_master(owner: nn.Module, name: str, groups: List[List[nn.Parameter]]) -> torch.Tensor:
    """[G, R, C]: groups[g]'s params (each [r_i, C], sum r_i = R) as rows of group g, a tensor they
    are slices of (kept on `owner` under `name`, not in its state_dict); the gradient reaches them."""
    if torch.compiler.is_compiling():  # a traced graph stacks (and may fuse the copy); no pointer checks
        return torch.stack([torch.cat(params) for params in groups])
    stack = owner.__dict__.get(name)
    if stack is None or not _lies_in(stack, groups):
        stack = _restack(groups)
        owner.__dict__[name] = stack
    return _Stacked.apply(stack, *[p for params in groups for p in params])
