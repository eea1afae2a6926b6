"""The model computes the public DeepSeek-V3 function: same HF-format weights, same logits as
transformers' DeepseekV3ForCausalLM, whichever of the two wrote the checkpoint (transformers is a
test dependency, pinned in setup.py; skipped only where it or that class is missing)."""
import pytest
import torch

from deepseek_ops.testing import calc_diff
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.generate import generate
from model.model import random_model

transformers = pytest.importorskip("transformers")
DeepseekV3ForCausalLM = getattr(transformers, "DeepseekV3ForCausalLM", None)
pytestmark = pytest.mark.skipif(DeepseekV3ForCausalLM is None, reason="transformers has no DeepseekV3ForCausalLM")


@pytest.mark.parametrize("q_lora_rank,norm_topk_prob", [(128, True), (0, False)])
def test_logits_match_transformers(tmp_path, q_lora_rank, norm_topk_prob):
    # Both models run in float64. In float32 they round differently by ~1e-7, which flips the experts
    # of a token whose gate scores are that close to a tie (rare, but one CI run failed so, calc_diff
    # 6e-5). transformers' grouped-mm experts take no float64, hence its eager experts.
    # 160 tokens > original_max_position_embeddings (128): the YaRN frequencies and mscale matter.
    args = preset("tiny", q_lora_rank=q_lora_rank, norm_topk_prob=norm_topk_prob, num_nextn_predict_layers=0,
                  dtype="float64")
    ours = random_model(args)
    save_checkpoint(ours, tmp_path)
    theirs, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, output_loading_info=True,
                                                         experts_implementation="eager")
    assert not info["missing_keys"], f"transformers did not find: {info['missing_keys']}"
    assert not info["unexpected_keys"], f"transformers did not use: {info['unexpected_keys']}"
    tokens = torch.randint(0, args.vocab_size, (2, 160))
    with torch.no_grad():
        ref = theirs.eval()(tokens).logits
        out = ours(tokens)[0]
    # ~2e-15: what is left is our float32 logits (the model's output dtype, as in DeepSeek's reference).
    assert calc_diff(out, ref) < 1e-12, calc_diff(out, ref)


def test_transformers_saved_checkpoint_loads_with_the_same_logits(tmp_path):
    """The other direction, as a user meets it: a checkpoint that transformers wrote (no MTP weights,
    though its config.json says num_nextn_predict_layers 1; newer fields such as qk_head_dim), loaded
    by our loader; both models in float64 (see above), YaRN on (72 tokens > 64 original positions)."""
    config = transformers.DeepseekV3Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=3, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
        n_group=4, topk_group=2, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0})
    assert config.num_nextn_predict_layers == 1
    theirs = DeepseekV3ForCausalLM(config)
    with torch.no_grad():  # transformers' init leaves the router bias at 0 and the norms at 1: randomize all
        for name, param in theirs.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("e_score_correction_bias"):
                param.copy_(0.05 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * param.shape[-1] ** -0.5)
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = load_checkpoint(tmp_path, dtype="float64")
    assert ours.mtp is None
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, experts_implementation="eager")
    tokens = torch.randint(0, config.vocab_size, (2, 72))
    with torch.no_grad():
        ref = theirs.eval()(tokens).logits
        out = ours(tokens)[0]
    assert calc_diff(out, ref) < 1e-12, calc_diff(out, ref)
    assert len(generate(ours, [[1, 2, 3]], 4)[0][0]) == 4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_transformers_saved_checkpoint_runs_on_both_backends(tmp_path, device):
    """A transformers-saved folder with kernel-shaped dims (MLA latent 512 + 64): the kernels backend
    (prefill attention on SDPA, the paged cache on mla_cache_append / mla_decode) gives the reference
    backend's logits and generates. Loaded in float32: in bfloat16 the two attention orders round
    differently enough to flip near-tied expert choices (calc_diff up to ~1.4e-3 seen)."""
    config = transformers.DeepseekV3Config(
        vocab_size=320, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        initializer_range=0.05)
    DeepseekV3ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights"):
        ref = load_checkpoint(tmp_path, "reference", device=device, dtype="float32")
    with pytest.warns(UserWarning, match="no MTP weights"):
        ker = load_checkpoint(tmp_path, "kernels", device=device, dtype="float32")
    assert ker.kernel_fallbacks() == {} and ker.uses_mla_decode
    tokens = torch.randint(0, config.vocab_size, (2, 40), device=device)
    with torch.no_grad():
        assert calc_diff(ker(tokens)[0], ref(tokens)[0]) < 1e-3
    for model in (ref, ker):
        (out,), _ = generate(model, [[1, 2, 3, 4]], 6)
        assert len(out) == 6 and all(0 <= t < config.vocab_size for t in out)
