"""A thin DeepSeek-V3 on deepseek_ops (nanoGPT / gpt-fast style).

    model/config.py      ModelArgs (HF config.json field names), presets ("tiny", "deepseek-v3", ...),
                         from_hf_config / to_hf_config
    model/model.py       the architecture, top to bottom: MLA (q-LoRA or plain q, kv-LoRA, decoupled
                         RoPE with YaRN), dense SwiGLU and DeepSeekMoE layers, the MTP module;
                         backend "reference" (plain PyTorch, CPU ok) or "kernels" (our ops)
    model/kernel_fallbacks.py  which ops of the kernels backend a config's shapes allow (others run
                         the reference math)
    model/checkpoint.py  HF-format load (streamed, meta-device build, named errors; the folders
                         transformers writes, without MTP weights, too) and save
    model/generate.py    batched generation on the paged latent cache, greedy / top-p, MTP
                         self-speculative decoding; `python -m model.generate --help`
    model/train.py       pre-training: next-token + MTP loss, auxiliary-loss-free balancing, AdamW on
                         fp32 masters, bf16 or FP8 (deepseek_ops.fp8_linear), DDP; `python -m model.train`
    model/train_history.py  a run's record (history.json: per-step losses and times, validation)
    model/train_report.py   FP8 against bf16 from two runs' histories: plot, relative difference,
                         the train_step benchmark records; `python -m model.train_report`
    model/data.py        the corpus: Python's standard library sources as bytes, split by file

Quick start (CPU, random tiny model):
    python -m model.generate --prompt "Hello" --max-new-tokens 16 --mtp
    from model import load_checkpoint, random_model
    from model.generate import generate  # (model.generate stays the module: not re-exported here)
    m = load_checkpoint("/path/to/DeepSeek-V3", backend="kernels", device="cuda")

Conventions worth knowing: RoPE rotates interleaved pairs (DeepSeek's inference code); HF's
rope_interleave=True computes the same attention (see model/model.py). YaRN frequencies and the
mscale^2 softmax factor apply when rope_factor > 1 and max_position_embeddings exceeds
original_max_position_embeddings. FP8 weights are W ~= W_e4m3 * weight_scale_inv per 128 x 128 block.
"""
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import ModelArgs, from_hf_config, preset, to_hf_config
from model.model import Transformer, random_model

__all__ = ["CheckpointError", "ModelArgs", "Transformer", "from_hf_config", "load_checkpoint", "preset",
           "random_model", "save_checkpoint", "to_hf_config"]
