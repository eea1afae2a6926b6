"""One full-width DeepSeek-V3 MoE decoder layer: kernels backend vs the reference backend (H200).

Layer: hidden 7168, 128 heads, q_lora 1536, kv_lora 512, 256 routed experts top-8 + 1 shared,
expert inter 2048, FP8 weights (~11 GB). Shapes: decode steps with B in {1, 32, 128} requests of
4096-token contexts (s_q = 1; the cache holds random latents: attention time does not depend on
values), and a 4096-token prefill (B = 1).
Impls: deepseek_ops = backend "kernels" (fp8_linear, ep.dispatch/combine + grouped FP8 GEMMs,
mla_decode on the paged cache); torch = backend "reference" on the GPU with bf16 dequantized
weights, PyTorch attention and the Python expert loop. Both run in this process on the same
inputs; error = calc_diff of ours against the reference with fp8_activations (what the FP8
kernels compute). Records: decoder_layer (attention + MoE block, residuals and norms included)
and moe_layer (the MoE alone). A per-op breakdown of the kernels backend is printed per shape.
Also printed: tiny-model generation tokens/s on this GPU and on the CPU.
"""
from typing import Callable, Dict, List

import pytest
import torch

from benchmarks.report import OURS, Record
from benchmarks.timing import bench, pytest_benchmark
import deepseek_ops
from deepseek_ops.testing import calc_diff
from model.config import preset
from model.generate import allocate_block_table, generate
from model.model import MoE, Transformer, init_random_, random_model

CONTEXT = 4096
DECODE_BATCHES = [1, 32, 128]
PREFILL_TOKENS = 4096


def layer_args(name: str = "deepseek-v3"):
    """One MoE layer of the preset (the embedding and head are not timed: a small vocabulary)."""
    return preset(name, num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0, vocab_size=256,
                  dtype="bfloat16", fp8=True)


def full_layer_models(args=None, device="cuda"):
    """{kernels, reference (bf16 dequantized), reference_fp8_act}: the same random FP8 layer."""
    args = args or layer_args()
    with torch.device(device):
        kernels = Transformer(args, "kernels")
    init_random_(kernels)
    models = {"kernels": kernels}
    for name, fp8_act in (("reference", False), ("reference_fp8_act", True)):
        with torch.device("meta"):
            twin = Transformer(args, "reference", fp8_activations=fp8_act)
        twin.load_state_dict(kernels.state_dict(), assign=True)  # shares the FP8 weights
        models[name] = twin.prepare()
    models["reference"].dequantize_(torch.bfloat16)  # the torch peer: bf16 dequantized weights
    return models


def _fill_cache(models, batch: int, context: int = CONTEXT, device="cuda"):
    block_table, num_blocks = allocate_block_table(batch, context, device, torch.Generator().manual_seed(0))
    args = models["kernels"].args
    cache = torch.randn(num_blocks, 64, 1, args.kv_lora_rank + args.qk_rope_head_dim, device=device,
                        dtype=torch.bfloat16)
    for model in models.values():
        model.setup_cache(num_blocks, torch.bfloat16)
        model.main_layers[0].self_attn.kv_cache.copy_(cache)
    return block_table


def _breakdown(model: Transformer, x: torch.Tensor, ctx) -> Dict[str, float]:
    """Median ms of each piece of the kernels layer, run on its own with the layer's inputs."""
    layer, args = model.main_layers[0], model.args
    attn, moe = layer.self_attn, layer.mlp
    num_experts = args.n_routed_experts
    h = layer.input_layernorm(x)
    parts: Dict[str, Callable[[], object]] = {"attention (MLA block)": lambda: attn(h, ctx)}
    if ctx.decode:
        q = torch.randn(x.shape[0], x.shape[1], args.num_attention_heads, args.kv_lora_rank + args.qk_rope_head_dim,
                        device=x.device, dtype=torch.bfloat16)
        seqlens = (ctx.positions[:, -1] + 1).to(torch.int32)
        parts["  mla_decode"] = lambda: deepseek_ops.mla_decode(q, attn.kv_cache, ctx.block_table, seqlens,
                                                                attn.softmax_scale, causal=True,
                                                                metadata=ctx.mla_metadata)
    y = layer.post_attention_layernorm(x).reshape(-1, x.shape[-1])
    weights, indices = moe.gate(y)
    dispatch = lambda: deepseek_ops.ep.dispatch(MoE._quantize(y), indices, weights, num_experts=num_experts)
    recv = dispatch()
    rows, m_indices = recv.recv_x, recv.recv_topk_idx
    grouped = deepseek_ops.grouped_fp8_gemm_contiguous
    h13 = grouped(*rows, moe.w13, moe.w13_scale, m_indices)
    act = moe._activation(h13)
    out = grouped(*act, moe.w2, moe.w2_scale, m_indices)
    parts.update({
        "moe: router (gate + top-k)": lambda: moe.gate(y),
        "moe: quantize + ep.dispatch (fp8)": dispatch,
        "moe: grouped GEMM w13": lambda: grouped(*rows, moe.w13, moe.w13_scale, m_indices),
        "moe: silu(gate) * up + quantize": lambda: moe._activation(h13),
        "moe: grouped GEMM w2": lambda: grouped(*act, moe.w2, moe.w2_scale, m_indices),
        "moe: ep.combine": lambda: deepseek_ops.ep.combine(out, recv.handle, weights),
        "moe: shared expert (3 fp8_linear)": lambda: moe.shared_experts(y),
    })
    return {name: bench(fn) for name, fn in parts.items()}


def _measure(models, x, ctx_of, shape: dict, quick: bool) -> List[Record]:
    records = []
    with torch.no_grad():
        layer = {name: m.main_layers[0] for name, m in models.items()}
        ctx = {name: ctx_of(m) for name, m in models.items()}
        for kernel, call in (("decoder_layer", lambda n: layer[n](x, ctx[n])),
                             ("moe_layer", lambda n: layer[n].mlp(layer[n].post_attention_layernorm(x)))):
            expected = call("reference_fp8_act").double()
            for impl, name in ((OURS, "kernels"), ("torch", "reference")):
                error = calc_diff(call(name).double(), expected)
                # moe_layer: same input, same routing, so only GEMM rounding differs. decoder_layer: the
                # attention's rounding can flip a near-tied expert choice of a token, hence more room.
                bound = 1e-3 if kernel == "moe_layer" else 1e-2
                if impl == OURS and error > bound:
                    raise AssertionError(f"{kernel} {shape}: kernels backend calc_diff {error:.2e} > {bound}; "
                                         "not timed")
                records.append(Record(kernel, dict(shape), impl, bench(lambda: call(name)), error=error))
        if not quick:
            print(f"kernels backend breakdown {shape} (ms):", flush=True)
            for part, ms in _breakdown(models["kernels"], x, ctx["kernels"]).items():
                print(f"  {part:<36} {ms:8.3f}", flush=True)
    return records


def tiny_generation_tokens_per_s(device: str) -> float:
    model = random_model(preset("tiny", dtype="bfloat16" if device == "cuda" else "float32"),
                         "kernels" if device == "cuda" else "reference", device=device)
    prompts = [list(range(1, 17))] * 8
    generate(model, prompts, 4)  # warm-up
    _, stats = generate(model, prompts, 64)
    return stats["tokens_per_s"]


def run(quick: bool = False) -> List[Record]:
    models = full_layer_models()
    records: List[Record] = []
    for batch in DECODE_BATCHES[:1] if quick else DECODE_BATCHES:
        block_table = _fill_cache(models, batch)
        x = torch.randn(batch, 1, 7168, device="cuda", dtype=torch.bfloat16)
        start = torch.full((batch,), CONTEXT - 1, device="cuda")  # the new token is the 4096th
        records += _measure(models, x, lambda m: m.context(batch, 1, "cuda", start, block_table, decode=True),
                            {"B": batch, "context": CONTEXT, "phase": "decode"}, quick)
    if not quick:
        x = torch.randn(1, PREFILL_TOKENS, 7168, device="cuda", dtype=torch.bfloat16)
        records += _measure(models, x, lambda m: m.context(1, PREFILL_TOKENS, "cuda"),
                            {"B": 1, "context": PREFILL_TOKENS, "phase": "prefill"}, quick)
        for device in ("cuda", "cpu"):
            print(f"tiny model generation, 8 requests x 64 tokens, {device}: "
                  f"{tiny_generation_tokens_per_s(device):.1f} tokens/s", flush=True)
    return records


@pytest.mark.gpu
def test_model(benchmark):
    models = full_layer_models()
    block_table = _fill_cache(models, 32)
    x = torch.randn(32, 1, 7168, device="cuda", dtype=torch.bfloat16)
    start = torch.full((32,), CONTEXT - 1, device="cuda")
    model = models["kernels"]
    ctx = model.context(32, 1, "cuda", start, block_table, decode=True)

    def step():
        with torch.no_grad():
            model.main_layers[0](x, ctx)

    pytest_benchmark(benchmark, step)
