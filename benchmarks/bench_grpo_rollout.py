"""GRPO rollout throughput: our generation against transformers' `generate`, same weights (H200).

Model: the grpo-h200 preset with random float weights, saved by model/checkpoint.py in HF format.
Ours (impl deepseek_ops): the rollout sampler of model/grpo_rollout.py, backend "kernels" with FP8
linears quantized from those weights (fp8_linear, grouped FP8 expert GEMMs, mla_decode on the bf16
paged cache) through model/generate.py, the prefill and decode steps replayed from CUDA graphs as
GRPO's rollouts do (model/step_graphs.py; captured at the first call of a shape, then reused). Peer
(transformers): DeepseekV3ForCausalLM.from_pretrained of the same folder in bf16, `generate(do_sample=True)` with the same temperature 1, no top-k / top-p,
exactly new_tokens per row (neither side stops at eos: ours is called without eos_id, so every
rollout decodes the full length). Rows: B prompts x G samples of prompt_len random byte tokens.

Figure: wall-clock ms of one whole rollout (prefill + new_tokens decode steps, host included:
that is what a GRPO step waits for), median of several rollouts, both impls in two rounds with the
order reversed; tokens/s = B * G * new_tokens / that time, printed. error: calc_diff of our
sampler's prefill logits against transformers' (FP8 weights and activations against bf16: small,
not zero); above MAX_DIFF the shape is not timed.
"""
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import torch

from benchmarks.report import OURS, Record
from deepseek_ops.testing import calc_diff
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.generate import allocate_block_table, generate, prefill
from model.grpo_rollout import build_sampler, uses_cuda_graph
from model.model import random_model

# (B, G, prompt_len, new_tokens): a GRPO step of the arithmetic task, and longer answers.
SHAPES = [(64, 8, 12, 9), (64, 8, 12, 128), (16, 8, 12, 128)]
QUICK_SHAPES = SHAPES[:1]
ROLLOUTS = 5
MAX_DIFF = 0.05  # FP8 against bf16 through the whole model; a wrong kernel is far above


def build_pair(preset_name: str, device: str, dtype: torch.dtype):
    """(our sampler, transformers' model) on the same random weights, in eval mode."""
    from transformers import DeepseekV3ForCausalLM

    args = preset(preset_name, fp8=False, dtype="float32")
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(random_model(args, seed=0), folder)
        policy = load_checkpoint(folder, "reference", device=device)
        backend, fp8 = ("kernels", True) if device == "cuda" else ("reference", False)
        ours = build_sampler(policy, backend, fp8, str(dtype).removeprefix("torch."))
        theirs = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return ours, theirs


def rollout_fns(ours, theirs, prompts: torch.Tensor, group: int, new_tokens: int) -> Dict[str, Callable[[], object]]:
    rows = prompts.repeat_interleave(group, dim=0)  # [B * G, prompt_len]
    prompt_lists = rows.tolist()

    def ours_fn():
        return generate(ours, prompt_lists, new_tokens, temperature=1.0, seed=0, cuda_graph=uses_cuda_graph(ours))

    def theirs_fn():
        with torch.no_grad():
            return theirs.generate(rows, attention_mask=torch.ones_like(rows), do_sample=True, temperature=1.0,
                                   top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   pad_token_id=ours.args.eos_token_id)

    return {OURS: ours_fn, "transformers": theirs_fn}


def prefill_error(ours, theirs, prompts: torch.Tensor) -> float:
    """calc_diff of our prefill logits [B, prompt_len, V] against transformers'."""
    block_table, num_blocks = allocate_block_table(prompts.shape[0], prompts.shape[1], prompts.device)
    ours.setup_cache(num_blocks)
    with torch.no_grad():
        mine = prefill(ours, prompts, block_table)[0]
        ref = theirs(prompts).logits
    return calc_diff(mine.double(), ref.double())


def _wall_ms(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(ours, theirs, batch: int, group: int, prompt_len: int, new_tokens: int, device: str,
            rollouts: int = ROLLOUTS) -> List[Record]:
    prompts = torch.randint(0, 256, (batch, prompt_len), device=device)
    shape = {"B": batch, "G": group, "prompt_len": prompt_len, "new_tokens": new_tokens}
    error = prefill_error(ours, theirs, prompts)
    if error > MAX_DIFF:
        raise AssertionError(f"grpo_rollout {shape}: our prefill logits differ from transformers' by calc_diff "
                             f"{error:.2e} > {MAX_DIFF}; not timed")
    fns = rollout_fns(ours, theirs, prompts, group, new_tokens)
    for fn in fns.values():  # warm-up: lazy init, allocator growth
        fn()
    times: Dict[str, List[float]] = {impl: [] for impl in fns}
    for order in (list(fns), list(fns)[::-1]):
        for impl in order:
            times[impl] += [_wall_ms(fns[impl], device) for _ in range(rollouts)]
    records = []
    for impl, ms in times.items():
        median = statistics.median(ms)
        tokens_per_s = batch * group * new_tokens / (median * 1e-3)
        print(f"grpo_rollout {shape} {impl:>13}: {median:9.1f} ms  {tokens_per_s:10.0f} tokens/s", flush=True)
        records.append(Record("grpo_rollout", dict(shape), impl, median, error=error if impl == OURS else None))
    ratio = records[1].median_ms / records[0].median_ms
    print(f"grpo_rollout {shape}: ours {ratio:.2f}x transformers' tokens/s", flush=True)
    return records


def run(quick: bool = False) -> List[Record]:
    ours, theirs = build_pair("grpo-h200", "cuda", torch.bfloat16)
    records: List[Record] = []
    for batch, group, prompt_len, new_tokens in QUICK_SHAPES if quick else SHAPES:
        records += measure(ours, theirs, batch, group, prompt_len, new_tokens, "cuda")
    return records
