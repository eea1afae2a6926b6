"""HF-format checkpoints: exact round trip (float and FP8, sharded), clear errors, config mapping."""
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import ModelArgs, from_hf_config, preset, to_hf_config
from model.generate import generate
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
        load_checkpoint(saved, args=preset("tiny", num_hidden_layers=4), mtp=True)
    # Without mtp=True, no layer 4 reads as "no MTP weights"; the MTP layer 3 then cannot be main layer 3.
    with pytest.warns(UserWarning, match="no MTP weights"), pytest.raises(
            CheckpointError, match=r"unexpected .*model\.layers\.3\.eh_proj"):
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


def _rewrite(path, keep):
    """Keeps only the tensors whose key passes keep(key), in every shard and in the index."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    for name in set(index["weight_map"].values()):
        save_file({k: t for k, t in load_file(path / name).items() if keep(k)}, path / name)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if keep(k)}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)[0]


def test_config_with_mtp_but_no_mtp_weights_loads_without_it(tmp_path):
    """What transformers' save_pretrained writes: num_nextn_predict_layers 1, no layer-3 (MTP) tensors."""
    model = random_model(preset("tiny"))
    save_checkpoint(model, tmp_path)
    _rewrite(tmp_path, lambda key: not key.startswith("model.layers.3."))
    with pytest.warns(UserWarning) as caught:
        loaded = load_checkpoint(tmp_path)
    assert [str(w.message) for w in caught if "MTP" in str(w.message)] == [str(caught[0].message)]
    assert "no MTP weights" in str(caught[0].message) and "speculative decoding" in str(caught[0].message)
    assert loaded.mtp is None and loaded.args.num_nextn_predict_layers == 0
    tokens = torch.randint(0, model.args.vocab_size, (2, 9))
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))
    with pytest.raises(ValueError, match="use_mtp=True needs the MTP module"):
        generate(loaded, [[1, 2, 3]], 4, use_mtp=True)
    assert len(generate(loaded, [[1, 2, 3]], 4)[0][0]) == 4
    with pytest.raises(CheckpointError, match=r"missing .*model\.layers\.3\."):
        load_checkpoint(tmp_path, mtp=True)


def test_mtp_false_skips_the_mtp_weights(saved, recwarn):
    full = load_checkpoint(saved)
    lean = load_checkpoint(saved, mtp=False)
    assert not [w for w in recwarn if "MTP" in str(w.message)]
    assert full.mtp is not None and lean.mtp is None
    assert not any(key.startswith("model.layers.3.") for key in lean.state_dict())
    tokens = torch.randint(0, full.args.vocab_size, (2, 9))
    assert torch.equal(_logits(full, tokens), _logits(lean, tokens))


def test_mtp_true_needs_a_config_with_mtp(tmp_path):
    save_checkpoint(random_model(preset("tiny", num_nextn_predict_layers=0)), tmp_path)
    assert load_checkpoint(tmp_path).mtp is None
    with pytest.raises(CheckpointError, match="mtp=True.*num_nextn_predict_layers = 0"):
        load_checkpoint(tmp_path, mtp=True)


def test_only_the_checkpoint_files_are_read(saved):
    """As transformers reads: the index's shards, else model.safetensors; other files are not weights."""
    save_file({"activations": torch.zeros(3)}, saved / "activations.safetensors")
    expected = load_checkpoint(saved).state_dict()
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in set(index["weight_map"].values()):
        tensors.update(load_file(saved / name))
        (saved / name).unlink()
    (saved / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        load_checkpoint(saved)
    save_file(tensors, saved / "model.safetensors")
    loaded = load_checkpoint(saved).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_index_naming_an_absent_shard(saved):
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    (saved / next(iter(index["weight_map"].values()))).unlink()
    with pytest.raises(CheckpointError, match="names shard.*not there: model-00001-of-00001.safetensors"):
        load_checkpoint(saved)


def test_integer_tensor_does_not_load_as_a_float_weight(saved):
    _edit_shard(saved, lambda t: t.update({"model.layers.1.self_attn.o_proj.weight":
                                           torch.randint(-5, 5, (256, 512), dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*expected dtype torch\.float32.*torch\.int32"):
        load_checkpoint(saved)


def test_bfloat16_weights_convert_into_a_float32_model(saved):
    key = "model.layers.1.self_attn.o_proj.weight"
    _edit_shard(saved, lambda t: t.update({key: t[key].to(torch.bfloat16)}))
    weight = load_checkpoint(saved).state_dict()[key]
    assert weight.dtype == torch.float32
    assert torch.equal(weight, load_file(saved / json.loads((saved / "model.safetensors.index.json").read_text())
                                         ["weight_map"][key])[key].float())


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_shards_stay_inside_the_folder(saved, shard):
    outside = saved.parent / "outside.safetensors"
    save_file({"model.norm.weight": torch.ones(256)}, outside)  # a real file: only the path may fail
    index_path = saved / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"outside the checkpoint folder: {re.escape(shard)}"):
        load_checkpoint(saved)


def test_hf_config_qk_head_dim_and_rope_interleave():
    hf = to_hf_config(preset("tiny"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known field: no "unknown field" warning
        assert from_hf_config({**hf, "qk_head_dim": 192}) == preset("tiny")  # 128 + 64
    with pytest.raises(ValueError, match=r"'qk_head_dim' = 200 is inconsistent.*128 \+ 64 = 192"):
        from_hf_config({**hf, "qk_head_dim": 200})
    with pytest.raises(ValueError, match="'rope_interleave'"):
        from_hf_config({**hf, "rope_interleave": False})
