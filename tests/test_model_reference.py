"""Reference backend on CPU: attention forms agree, the paged cache computes the full forward,
FP8 block dequantization follows the checkpoint convention, the router keeps its promises."""
import pytest
import torch

from deepseek_ops import reference as ops_ref
from deepseek_ops.testing import calc_diff
from model.config import preset
from model.generate import allocate_block_table, decode_one_token, prefill
from model.model import Linear, MoE, Transformer, random_model, route, use_batched_experts


@pytest.fixture(scope="module")
def tiny():
    # float64: the forms compared here round differently, and in float32 that can flip the experts of
    # a token whose gate scores tie within ~1e-7 (1.5% of random tiny models have a tie within 1e-6).
    return random_model(preset("tiny", dtype="float64"))


def _twin(model: Transformer, attn_impl: str) -> Transformer:
    twin = Transformer(model.args, model.backend, attn_impl)
    twin.load_state_dict(model.state_dict())
    return twin.prepare()


def test_absorbed_equals_naive_attention(tiny):
    naive = _twin(tiny, "naive")
    tokens = torch.randint(0, tiny.args.vocab_size, (3, 150))  # crosses original_max_position_embeddings
    with torch.no_grad():
        absorbed_logits, absorbed_hidden = tiny(tokens)
        naive_logits, naive_hidden = naive(tokens)
    assert calc_diff(absorbed_hidden, naive_hidden) < 1e-6
    assert calc_diff(absorbed_logits, naive_logits) < 1e-6


@pytest.mark.parametrize("attn_impl", ["absorbed", "naive"])
@pytest.mark.parametrize("s_q", [1, 2])
def test_paged_decode_equals_full_forward(tiny, attn_impl, s_q):
    model = tiny if attn_impl == "absorbed" else _twin(tiny, attn_impl)
    lengths = [5, 70, 1]  # one request spans two pages, one is a single token
    extra = 6
    seqs = torch.randint(0, model.args.vocab_size, (3, max(lengths) + extra))
    block_table, num_blocks = allocate_block_table(3, max(lengths) + extra, "cpu", torch.Generator().manual_seed(1))
    model.setup_cache(num_blocks)
    with torch.no_grad():
        full, _ = model(seqs)  # [B, S, V]
        prompts = seqs[:, :max(lengths)].clone()
        prefill(model, prompts, block_table)
        seqlens = torch.tensor(lengths)
        for step in range(0, extra, s_q):
            idx = seqlens[:, None] + torch.arange(s_q)  # [B, s_q] positions of the new tokens
            logits, _ = decode_one_token(model, seqs.gather(1, idx), seqlens, block_table)
            assert calc_diff(logits, full[torch.arange(3)[:, None], idx]) < 1e-6, f"step {step}"
            seqlens += s_q
    # Prefill logits at each prompt's last token equal the full forward's (padding never leaks back).
    for b, n in enumerate(lengths):
        assert calc_diff(model(seqs[b:b + 1, :n])[0][0, -1], full[b, n - 1]) < 1e-6


def test_fp8_block_dequant_matches_checkpoint_convention():
    n, k = 200, 384  # a partial last block row
    lin = Linear(k, n, torch.float32, fp8=True, backend="reference")
    w = torch.randn(n, k)
    w_fp8, scale = ops_ref.per_block_quant_fp8(w, 128, False)
    lin.weight.data, lin.weight_scale_inv.data = w_fp8, scale
    assert scale.shape == (2, 3)
    dense = lin.dense_weight(torch.float32)
    for i, j in [(0, 0), (127, 255), (128, 0), (199, 383), (150, 130)]:
        assert dense[i, j] == w_fp8[i, j].float() * scale[i // 128, j // 128]  # W = W_e4m3 * weight_scale_inv
    block = w[128:200, 256:384]
    assert torch.equal(scale[1, 2], block.abs().max() / 448)  # amax of the block maps to e4m3's max
    assert calc_diff(dense, w) < 1e-3
    x = torch.randn(5, k)
    assert torch.equal(lin(x), x @ dense.t())


def _route(scores, bias, **kw):
    cfg = dict(n_group=4, topk_group=2, top_k=4, norm_topk_prob=True, routed_scaling_factor=2.5)
    cfg.update(kw)
    return route(scores, bias, **cfg)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_weights_ignore_the_bias(norm_topk_prob):
    scores = torch.rand(64, 16)
    bias = torch.randn(16) * 0.5
    weights, indices = _route(scores, bias, norm_topk_prob=norm_topk_prob)
    expected = scores.gather(1, indices)
    if norm_topk_prob:
        expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(weights, expected * 2.5, rtol=1e-6, atol=0)
    assert all(len(set(row.tolist())) == 4 for row in indices)  # four distinct experts per token


def test_router_bias_changes_selection():
    scores = torch.rand(256, 16)
    _, plain = _route(scores, torch.zeros(16))
    bias = torch.zeros(16)
    bias[5] = 10.0  # expert 5 becomes everyone's choice; its weight stays its plain score
    weights, steered = _route(scores, bias, norm_topk_prob=False)
    assert (steered == 5).any(-1).all()
    assert not torch.equal(plain.sort(-1).values, steered.sort(-1).values)
    slot = (steered == 5).float().argmax(-1)
    assert torch.allclose(weights[torch.arange(256), slot], scores[:, 5] * 2.5)


def test_router_group_limits_brute_force():
    n_group, topk_group, top_k, e = 8, 3, 6, 64
    scores, bias = torch.rand(128, e), torch.randn(e) * 0.1
    _, indices = _route(scores, bias, n_group=n_group, topk_group=topk_group, top_k=top_k)
    biased = scores + bias
    per_group = e // n_group
    for t in range(scores.shape[0]):
        group_score = biased[t].view(n_group, per_group).topk(2).values.sum(-1)
        groups = set(group_score.topk(topk_group).indices.tolist())
        chosen = set(indices[t].tolist())
        assert {i // per_group for i in chosen} <= groups
        eligible = [i for i in range(e) if i // per_group in groups]
        best = set(sorted(eligible, key=lambda i: -biased[t, i].item())[:top_k])
        assert chosen == best


def test_moe_loop_equals_dense_formulation(tiny):
    moe = next(layer.mlp for layer in tiny.main_layers if isinstance(layer.mlp, MoE))
    x = torch.randn(33, tiny.args.hidden_size)
    weights, indices = moe.gate(x)
    assert calc_diff(moe.experts_loop(x, weights, indices), moe.experts_dense(x, weights, indices)) < 1e-10


@pytest.mark.parametrize("tokens", [1, 37])
def test_moe_batched_equals_loop_with_gradients(tokens):
    # The same sum in another order: values and the gradients of x, the routing weights and every
    # expert's weights agree to fp32 rounding. Routing every slot to expert 0 or 1 leaves the others
    # with no rows (no gradient on the loop, zeros on the batched path).
    model = random_model(preset("tiny"), seed=int(torch.randint(0, 2**30, ()))).requires_grad_(True)
    moe = next(layer.mlp for layer in model.main_layers if isinstance(layer.mlp, MoE))
    x = torch.randn(tokens, model.args.hidden_size)
    weights, indices = moe.gate(x)
    for idx in (indices, indices % 2):
        outs, grads = [], []
        for path in (moe.experts_loop, moe.experts_batched):
            x_, w_ = x.clone().requires_grad_(), weights.detach().requires_grad_()
            y = path(x_, w_, idx)
            grads.append(torch.autograd.grad(y, [x_, w_] + list(moe.experts.parameters()), torch.ones_like(y),
                                             allow_unused=True))
            outs.append(y.detach())
        assert calc_diff(outs[0], outs[1]) < 1e-12
        for loop, batched in zip(*grads):
            if loop is None:
                assert batched is None or batched.abs().sum() == 0
            else:
                assert calc_diff(loop, batched) < 1e-12


def test_moe_batched_no_tokens():
    moe = next(layer.mlp for layer in random_model(preset("tiny"), seed=0).main_layers if isinstance(layer.mlp, MoE))
    x = torch.randn(0, moe.args.hidden_size)
    weights, indices = moe.gate(x)
    assert torch.equal(moe.experts_batched(x, weights, indices), torch.zeros_like(x))


def test_batched_experts_flag_routes_forward_and_rejects_fp8():
    model = use_batched_experts(random_model(preset("tiny"), seed=0))
    moe = next(layer.mlp for layer in model.main_layers if isinstance(layer.mlp, MoE))
    assert moe.batched_experts
    x = torch.randn(5, 3, model.args.hidden_size)
    weights, indices = moe.gate(x.reshape(-1, x.shape[-1]))
    expected = moe.experts_loop(x.reshape(-1, x.shape[-1]), weights, indices) + moe.shared_experts(x).reshape(15, -1)
    assert calc_diff(moe(x).reshape(15, -1), expected) < 1e-12
    with pytest.raises(ValueError, match="FP8 expert linears"):
        use_batched_experts(random_model(preset("tiny", fp8=True, dtype="bfloat16"), seed=0))
    training = random_model(preset("tiny"), seed=0)
    next(m for m in training.modules() if isinstance(m, MoE)).experts[0].down_proj.fp8_training = True
    with pytest.raises(ValueError, match="FP8 expert linears"):
        use_batched_experts(training)


def test_bad_backend_arguments():
    with pytest.raises(ValueError, match="backend"):
        Transformer(preset("tiny"), backend="cuda")
    with pytest.raises(ValueError, match="attn_impl"):
        Transformer(preset("tiny"), attn_impl="flash")


def test_decode_step_compiles_fullgraph():
    args = preset("tiny", num_hidden_layers=1, first_k_dense_replace=0, n_routed_experts=4, n_group=2,
                  topk_group=1, num_experts_per_tok=2, num_nextn_predict_layers=0, dtype="float64")
    model = random_model(args)  # float64: compiled kernels round differently (see the tiny fixture)
    block_table, num_blocks = allocate_block_table(2, 128, "cpu")
    model.setup_cache(num_blocks)
    prompts = torch.randint(0, args.vocab_size, (2, 9))
    with torch.no_grad():
        prefill(model, prompts, block_table)
        tokens, seqlens = torch.randint(0, args.vocab_size, (2, 1)), torch.tensor([9, 4])
        compiled = torch.compile(decode_one_token, fullgraph=True, dynamic=False)
        out, _ = compiled(model, tokens, seqlens, block_table)
        ref, _ = decode_one_token(model, tokens, seqlens, block_table)
    assert calc_diff(out, ref) < 1e-6
