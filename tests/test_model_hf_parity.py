"""The model computes the public DeepSeek-V3 function: same HF-format weights, same logits as
transformers' DeepseekV3ForCausalLM (skipped when transformers or that class is missing)."""
import pytest
import torch

from deepseek_ops.testing import calc_diff
from model.checkpoint import save_checkpoint
from model.config import preset
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
