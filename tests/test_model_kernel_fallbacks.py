"""The kernels backend on configs the kernels do not cover: the shape predicates agree with the ops'
own checks, construction warns once with the ops that fall back, and such a model computes the
reference backend's logits (on the CPU the ops run their CPU kernels; on the GPU the kernels)."""
import warnings

import pytest
import torch

import deepseek_ops
from deepseek_ops import reference as ops_ref
from deepseek_ops.testing import calc_diff
from model.config import preset
from model.generate import allocate_block_table, decode_one_token, prefill
from model.kernel_fallbacks import fp8_linear_fallback, grouped_experts_fallback, mla_decode_fallback
from model.model import Transformer, random_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Each kind of op of the kernels backend falls back somewhere: q_lora_rank 192 and kv_lora_rank 320 (K not
# a multiple of 128), a 320 + 32 latent (not mla_decode's 512 + 64), experts of width 96; the dense MLP,
# o_proj and kv_a_proj_with_mqa (N = 352) still fit fp8_linear.
ODD = dict(q_lora_rank=192, kv_lora_rank=320, qk_rope_head_dim=32, moe_intermediate_size=96)


def _accepts(fn) -> bool:
    try:
        fn()
    except ValueError:
        return False
    return True


def _fp8_weight(n: int, k: int):
    return ops_ref.per_block_quant_fp8(torch.randn(n, k), 128, False)  # any shape (the reference pads)


@pytest.mark.parametrize("k", [128, 256, 192, 96])
@pytest.mark.parametrize("n", [16, 352, 576, 24, 100])
def test_fp8_linear_predicate_is_the_ops_check(k, n):
    weight, scale = _fp8_weight(n, k)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    assert (fp8_linear_fallback(k, n) is None) == _accepts(lambda: deepseek_ops.fp8_linear(x, weight, scale))


@pytest.mark.parametrize("rank,rope", [(512, 64), (320, 32), (512, 32), (448, 128), (256, 64)])
def test_mla_predicate_is_the_ops_checks(rank, rope):
    """Both ops must take the shapes: mla_decode alone cannot tell 448 + 128 from 512 + 64."""
    args = preset("tiny", kv_lora_rank=rank, qk_rope_head_dim=rope)
    cache = torch.zeros(2, 64, 1, rank + rope, dtype=torch.bfloat16)
    block_table = torch.tensor([[1, 0]], dtype=torch.int32)
    seqlens = torch.tensor([5], dtype=torch.int32)

    def append():
        deepseek_ops.mla_cache_append(cache, block_table, torch.tensor([[4]], dtype=torch.int32),
                                      torch.randn(1, 1, rank, dtype=torch.bfloat16),
                                      torch.randn(1, 1, rope, dtype=torch.bfloat16))

    def decode():
        q = torch.randn(1, 1, 4, rank + rope, dtype=torch.bfloat16)
        deepseek_ops.mla_decode(q, cache, block_table, seqlens, 0.1, causal=True)

    assert (mla_decode_fallback(args) is None) == (_accepts(append) and _accepts(decode))


@pytest.mark.parametrize("hidden,inter", [(256, 128), (256, 96), (192, 128), (128, 256), (96, 64)])
def test_grouped_experts_predicate_is_the_ops_checks(hidden, inter):
    """The MoE path of the kernels backend: quantize, dispatch, grouped GEMM, SwiGLU + quantize, grouped GEMM."""
    args = preset("tiny", hidden_size=hidden, moe_intermediate_size=inter)
    num_experts, tokens = 4, 5

    def experts():
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
        idx = torch.randint(0, num_experts, (tokens, 2))
        recv = deepseek_ops.ep.dispatch(deepseek_ops.per_token_group_quant_fp8(x, 128), idx,
                                        torch.rand(tokens, 2), num_experts=num_experts)
        w13, s13 = zip(*[_fp8_weight(2 * inter, hidden) for _ in range(num_experts)])
        w2, s2 = zip(*[_fp8_weight(hidden, inter) for _ in range(num_experts)])
        h = deepseek_ops.grouped_fp8_gemm_contiguous(*recv.recv_x, torch.stack(w13), torch.stack(s13),
                                                     recv.recv_topk_idx)
        act = deepseek_ops.silu_mul_quant_fp8(h, column_major_scales=True)
        deepseek_ops.grouped_fp8_gemm_contiguous(*act, torch.stack(w2), torch.stack(s2), recv.recv_topk_idx)

    assert (grouped_experts_fallback(args) is None) == _accepts(experts)


def _build(args, backend, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.device("meta"):
            model = Transformer(args, backend, **kwargs)
    return model, [str(w.message) for w in caught]


def test_odd_config_warns_once_naming_each_fallback():
    model, caught = _build(preset("tiny", fp8=True, **ODD), "kernels")
    assert len(caught) == 1, caught
    fallbacks = model.kernel_fallbacks()
    assert set(fallbacks) == {
        "mla_cache_append / mla_decode", "fp8_linear model.layers.*.self_attn.q_b_proj",
        "fp8_linear model.layers.*.self_attn.kv_b_proj", "grouped FP8 experts model.layers.*.mlp",
        "fp8_linear model.layers.*.mlp.experts.*.down_proj", "fp8_linear model.layers.*.mlp.shared_experts.down_proj"}
    for op, why in fallbacks.items():
        assert op in caught[0] and why in caught[0]
    assert "K = 192 is not a multiple of 128" in fallbacks["fp8_linear model.layers.*.self_attn.q_b_proj"]
    assert "320 + 32" in fallbacks["mla_cache_append / mla_decode"]


@pytest.mark.parametrize("args", [preset("tiny", fp8=True), preset("tiny", dtype="bfloat16"),
                                  preset("deepseek-v3", num_hidden_layers=2, first_k_dense_replace=1,
                                         n_routed_experts=16)],
                         ids=["tiny-fp8", "tiny-bf16", "v3-dims"])
def test_kernel_shaped_configs_run_fully_on_kernels(args):
    model, caught = _build(args, "kernels")
    assert caught == [] and model.kernel_fallbacks() == {}
    assert model.uses_mla_decode


def test_reference_backend_never_warns():
    model, caught = _build(preset("tiny", fp8=True, **ODD), "reference", fp8_activations=True)
    assert caught == [] and model.kernel_fallbacks() == {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [True, False])
def test_odd_config_on_kernels_gives_the_reference_logits(device, fp8):
    """Prefill, then a paged decode step of 2 tokens; the reference rounds activations to FP8 exactly
    where fp8_linear runs (fp8_activations), so what is left is accumulation order and bf16 rounding.
    12 requests, as in test_model_kernels.test_paged_decode_matches: one activation rounding that
    flips between the backends moves one request's logits by ~1e-3."""
    args = preset("tiny", dtype="bfloat16", fp8=fp8, num_hidden_layers=2, n_routed_experts=8, **ODD)
    ref = random_model(args, device=device)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ker = Transformer(args, "kernels")
        ref_fp8 = Transformer(args, "reference", fp8_activations=True)
    for twin in (ker, ref_fp8):
        twin.load_state_dict(ref.state_dict())
        twin.prepare()
    lengths = torch.tensor([5, 40, 1, 33, 64, 65, 20, 7, 50, 12, 3, 60], device=device)
    batch = lengths.numel()
    block_table, num_blocks = allocate_block_table(batch, 72, device, torch.Generator().manual_seed(0))
    prompts = torch.randint(0, args.vocab_size, (batch, 66), device=device)
    new = torch.randint(0, args.vocab_size, (batch, 2), device=device)
    with torch.no_grad():
        outs = []
        for model in (ref_fp8, ker):
            model.setup_cache(num_blocks, torch.bfloat16)
            logits = prefill(model, prompts, block_table)[0]
            outs.append((logits, decode_one_token(model, new, lengths, block_table)[0]))
    assert calc_diff(outs[0][0], outs[1][0]) < 1e-3, "prefill"
    assert calc_diff(outs[0][1], outs[1][1]) < 1e-3, "decode"
