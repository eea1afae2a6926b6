"""ModelArgs: the DeepSeek-V3 hyper-parameters, named presets, and the Hugging Face config mapping.

Field names follow the Hugging Face `config.json` of deepseek-ai/DeepSeek-V3 so a config round
trips without a translation table; `from_hf_config` / `to_hf_config` do the (small) rest.
"""
import dataclasses
import math
import warnings
from typing import Any, Dict, Optional

import torch

from deepseek_ops.constants import MLA_PAGE_SIZE as PAGE_SIZE  # tokens per page of the paged latent cache

# float64 serves parity tests against other implementations (no rounding differences to flip a routing tie).
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "float64": torch.float64}
FP8_BLOCK = 128  # DeepSeek-V3 FP8 checkpoints scale weights per 128 x 128 block


@dataclasses.dataclass
class ModelArgs:
    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 512  # dense SwiGLU layers
    moe_intermediate_size: int = 128  # each routed and shared expert
    num_hidden_layers: int = 3
    first_k_dense_replace: int = 1  # the first k layers are dense, the rest MoE
    num_attention_heads: int = 4
    # MLA: q through a rank-q_lora_rank bottleneck (0: one plain q_proj), k/v through kv_lora_rank.
    q_lora_rank: int = 128
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE routing.
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # RoPE with YaRN (applied when factor > 1 and max_position_embeddings > original_max_position_embeddings).
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 128
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1  # MTP modules (0 or 1 supported)
    bos_token_id: Optional[int] = 256
    eos_token_id: Optional[int] = 257
    # Storage: dtype of every float weight; fp8 = linear weights in e4m3 with 128 x 128 block scales.
    dtype: str = "float32"
    fp8: bool = False

    def __post_init__(self):
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def uses_yarn(self) -> bool:
        return self.rope_factor > 1 and self.max_position_embeddings > self.original_max_position_embeddings

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (mscale = 0.1 * mscale_all_dim * ln(factor) + 1)."""
        scale = self.qk_head_dim ** -0.5
        if self.uses_yarn and self.mscale_all_dim:
            mscale = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= mscale * mscale
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def validate(self):
        def need(cond: bool, field: str, why: str):
            if not cond:
                raise ValueError(f"ModelArgs.{field} = {getattr(self, field)!r}: {why}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "n_routed_experts",
                  "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"):
            need(getattr(self, f) > 0, f, "must be positive")
        need(self.q_lora_rank >= 0, "q_lora_rank", "must be >= 0 (0: plain q projection)")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             "must be positive and even (RoPE rotates pairs)")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        need(self.n_routed_experts % self.n_group == 0, "n_group",
             f"must divide n_routed_experts={self.n_routed_experts}")
        need(self.n_routed_experts // self.n_group >= 2, "n_group",
             "each group needs >= 2 experts (group score = sum of its top-2 expert scores)")
        need(self.topk_group <= self.n_group, "topk_group", f"must be <= n_group={self.n_group}")
        need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
             "num_experts_per_tok", "must fit in the topk_group selected groups")
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers", "only 0 or 1 MTP module is supported")
        need(self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
        need(self.rope_factor >= 1, "rope_factor", "must be >= 1")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


PRESETS: Dict[str, ModelArgs] = {
    # Small enough for CPU tests, yet kernel-shaped: every GEMM K a multiple of 128, the MLA
    # latent 512 + 64 as mla_decode needs.
    "tiny": ModelArgs(),
    "deepseek-v3": ModelArgs(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_theta=10000.0, rope_factor=40.0, original_max_position_embeddings=4096,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, max_position_embeddings=163840,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, dtype="bfloat16", fp8=True),
    # The GRPO policy on the H200 (model/grpo.py), ~50M parameters: every width the kernels cover in
    # full (hidden and expert widths multiples of 128, the MLA latent 512 + 64), byte tokens + bos/eos
    # in a 384-entry vocabulary, plain RoPE over short arithmetic sequences.
    "grpo-h200": ModelArgs(
        vocab_size=384, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=6,
        first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, rope_factor=1.0, max_position_embeddings=256, num_nextn_predict_layers=0,
        bos_token_id=256, eos_token_id=257, dtype="bfloat16", fp8=True),
    # The FP8-against-bf16 training experiment on one H200 (model/train.py): 150.5M parameters, 75.0M
    # active per token (tests/test_train.py counts them). DeepSeek-V3's layout (MLA with q and kv LoRA
    # and decoupled RoPE; one dense layer, then MoE with a shared expert and 16 fine-grained routed
    # experts, group-limited top-4; one MTP module) with every width a multiple of 128, so that every
    # linear but the head and eh_proj trains in FP8. The MLA latent is therefore 384 + 128 (kv_a_proj's
    # 512 outputs) instead of V3's 512 + 64 (576, which the FP8 backward cannot take): mla_decode does
    # not serve this model; training does not need it. Byte tokens + bos/eos in a 384-entry vocabulary
    # (model/data.py); fp32 masters, as training keeps them.
    "train-h200": ModelArgs(
        vocab_size=384, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256, num_hidden_layers=8,
        first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=384, qk_nope_head_dim=128,
        qk_rope_head_dim=128, v_head_dim=128, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, rope_factor=1.0, max_position_embeddings=2048, num_nextn_predict_layers=1,
        bos_token_id=256, eos_token_id=257, dtype="float32", fp8=False),
}


def preset(name: str = "tiny", **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# HF config.json fields that carry no model-math meaning for us (read and ignored silently).
_HF_IGNORED = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "use_cache",
    "initializer_range", "attention_dropout", "pretraining_tp", "tie_word_embeddings", "num_key_value_heads",
    "moe_layer_freq", "ep_size", "aux_loss_alpha", "seq_aux", "output_router_logits", "pad_token_id",
    "dtype", "router_aux_loss_coef", "head_dim", "num_mtp_layers",
}
# Fields whose only supported value is fixed by the architecture: value -> why.
_HF_FIXED = {
    "hidden_act": ("silu", "only SwiGLU (silu) MLPs"),
    "scoring_func": ("sigmoid", "only the sigmoid gate of DeepSeek-V3"),
    "topk_method": ("noaux_tc", "only the auxiliary-loss-free noaux_tc routing of DeepSeek-V3"),
    "attention_bias": (False, "MLA projections have no bias"),
    "rope_interleave": (True, "RoPE on interleaved pairs, the layout of DeepSeek-V3's weights"),
}
_ROPE_FIELDS = {"factor": "rope_factor", "original_max_position_embeddings": "original_max_position_embeddings",
                "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
                "mscale_all_dim": "mscale_all_dim"}


def from_hf_config(config: Dict[str, Any]) -> ModelArgs:
    """ModelArgs from a Hugging Face DeepSeek-V3 config.json dict.

    Unknown fields are ignored with a warning; unsupported values raise ValueError naming the field.
    """
    own = {f.name for f in dataclasses.fields(ModelArgs)}
    kwargs: Dict[str, Any] = {}
    for key, value in config.items():
        if key in _HF_FIXED:
            expected, why = _HF_FIXED[key]
            if value != expected:
                raise ValueError(f"config field {key!r} = {value!r} is unsupported: {why} (expected {expected!r})")
        elif key in ("rope_scaling", "rope_parameters"):
            kwargs.update(_rope_from_hf(key, value))
        elif key == "quantization_config":
            kwargs["fp8"] = _fp8_from_hf(value)
        elif key == "q_lora_rank":
            kwargs["q_lora_rank"] = 0 if value is None else int(value)
        elif key == "qk_head_dim":
            _check_qk_head_dim(config, value)
        elif key == "eos_token_id" and isinstance(value, list):
            kwargs["eos_token_id"] = value[0] if value else None
        elif key in own:
            kwargs[key] = value
        elif key not in _HF_IGNORED:
            warnings.warn(f"config field {key!r} is unknown to deepseek-ops' model and is ignored", stacklevel=2)
    if "rope_theta" in (config.get("rope_parameters") or {}):
        kwargs["rope_theta"] = config["rope_parameters"]["rope_theta"]
    kwargs.setdefault("rope_factor", 1.0)  # no rope_scaling: plain RoPE
    dtype = config.get("torch_dtype", config.get("dtype", "bfloat16"))
    kwargs.setdefault("dtype", dtype if dtype in DTYPES else "bfloat16")
    kwargs.setdefault("fp8", False)
    return ModelArgs(**kwargs)


def _check_qk_head_dim(config: Dict[str, Any], value: Any) -> None:
    """Newer configs state the q/k head dim; ours is derived, so the stated one must agree."""
    nope, rope = config.get("qk_nope_head_dim"), config.get("qk_rope_head_dim")
    if nope is None or rope is None:
        raise ValueError(f"config field 'qk_head_dim' = {value!r} needs 'qk_nope_head_dim' and 'qk_rope_head_dim' "
                         "beside it (the head dim is their sum)")
    if value != nope + rope:
        raise ValueError(f"config field 'qk_head_dim' = {value!r} is inconsistent: expected qk_nope_head_dim + "
                         f"qk_rope_head_dim = {nope} + {rope} = {nope + rope}")


def _rope_from_hf(key: str, rope: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if not rope:
        return {"rope_factor": 1.0}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_factor": 1.0}
    if kind != "yarn":
        raise ValueError(f"config field {key!r}: rope type {kind!r} is unsupported (expected 'yarn' or none)")
    out = {ours: float(rope[hf]) for hf, ours in _ROPE_FIELDS.items() if rope.get(hf) is not None}
    if "original_max_position_embeddings" in out:
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return out


def _fp8_from_hf(q: Optional[Dict[str, Any]]) -> bool:
    if not q:
        return False
    if q.get("quant_method") != "fp8":
        raise ValueError(f"config field 'quantization_config': quant_method {q.get('quant_method')!r} is "
                         "unsupported (expected 'fp8')")
    if list(q.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])) != [FP8_BLOCK, FP8_BLOCK]:
        raise ValueError(f"config field 'quantization_config': weight_block_size {q['weight_block_size']} is "
                         f"unsupported (expected [{FP8_BLOCK}, {FP8_BLOCK}])")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"config field 'quantization_config': fmt {q['fmt']!r} is unsupported (expected 'e4m3')")
    return True


def to_hf_config(args: ModelArgs) -> Dict[str, Any]:
    """The config.json of a Hugging Face DeepSeek-V3 checkpoint for these args."""
    own = dataclasses.asdict(args)
    hf = {k: v for k, v in own.items() if k not in {"dtype", "fp8", "q_lora_rank", "rope_factor"} | set(
        _ROPE_FIELDS.values())}
    hf.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", torch_dtype=args.dtype,
              q_lora_rank=args.q_lora_rank or None, hidden_act="silu", scoring_func="sigmoid",
              topk_method="noaux_tc", attention_bias=False, tie_word_embeddings=False,
              num_key_value_heads=args.num_attention_heads, rope_interleave=True)
    if args.rope_factor > 1:
        hf["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": args.rope_factor,
                              **{hf_name: getattr(args, ours) for hf_name, ours in _ROPE_FIELDS.items()
                                 if hf_name != "factor"}}
    if args.fp8:
        hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    return hf
