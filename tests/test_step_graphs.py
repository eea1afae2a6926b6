"""The prefill and decode steps replayed from CUDA graphs (model/step_graphs.py): the same tokens as
the eager steps, one capture per step and shape reused across generate calls, captures dropped when
the model's tensors move; on CPU, what decides reuse (with a stand-in for the graph)."""
import pytest
import torch

from model.config import preset
from model import step_graphs
from model.step_graphs import tensor_addresses
from model.generate import generate
from model.model import Transformer, random_model


def _kernels_model(device):
    args = preset("tiny", dtype="bfloat16", fp8=True)
    ref = random_model(args, device=device)
    with torch.device(device):
        model = Transformer(args, "kernels")
    model.load_state_dict(ref.state_dict())
    return model.prepare()


def _prompts(vocab, lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def test_setup_cache_reuses_a_large_enough_cache_in_place():
    model = random_model(preset("tiny"))
    model.setup_cache(3)
    cache = model.model.layers[0].self_attn.kv_cache
    for num_blocks in (3, 2):
        cache.fill_(1.0)
        model.setup_cache(num_blocks)
        assert model.model.layers[0].self_attn.kv_cache is cache and not cache.any()
    model.setup_cache(4)
    assert model.model.layers[0].self_attn.kv_cache.shape[0] == 4


def test_prepare_refreshes_derived_weights_in_place():
    # GRPO re-derives the sampler's weights every step: in place, its captured graph stays valid.
    model = _kernels_model("cpu")
    model.setup_cache(2)
    before = tensor_addresses(model)
    moe = next(layer.mlp for layer in model.main_layers if getattr(layer.mlp, "w13", None) is not None)
    expert = moe.experts[0].gate_proj
    with torch.no_grad():
        raw = expert.weight.view(torch.uint8)
        raw.copy_(torch.roll(raw, 1, 0))
    model.prepare()
    assert tensor_addresses(model) == before
    assert torch.equal(moe.w13[0, :expert.out_features].view(torch.uint8), expert.weight.view(torch.uint8))


def test_tensor_addresses_see_moved_tensors_and_new_caches():
    model = random_model(preset("tiny"))
    model.setup_cache(2)
    before = tensor_addresses(model)
    model.setup_cache(2)
    assert tensor_addresses(model) == before  # reused cache: a captured graph stays valid
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone(), requires_grad=False)
    assert tensor_addresses(model) != before  # a graph captured before must not replay
    model.setup_cache(5)
    assert len({a for a, _, _ in tensor_addresses(model)} - {a for a, _, _ in before}) >= 2


def test_cuda_graph_needs_a_cuda_model():
    model = random_model(preset("tiny"))
    with pytest.raises(ValueError, match="'cuda_graph': needs a model on CUDA"):
        generate(model, [[1, 2]], 3, cuda_graph=True)


@pytest.mark.gpu
def test_graph_replay_samples_what_eager_decoding_samples():
    model = _kernels_model("cuda")
    vocab = model.args.vocab_size
    prompts = _prompts(vocab, (3, 70, 1, 20, 64, 9), seed=0)
    eager, _ = generate(model, prompts, 40, temperature=1.0, seed=11)
    graphed, _ = generate(model, prompts, 40, temperature=1.0, seed=11, cuda_graph=True)
    assert graphed == eager
    first = dict(model._step_graphs)
    assert sorted(key[0] for key in first) == ["decode_one_token", "prefill"]
    # Another prompt length, same decode shapes: the decode capture is replayed, not redone, and follows
    # the new inputs; the prefill of the new length is captured beside the first one.
    prompts2 = _prompts(vocab, (5, 2, 66, 30, 1, 12), seed=1)
    assert generate(model, prompts2, 40, temperature=1.0, seed=12, cuda_graph=True)[0] == \
        generate(model, prompts2, 40, temperature=1.0, seed=12)[0]
    assert len(model._step_graphs) == 3 and all(model._step_graphs[k] is g for k, g in first.items())
    # New weights, derived ones refreshed in place by prepare (as GRPO's sampler after each step): the
    # same graphs replay them.
    with torch.no_grad():
        for p in model.parameters():
            raw = p.view(torch.uint8) if p.dtype == torch.float8_e4m3fn else p
            raw.copy_(torch.roll(raw, 1, 0))
    model.prepare()
    graphed, _ = generate(model, prompts, 40, temperature=1.0, seed=13, cuda_graph=True)
    assert all(model._step_graphs[k] is g for k, g in first.items())
    assert graphed == generate(model, prompts, 40, temperature=1.0, seed=13)[0]
    # A tensor that moved: every graph goes, the steps are captured again.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone(), requires_grad=False)
    graphed, _ = generate(model, prompts, 40, temperature=1.0, seed=14, cuda_graph=True)
    assert len(model._step_graphs) == 2 and not set(map(id, model._step_graphs.values())) & set(map(id, first.values()))
    assert graphed == generate(model, prompts, 40, temperature=1.0, seed=14)[0]
    # Another batch size: its own captures, the others kept and replayed when that size comes back.
    kept = dict(model._step_graphs)
    small = prompts[:2]
    assert generate(model, small, 8, cuda_graph=True)[0] == generate(model, small, 8)[0]
    assert len(model._step_graphs) == 4
    assert generate(model, prompts, 40, temperature=1.0, seed=15, cuda_graph=True)[0] == \
        generate(model, prompts, 40, temperature=1.0, seed=15)[0]
    assert all(model._step_graphs[k] is g for k, g in kept.items())


class _FakeGraph:
    """StepGraph's stand-in on CPU: counts captures, returns its step's outputs without a graph."""
    captures = 0

    def __init__(self, step, model, inputs):
        type(self).captures += 1
        self.step, self.model = step, model

    def __call__(self, inputs):
        return self.step(self.model, *inputs)


def _steps(model):
    def prefill(model_, tokens):
        return tokens + 1, None

    def decode_one_token(model_, tokens):
        return tokens + 2, None

    graphs = step_graphs.GraphedSteps(model)
    return graphs.graphed(prefill), graphs.graphed(decode_one_token)


def test_graphs_are_kept_per_step_and_shape_and_dropped_when_the_model_moves(monkeypatch):
    monkeypatch.setattr(step_graphs, "StepGraph", _FakeGraph)
    monkeypatch.setattr(_FakeGraph, "captures", 0)
    model = random_model(preset("tiny"))
    prefill, decode = _steps(model)
    x = torch.zeros(2, 3, dtype=torch.long)
    assert torch.equal(prefill(model, x)[0], x + 1) and torch.equal(decode(model, x)[0], x + 2)
    assert _FakeGraph.captures == 2  # one per step
    prefill, decode = _steps(model)  # the next generate call: the model has not moved
    prefill(model, x), decode(model, x)
    assert _FakeGraph.captures == 2
    decode(model, torch.zeros(4, 3, dtype=torch.long))  # a new shape: one capture, the others kept
    assert _FakeGraph.captures == 3 and len(model._step_graphs) == 3
    with pytest.raises(ValueError, match="another model"):
        decode(random_model(preset("tiny")), x)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone(), requires_grad=False)
    prefill, decode = _steps(model)
    assert len(model._step_graphs) == 0
    decode(model, x)
    assert _FakeGraph.captures == 4


def test_graphs_beyond_the_limit_drop_the_least_recently_used(monkeypatch):
    monkeypatch.setattr(step_graphs, "StepGraph", _FakeGraph)
    monkeypatch.setattr(_FakeGraph, "captures", 0)
    model = random_model(preset("tiny"))
    _, decode = _steps(model)
    shapes = [torch.zeros(b, 1, dtype=torch.long) for b in range(1, step_graphs.MAX_GRAPHS + 1)]
    for x in shapes:
        decode(model, x)
    decode(model, shapes[0])  # used again: now the most recent
    decode(model, torch.zeros(99, 1, dtype=torch.long))  # one over the limit: the least recent goes
    assert len(model._step_graphs) == step_graphs.MAX_GRAPHS
    kept_batches = {key[1][1][0] for key in model._step_graphs}
    assert 1 in kept_batches and 2 not in kept_batches and 99 in kept_batches


def test_a_capture_that_moves_model_tensors_drops_the_graphs_before_it(monkeypatch):
    class LazyInit(_FakeGraph):  # its eager step creates a model tensor, as a lazy workspace would
        def __init__(self, step, model, inputs):
            super().__init__(step, model, inputs)
            model.lazy = torch.zeros(inputs[0].shape[0])

    monkeypatch.setattr(step_graphs, "StepGraph", LazyInit)
    model = random_model(preset("tiny"))
    _, decode = _steps(model)
    decode(model, torch.zeros(1, 1, dtype=torch.long))
    decode(model, torch.zeros(2, 1, dtype=torch.long))
    assert [key[1][1][0] for key in model._step_graphs] == [2]


def test_worst_case_expert_rows_give_the_exact_layouts_result():
    # The layout a captured step uses (no host sync): a row count the grouped GEMM takes, same output.
    model = _kernels_model("cpu")
    moe = next(layer.mlp for layer in model.main_layers if getattr(layer.mlp, "w13", None) is not None)
    x = torch.randn(37, model.args.hidden_size, dtype=torch.bfloat16)
    weights, indices = moe.gate(x)
    exact = moe.experts_grouped_fp8(x, weights, indices, exact=True)
    worst = moe.experts_grouped_fp8(x, weights, indices, exact=False)
    assert torch.equal(worst, exact)
