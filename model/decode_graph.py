"""The decode step replayed from a CUDA graph.

A decode step of a small model is a few hundred short kernels, and launching them from Python
costs more than running them: the step takes the host's time, not the GPU's. Captured once as a
CUDA graph, a step is one replay.

A graph keeps the addresses it was captured with, so it is valid exactly while every tensor it
reads lives where it lived at the capture:
- the step's inputs (tokens, cache_seqlens, block_table) are static buffers each call copies into,
  and a new input shape captures again;
- the model's tensors (parameters, buffers, caches, derived weights) are compared by address,
  shape and dtype once per generate call (`graphed_decode`): a replaced tensor, a cache of a new
  size or a moved model captures again. Weights copied in place, derived weights refreshed in place
  by prepare() (model.set_derived) and same-size caches (Transformer.setup_cache) keep their
  addresses, so GRPO's rollouts of one batch size replay one graph across weight updates.

The step must not read values on the host while it is captured: the one-GPU expert dispatch sizes
its rows for the worst case there instead of syncing (MoE.experts_grouped_fp8), and the expert-
parallel MoE (a collective per call) cannot be captured.
"""
from typing import Callable, Tuple

import torch

from model.model import Transformer

DecodeFn = Callable[[Transformer, torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def tensor_addresses(model: Transformer) -> tuple:
    """(address, shape, dtype) of every tensor the model's modules hold: parameters, buffers and
    plain tensor attributes."""
    found = []
    for module in model.modules():
        for value in (*module._parameters.values(), *module._buffers.values(), *vars(module).values()):
            if isinstance(value, torch.Tensor):
                found.append((value.data_ptr(), tuple(value.shape), value.dtype))
    return tuple(found)


def _input_key(tokens: torch.Tensor, cache_seqlens: torch.Tensor, block_table: torch.Tensor) -> tuple:
    return tuple((t.device, tuple(t.shape), t.dtype) for t in (tokens, cache_seqlens, block_table))


class DecodeGraph:
    """One captured decode step of `model` for inputs of one shape."""

    def __init__(self, model: Transformer, tokens: torch.Tensor, cache_seqlens: torch.Tensor,
                 block_table: torch.Tensor):
        from model.generate import decode_one_token

        self.inputs = _input_key(tokens, cache_seqlens, block_table)
        self.tokens, self.cache_seqlens, self.block_table = tokens.clone(), cache_seqlens.clone(), block_table.clone()
        # One eager step first, off the capture: lazy initialisation (library handles, workspaces) must
        # not happen inside it. It writes the same latents at the same positions as the real step.
        stream = torch.cuda.current_stream(tokens.device)
        side = torch.cuda.Stream(tokens.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            decode_one_token(model, self.tokens, self.cache_seqlens, self.block_table)
        stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.hidden = decode_one_token(model, self.tokens, self.cache_seqlens, self.block_table)
        self.model_tensors = tensor_addresses(model)

    def __call__(self, tokens: torch.Tensor, cache_seqlens: torch.Tensor,
                 block_table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, hidden) of the step: the graph's own buffers, overwritten by the next replay."""
        self.tokens.copy_(tokens)
        self.cache_seqlens.copy_(cache_seqlens)
        self.block_table.copy_(block_table)
        self.graph.replay()
        return self.logits, self.hidden


def graphed_decode(model: Transformer) -> DecodeFn:
    """decode_one_token's drop-in for one generate call on CUDA (the model's tensors must not move
    during the call): replays the model's graph, capturing it first when needed."""
    graph = getattr(model, "_decode_graph", None)
    model._decode_graph = graph if graph is not None and graph.model_tensors == tensor_addresses(model) else None

    def decode(model_: Transformer, tokens: torch.Tensor, cache_seqlens: torch.Tensor, block_table: torch.Tensor):
        if model_ is not model:
            raise ValueError("graphed_decode: called with another model than the one it was made for")
        graph = model._decode_graph
        if graph is None or graph.inputs != _input_key(tokens, cache_seqlens, block_table):
            model._decode_graph = None  # the old graph's memory pool goes before the new capture
            model._decode_graph = DecodeGraph(model, tokens, cache_seqlens, block_table)
        return model._decode_graph(tokens, cache_seqlens, block_table)

    return decode
