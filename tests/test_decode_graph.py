"""The decode step replayed from a CUDA graph (model/decode_graph.py): the same tokens as the eager
step, one capture reused across generate calls of one shape, a new capture when the model's tensors
move or the shape changes; on CPU, what decides reuse."""
import pytest
import torch

from model.config import preset
from model.decode_graph import tensor_addresses
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


def test_setup_cache_reuses_a_same_size_cache_in_place():
    model = random_model(preset("tiny"))
    model.setup_cache(3)
    cache = model.model.layers[0].self_attn.kv_cache
    cache.fill_(1.0)
    model.setup_cache(3)
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
    graph = model._decode_graph
    # Same shapes: the capture is replayed, not redone, and follows the new inputs.
    prompts2 = _prompts(vocab, (5, 2, 66, 30, 1, 12), seed=1)
    assert generate(model, prompts2, 40, temperature=1.0, seed=12, cuda_graph=True)[0] == \
        generate(model, prompts2, 40, temperature=1.0, seed=12)[0]
    assert model._decode_graph is graph
    # New weights, derived ones refreshed in place by prepare (as GRPO's sampler after each step): the
    # same graph replays them.
    with torch.no_grad():
        for p in model.parameters():
            raw = p.view(torch.uint8) if p.dtype == torch.float8_e4m3fn else p
            raw.copy_(torch.roll(raw, 1, 0))
    model.prepare()
    graphed, _ = generate(model, prompts, 40, temperature=1.0, seed=13, cuda_graph=True)
    assert model._decode_graph is graph
    assert graphed == generate(model, prompts, 40, temperature=1.0, seed=13)[0]
    # A tensor that moved: captured again.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone(), requires_grad=False)
    graphed, _ = generate(model, prompts, 40, temperature=1.0, seed=14, cuda_graph=True)
    assert model._decode_graph is not graph
    assert graphed == generate(model, prompts, 40, temperature=1.0, seed=14)[0]
    # Another batch size: another capture.
    small = prompts[:2]
    graph = model._decode_graph
    assert generate(model, small, 8, cuda_graph=True)[0] == generate(model, small, 8)[0]
    assert model._decode_graph is not graph


def test_worst_case_expert_rows_give_the_exact_layouts_result():
    # The layout a captured step uses (no host sync): a row count the grouped GEMM takes, same output.
    model = _kernels_model("cpu")
    moe = next(layer.mlp for layer in model.main_layers if getattr(layer.mlp, "w13", None) is not None)
    x = torch.randn(37, model.args.hidden_size, dtype=torch.bfloat16)
    weights, indices = moe.gate(x)
    exact = moe.experts_grouped_fp8(x, weights, indices, exact=True)
    worst = moe.experts_grouped_fp8(x, weights, indices, exact=False)
    assert torch.equal(worst, exact)
