"""HF-format checkpoints: exact round trip (float and FP8, sharded), clear errors, config mapping."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import ModelArgs, from_hf_config, preset, to_hf_config
from model.model import random_model


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("dtype,fp8", [("float32", False), ("bfloat16", True)])
def test_round_trip_is_exact(tmp_path, dtype, fp8):
    model = random_model(preset("tiny", dtype=dtype, fp8=fp8))
    save_checkpoint(model, tmp_path, max_shard_bytes=4 << 20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert "model.layers.0.self_attn.q_a_proj.weight" in index["weight_map"]
    assert ("model.layers.0.self_attn.q_a_proj.weight_scale_inv" in index["weight_map"]) == fp8
    assert "model.layers.3.eh_proj.weight" in index["weight_map"]  # MTP = layer num_hidden_layers
    loaded = load_checkpoint(tmp_path)
    assert loaded.args == model.args
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(_bits(a[key]), _bits(b[key])), key
    tokens = torch.randint(0, model.args.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], loaded(tokens)[0])


def _edit_shard(path, edit):
    """Applies edit(dict) to the shard holding model.layers.1 tensors and rewrites it."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = index["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    tensors = load_file(path / name)
    edit(tensors)
    save_file(tensors, path / name)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name} | {k: name for k in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture
def saved(tmp_path):
    save_checkpoint(random_model(preset("tiny")), tmp_path)
    return tmp_path


def test_missing_tensor_is_named(saved):
    _edit_shard(saved, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing .*model\.layers\.1\.self_attn\.o_proj\.weight"):
        load_checkpoint(saved)


def test_unexpected_tensor_is_named(saved):
    _edit_shard(saved, lambda t: t.update({"model.layers.1.mystery.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected .*model\.layers\.1\.mystery\.weight"):
        load_checkpoint(saved)


def test_wrong_shape_is_named(saved):
    _edit_shard(saved, lambda t: t.update({"model.layers.1.self_attn.o_proj.weight": torch.zeros(256, 500)}))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*expected shape \(256, 512\).*\(256, 500\)"):
        load_checkpoint(saved)


def test_checkpoint_for_a_different_config(saved):
    with pytest.raises(CheckpointError, match=r"q_a_proj\.weight.*expected shape"):
        load_checkpoint(saved, args=preset("tiny", q_lora_rank=256))
    with pytest.raises(CheckpointError, match=r"missing .*model\.layers\.4"):
        load_checkpoint(saved, args=preset("tiny", num_hidden_layers=4))


def test_mtp_copy_of_embedding_must_match(saved):
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    name = index["weight_map"]["model.layers.3.embed_tokens.weight"]
    tensors = load_file(saved / name)
    tensors["model.layers.3.embed_tokens.weight"] = tensors["model.layers.3.embed_tokens.weight"] + 1
    save_file(tensors, saved / name)
    with pytest.raises(CheckpointError, match="MTP copy differs"):
        load_checkpoint(saved)


def test_hf_config_round_trip_and_v3_preset():
    for name in ("tiny", "deepseek-v3"):
        args = preset(name)
        assert from_hf_config(json.loads(json.dumps(to_hf_config(args)))) == args
    v3 = preset("deepseek-v3")
    # YaRN: mscale = 0.1 * ln(40) + 1; softmax scale = 192^-0.5 * mscale^2
    assert v3.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * torch.tensor(40.0).log().item() + 1) ** 2)
    assert preset("tiny", q_lora_rank=0).q_lora_rank == 0


def test_hf_config_unknown_field_warns_and_bad_values_name_the_field():
    hf = to_hf_config(preset("tiny"))
    with pytest.warns(UserWarning, match="'shiny_new_field'"):
        from_hf_config({**hf, "shiny_new_field": 3})
    with pytest.raises(ValueError, match="'scoring_func'"):
        from_hf_config({**hf, "scoring_func": "softmax"})
    with pytest.raises(ValueError, match="'hidden_act'"):
        from_hf_config({**hf, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="'rope_scaling'"):
        from_hf_config({**hf, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="weight_block_size"):
        from_hf_config({**hf, "quantization_config": {"quant_method": "fp8", "weight_block_size": [1, 128]}})
    with pytest.raises(ValueError, match="n_group"):
        from_hf_config({**hf, "n_group": 3})
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        ModelArgs(num_nextn_predict_layers=2)
