"""Hugging Face-format DeepSeek-V3 checkpoints: load (streamed tensor by tensor) and save.

A checkpoint folder holds config.json and the weights, as transformers reads them: the shards that
model.safetensors.index.json names, or without an index the one file model.safetensors (other
files in the folder are not read). Names are the HF ones (model.layers.{i}.self_attn.q_a_proj.weight);
FP8 linears carry `<name>.weight_scale_inv` (fp32, one scale per 128 x 128 block, W ~= W_e4m3 * s);
the MTP module is layer num_hidden_layers, with copies of embed_tokens and the head
(model.layers.{n}.embed_tokens.weight, .shared_head.head.weight) that must equal the main ones.
transformers' DeepseekV3ForCausalLM has no MTP module: its save_pretrained keeps
num_nextn_predict_layers in config.json but writes no MTP weights; such a folder loads without MTP.

Loading builds the model on the meta device, then moves each checkpoint tensor, once, into its
place: a checkpoint is never in memory twice, and any error (missing, unexpected, wrongly shaped
or typed tensor) raises before a model is returned.
"""
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import FP8_BLOCK, ModelArgs, from_hf_config, to_hf_config
from model.model import Linear, RemoteExpert, Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = ".weight_scale_inv"
FP8 = torch.float8_e4m3fn


class CheckpointError(ValueError):
    pass


def _shard_files(path: Path) -> Dict[str, Path]:
    """checkpoint key -> the file holding it: the index's weight_map, else every key of model.safetensors."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        # Shard names come from a file we did not write: each must name a file inside the folder.
        root = path.resolve()
        outside = sorted({name for name in weight_map.values() if not (root / name).resolve().is_relative_to(root)})
        if outside:
            raise CheckpointError(f"checkpoint {path}: {INDEX_FILE} names shard(s) outside the checkpoint folder: "
                                  f"{', '.join(outside)}")
        files = {key: path / name for key, name in weight_map.items()}
        absent = sorted({file.name for file in files.values() if not file.exists()})
        if absent:
            raise CheckpointError(f"checkpoint {path}: {INDEX_FILE} names shard(s) that are not there: "
                                  f"{', '.join(absent)}")
        return files
    single = path / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"checkpoint {path}: neither {INDEX_FILE} nor {SINGLE_FILE}")
    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}


def read_config(path: Union[str, Path]) -> ModelArgs:
    config = Path(path) / "config.json"
    if not config.exists():
        raise CheckpointError(f"checkpoint {path}: no config.json")
    return from_hf_config(json.loads(config.read_text()))


def _match_linear_formats(model: Transformer, keys) -> None:
    """Each linear is FP8 exactly when the checkpoint has its weight_scale_inv (V3 keeps a few
    linears, e.g. the MTP eh_proj in some exports, in bf16: the checkpoint decides, per tensor)."""
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or f"{name}.weight" not in keys:
            continue
        fp8 = f"{name}{SCALE_SUFFIX}" in keys
        if fp8 and not module.is_fp8:
            module.weight = nn.Parameter(torch.empty_like(module.weight, dtype=FP8), requires_grad=False)
            shape = (-(-module.out_features // FP8_BLOCK), -(-module.in_features // FP8_BLOCK))
            module.weight_scale_inv = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
        elif not fp8 and module.is_fp8:
            module.weight = nn.Parameter(torch.empty_like(module.weight, dtype=model.args.torch_dtype),
                                         requires_grad=False)
            module.weight_scale_inv = None


def _tied_keys(args: ModelArgs) -> set:
    return {f"model.layers.{args.num_hidden_layers + i}.{suffix}" for i in range(args.num_nextn_predict_layers)
            for suffix in ("embed_tokens.weight", "shared_head.head.weight")}


def _place(module: nn.Module, attr: str, key: str, tensor: torch.Tensor, device) -> None:
    expected = getattr(module, attr)
    if tuple(tensor.shape) != tuple(expected.shape):
        raise CheckpointError(f"tensor {key!r}: expected shape {tuple(expected.shape)}, "
                              f"checkpoint has {tuple(tensor.shape)}")
    # FP8 only into FP8; any other float dtype converts into the model's (e.g. bf16 weights into a float32 model);
    # integer or bool tensors never load as weights.
    same_kind = tensor.dtype == FP8 if expected.dtype == FP8 else tensor.dtype != FP8 and tensor.is_floating_point()
    if not same_kind:
        raise CheckpointError(f"tensor {key!r}: expected dtype {expected.dtype}, checkpoint has {tensor.dtype}")
    # A fresh, aligned copy: the shard is memory-mapped, and CPU GEMMs pick kernels by alignment.
    placed = torch.empty(tensor.shape, dtype=expected.dtype, device=device).copy_(tensor)
    setattr(module, attr, nn.Parameter(placed, requires_grad=False))


def _select_mtp(path: Path, args: ModelArgs, files: Dict[str, Path], mtp: Optional[bool]):
    """(args, files) with or without the MTP layer: mtp=None loads it when the config has one and the
    checkpoint holds its weights (warning when only the config has it), mtp=False never, mtp=True
    always (its weights must be there)."""
    mtp_prefix = f"model.layers.{args.num_hidden_layers}."
    if mtp is None and args.num_nextn_predict_layers and not any(key.startswith(mtp_prefix) for key in files):
        warnings.warn(f"checkpoint {path}: config.json has num_nextn_predict_layers = "
                      f"{args.num_nextn_predict_layers} but the checkpoint holds no MTP weights ({mtp_prefix}*; "
                      "transformers saves none): loading without MTP, so speculative decoding is unavailable",
                      stacklevel=3)
        mtp = False
    if mtp is True and not args.num_nextn_predict_layers:
        raise CheckpointError(f"checkpoint {path}: mtp=True, but its config has num_nextn_predict_layers = 0")
    if mtp is False:
        args = dataclasses.replace(args, num_nextn_predict_layers=0)
        files = {key: file for key, file in files.items() if not key.startswith(mtp_prefix)}
    return args, files


def load_checkpoint(path: Union[str, Path], backend: str = "reference", attn_impl: str = "absorbed",
                    device="cpu", dtype: Optional[str] = None, args: Optional[ModelArgs] = None,
                    ep_group=None, mtp: Optional[bool] = None) -> Transformer:
    """Loads a HF-format DeepSeek-V3 folder into a Transformer on `device`.

    args: the config to build (default: from config.json; a different one makes the mismatching
    tensors fail by name). dtype: overrides the float dtype of the weights ("float32" on CPU).
    ep_group: expert parallelism; each rank reads only its own routed experts.
    mtp: the MTP module (speculative decoding). None: loaded when the checkpoint holds its weights
    (a config that promises MTP without weights, as transformers saves, loads without it and warns);
    False: not loaded (its weights are skipped); True: required.
    """
    path = Path(path)
    args = args or read_config(path)
    if dtype is not None:
        args = dataclasses.replace(args, dtype=dtype)
    args, files = _select_mtp(path, args, _shard_files(path), mtp)
    with torch.device("meta"):
        model = Transformer(args, backend, attn_impl, ep_group=ep_group)
    remote = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, RemoteExpert))
    files = {key: file for key, file in files.items() if not key.startswith(remote)}  # other ranks' experts
    _match_linear_formats(model, files.keys())
    expected = model.state_dict(keep_vars=True)
    tied = _tied_keys(args)
    unexpected = sorted(k for k in files if k not in expected)
    missing = sorted(k for k in expected if k not in files and k not in tied)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(
            f"{what} {len(keys)} tensor(s): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    by_file: Dict[Path, List[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in sorted(keys, key=lambda k: k in tied):  # main copies first
                prefix, attr = key.rsplit(".", 1)
                module = model.get_submodule(prefix)
                if not getattr(module, attr).is_meta:  # a tied copy whose twin is already loaded
                    if not torch.equal(f.get_tensor(key).to(device, getattr(module, attr).dtype), getattr(module, attr)):
                        raise CheckpointError(f"tensor {key!r}: the MTP copy differs from the main model's "
                                              "(shared embedding/head expected)")
                    continue
                _place(module, attr, key, f.get_tensor(key), device)
    still_meta = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta]
    if still_meta:
        raise CheckpointError(f"checkpoint {path}: missing tensor(s): {', '.join(still_meta[:8])}")
    return model.prepare()


def save_checkpoint(model: Transformer, path: Union[str, Path], max_shard_bytes: int = 4 << 30) -> None:
    """Writes config.json, model-0000i-of-0000n.safetensors shards and the index (HF layout)."""
    if any(isinstance(m, RemoteExpert) for m in model.modules()):
        raise ValueError("save_checkpoint: this model holds only its rank's experts (expert parallel); "
                         "save from a model built without ep_group")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(to_hf_config(model.args), indent=2))
    state = model.state_dict()
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size, seen = 0, set()
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        # safetensors refuses tensors that share memory: the MTP copies of embed/head, and FP8 training's
        # expert masters (slices of one stack, model/master_stack.py), are cloned.
        shared = tensor.data_ptr() in seen or tensor.untyped_storage().nbytes() > nbytes
        seen.add(tensor.data_ptr())
        shards[-1][key] = (tensor.clone() if shared else tensor).contiguous().cpu()
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.fspath(path / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2))
