"""Hugging Face-format DeepSeek-V3 checkpoints: load (streamed tensor by tensor) and save.

A checkpoint folder holds config.json, *.safetensors shards and (when sharded)
model.safetensors.index.json. Names are the HF ones (model.layers.{i}.self_attn.q_a_proj.weight);
FP8 linears carry `<name>.weight_scale_inv` (fp32, one scale per 128 x 128 block, W ~= W_e4m3 * s);
the MTP module is layer num_hidden_layers, with copies of embed_tokens and the head
(model.layers.{n}.embed_tokens.weight, .shared_head.head.weight) that must equal the main ones.

Loading builds the model on the meta device, then moves each checkpoint tensor, once, into its
place: a checkpoint is never in memory twice, and any error (missing, unexpected, wrongly shaped
or typed tensor) raises before a model is returned.
"""
import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import FP8_BLOCK, ModelArgs, from_hf_config, to_hf_config
from model.model import Linear, RemoteExpert, Transformer

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = ".weight_scale_inv"
FP8 = torch.float8_e4m3fn


class CheckpointError(ValueError):
    pass


def _shard_files(path: Path) -> Dict[str, Path]:
    """checkpoint key -> the shard file holding it (from the index, or by opening every shard)."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: path / name for key, name in weight_map.items()}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"checkpoint {path}: no *.safetensors files")
    files = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            files.update({key: shard for key in f.keys()})
    return files


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
    if (expected.dtype == FP8) != (tensor.dtype == FP8):
        raise CheckpointError(f"tensor {key!r}: expected dtype {expected.dtype}, checkpoint has {tensor.dtype}")
    # A fresh, aligned copy: the shard is memory-mapped, and CPU GEMMs pick kernels by alignment.
    placed = torch.empty(tensor.shape, dtype=expected.dtype, device=device).copy_(tensor)
    setattr(module, attr, nn.Parameter(placed, requires_grad=False))


def load_checkpoint(path: Union[str, Path], backend: str = "reference", attn_impl: str = "absorbed",
                    device="cpu", dtype: Optional[str] = None, args: Optional[ModelArgs] = None,
                    ep_group=None) -> Transformer:
    """Loads a HF-format DeepSeek-V3 folder into a Transformer on `device`.

    args: the config to build (default: from config.json; a different one makes the mismatching
    tensors fail by name). dtype: overrides the float dtype of the weights ("float32" on CPU).
    ep_group: expert parallelism; each rank reads only its own routed experts.
    """
    path = Path(path)
    args = args or read_config(path)
    if dtype is not None:
        args = dataclasses.replace(args, dtype=dtype)
    files = _shard_files(path)
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
        # safetensors refuses tensors that share memory: the MTP copies of embed/head are cloned.
        shared = tensor.data_ptr() in seen
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
