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
    # 160 tokens > original_max_position_embeddings (128): the YaRN frequencies and mscale matter.
    args = preset("tiny", q_lora_rank=q_lora_rank, norm_topk_prob=norm_topk_prob, num_nextn_predict_layers=0)
    ours = random_model(args)
    save_checkpoint(ours, tmp_path)
    theirs, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], f"transformers did not find: {info['missing_keys']}"
    assert not info["unexpected_keys"], f"transformers did not use: {info['unexpected_keys']}"
    tokens = torch.randint(0, args.vocab_size, (2, 160))
    with torch.no_grad():
        ref = theirs.eval()(tokens).logits.double()
        out = ours(tokens)[0].double()
    assert calc_diff(out, ref) < 1e-9, calc_diff(out, ref)
