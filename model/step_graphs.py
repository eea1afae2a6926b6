"""The model's prefill and decode steps replayed from CUDA graphs.

A step of a small model is a few hundred short kernels, and launching them from Python costs more
than running them: the step takes the host's time, not the GPU's. Captured once as a CUDA graph, a
step is one replay. A GRPO rollout of 9 tokens is one prefill and 8 decode steps, so the prefill is
graphed as well as the decode step.

A graph keeps the addresses it was captured with, so it is valid exactly while every tensor it
reads lives where it lived at the capture:
- the step's inputs (tokens, and cache_seqlens for a decode step, block_table) are static buffers
  each call copies into; each (step, input shapes) has its own graph, the last MAX_GRAPHS kept, so
  GRPO's rollouts and its held-out evaluation (other batch sizes) do not capture again in turn;
- the model's tensors (parameters, buffers, caches, derived weights) are compared by address,
  shape and dtype once per generate call (`GraphedSteps`): a replaced tensor, a larger cache or a
  moved model drops every graph. Weights copied in place, derived weights refreshed in place
  by prepare() (model.set_derived) and caches large enough for the call (Transformer.setup_cache)
  keep their addresses, so GRPO's graphs replay across weight updates.

A step must not read values on the host while it is captured: the one-GPU expert dispatch sizes its
rows for the worst case there instead of syncing (MoE.experts_grouped_fp8), and the expert-parallel
MoE (a collective per call) cannot be captured.
"""
from collections import OrderedDict
from typing import Callable, Tuple

import torch

from model.model import Transformer

# Graphs kept per model. Each holds a private memory pool (its step's activations), so this bounds
# their memory; GRPO uses 6 (prefill and decode of its rollout batch and of its evaluation's two
# chunk sizes, 256 and the rest).
MAX_GRAPHS = 8

StepFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


def tensor_addresses(model: Transformer) -> tuple:
    """(address, shape, dtype) of every tensor the model's modules hold: parameters, buffers and
    plain tensor attributes."""
    found = []
    for module in model.modules():
        for value in (*module._parameters.values(), *module._buffers.values(), *vars(module).values()):
            if isinstance(value, torch.Tensor):
                found.append((value.data_ptr(), tuple(value.shape), value.dtype))
    return tuple(found)


def _input_key(step: StepFn, inputs: Tuple[torch.Tensor, ...]) -> tuple:
    return (step.__name__, *((t.device, tuple(t.shape), t.dtype) for t in inputs))


class StepGraph:
    """One captured step(model, *inputs) for inputs of one shape."""

    def __init__(self, step: StepFn, model: Transformer, inputs: Tuple[torch.Tensor, ...]):
        self.inputs = tuple(t.clone() for t in inputs)
        # One eager step first, off the capture: lazy initialisation (library handles, workspaces) must
        # not happen inside it. It writes the same latents at the same positions as the real step.
        stream = torch.cuda.current_stream(inputs[0].device)
        side = torch.cuda.Stream(inputs[0].device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            step(model, *self.inputs)
        stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step(model, *self.inputs)

    def __call__(self, inputs: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The step's outputs: the graph's own buffers, overwritten by its next replay."""
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value)
        self.graph.replay()
        return self.outputs


class GraphedSteps:
    """Drop-ins for generate's steps during one generate call on CUDA (the model's tensors must not
    move during the call): `graphed(step)` replays the model's graph of that step and input shapes,
    capturing it first when needed."""

    def __init__(self, model: Transformer):
        self.model = model
        if getattr(model, "_step_graphs_tensors", None) != tensor_addresses(model):
            model._step_graphs = OrderedDict()  # the old graphs' memory pools go before new captures
            model._step_graphs_tensors = None

    def graphed(self, step: StepFn) -> StepFn:
        def run(model: Transformer, *inputs: torch.Tensor):
            if model is not self.model:
                raise ValueError(f"graphed {step.__name__}: called with another model than the one it was made for")
            graphs: OrderedDict = model._step_graphs
            key = _input_key(step, inputs)
            graph = graphs.get(key)
            if graph is None:
                while len(graphs) >= MAX_GRAPHS:
                    graphs.popitem(last=False)
                graph = graphs[key] = StepGraph(step, model, inputs)
                # A capture that created or moved model tensors (lazy initialisation in its eager step)
                # leaves the graphs captured before it reading stale addresses: only it is kept.
                addresses = tensor_addresses(model)
                if model._step_graphs_tensors not in (None, addresses):
                    for other in [k for k in graphs if k != key]:
                        del graphs[other]
                model._step_graphs_tensors = addresses
            graphs.move_to_end(key)
            return graph(inputs)

        return run
