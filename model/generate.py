"""Batched generation on the paged latent cache: `python -m model.generate`.

prefill(model, tokens, block_table) runs the prompts (right-padded, each from position 0) and
writes their latents to the cache; decode_one_token(model, tokens, cache_seqlens, block_table)
runs s new tokens per request at positions cache_seqlens[b] + j. Both are pure functions of their
tensors (the caches are the model's buffers), so torch.compile(fullgraph=True) takes them whole.

The sampling loop (all but --mtp) reads nothing back to the host per token: sampling draws on the
model's device from a generator that lives there, and with eos_id the "every row has its eos" flag
stays on the device and is read once per stop_check_every tokens, where decoding stops early. A host
read leaves the GPU idle while the host launches the next step, so the loop pays that once per
stop_check_every steps, not per token. (The forward itself may still read: the kernels backend's
expert dispatch sizes its output on the host, once per MoE layer.)

With --mtp, greedy decoding is self-speculative: the MTP module drafts token i+2, the main model
verifies [token i+1, draft] in one s_q = 2 step and keeps the draft only if it is what greedy
decoding would have produced, so the output is exactly plain greedy's.

Without --checkpoint the model is RANDOM (untrained weights of --preset): its output is noise, useful
only to try the machinery. A real model: --checkpoint, an HF-format DeepSeek-V3 folder.

Examples:
    python -m model.generate --prompt "Hello" --prompt "Hopper" --max-new-tokens 32   # random tiny model
    python -m model.generate --checkpoint /path/to/DeepSeek-V3 --device cuda --backend kernels --mtp
    torchrun --nproc-per-node 2 -m model.generate --dtype bfloat16 --device cpu   # experts over 2 ranks (gloo)
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from model.checkpoint import load_checkpoint
from model.config import DTYPES, PAGE_SIZE, PRESETS, preset
from model.step_graphs import GraphedSteps
from model.model import Transformer, random_model


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; bos/eos from the config (256, 257 in the tiny preset)."""

    def __init__(self, bos_id: Optional[int] = None, eos_id: Optional[int] = None):
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> List[int]:
        return ([self.bos_id] if self.bos_id is not None else []) + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json (Hugging Face `tokenizers`)."""

    def __init__(self, path: Path, bos_id: Optional[int] = None, eos_id: Optional[int] = None):
        from tokenizers import Tokenizer

        self.tok, self.bos_id, self.eos_id = Tokenizer.from_file(str(path)), bos_id, eos_id

    def encode(self, text: str) -> List[int]:
        return ([self.bos_id] if self.bos_id is not None else []) + self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


def load_tokenizer(checkpoint: Optional[Path], bos_id: Optional[int], eos_id: Optional[int]):
    if checkpoint is not None and (checkpoint / "tokenizer.json").exists():
        try:
            return HFTokenizer(checkpoint / "tokenizer.json", bos_id, eos_id)
        except ImportError:
            print("tokenizer.json found but the `tokenizers` package is missing: using bytes", file=sys.stderr)
    return ByteTokenizer(bos_id, eos_id)


# ----------------------------------------------------------------------------------------------
# Paged cache, prefill, decode
# ----------------------------------------------------------------------------------------------
def allocate_block_table(batch: int, max_len: int, device, generator: Optional[torch.Generator] = None):
    """block_table [B, ceil(max_len / 64)] int32 over B * that many pages, in a random order when a
    generator is given (so nothing can rely on a request's pages being adjacent; drawn on the
    generator's device)."""
    blocks_per_request = math.ceil(max_len / PAGE_SIZE)
    num_blocks = batch * blocks_per_request
    pages = (torch.randperm(num_blocks, generator=generator, device=generator.device) if generator is not None
             else torch.arange(num_blocks))
    return pages.view(batch, blocks_per_request).to(device=device, dtype=torch.int32), num_blocks


def prefill(model: Transformer, tokens: torch.Tensor, block_table: torch.Tensor):
    """tokens [B, S] (right-padded prompts) -> (logits [B, S, V], hidden [B, S, D]); latents cached."""
    return model(tokens, None, block_table, decode=False)


def decode_one_token(model: Transformer, tokens: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_table: torch.Tensor):
    """tokens [B, s] at positions cache_seqlens[b] + j -> (logits [B, s, V], hidden [B, s, D])."""
    return model(tokens, cache_seqlens, block_table, decode=True)


def mtp_step(model: Transformer, hidden: torch.Tensor, next_tokens: torch.Tensor, start_pos: Optional[torch.Tensor],
             block_table: torch.Tensor, decode: bool):
    """MTP logits [B, s, V] for token i+2 from the main hidden [B, s, D] at i and next_tokens [B, s]."""
    return model.forward_mtp(hidden, next_tokens, start_pos, block_table, decode)[0]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, V] -> tokens [B]: greedy at temperature 0, else nucleus sampling, on the logits'
    device (the generator's) with no host sync."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus is full
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    # torch.multinomial(p, 1)'s own draw, argmax(p / q) with q ~ Exp(1), so a seed gives the same
    # tokens; multinomial also reads p on the host (two syncs a call) to reject NaN, inf or negative
    # entries, which a softmax of finite logits does not produce.
    noise = torch.empty_like(sorted_probs).exponential_(1.0, generator=generator)
    choice = (sorted_probs / noise).argmax(-1, keepdim=True)  # [B, 1]
    return order.gather(-1, choice).squeeze(-1)


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start = total, enabled, time.perf_counter()

    def update(self, done: int, tokens: int):
        if not self.enabled:
            return
        width, frac = 30, min(done / max(self.total, 1), 1.0)
        rate = tokens / max(time.perf_counter() - self.start, 1e-9)
        bar = "#" * int(width * frac) + "." * (width - int(width * frac))
        print(f"\r[{bar}] {done}/{self.total} tokens  {rate:8.1f} tok/s", end="", file=sys.stderr, flush=True)
        if done >= self.total:
            print(file=sys.stderr)


# Decode steps between the host reads of "every row has its eos". A read costs the GPU one launch
# gap (tens of us against a decode step's milliseconds); 4 lets the arithmetic task's answers (at
# most 9 tokens) stop after 4 or 8 tokens, where 8 would check once, after 8.
STOP_CHECK_EVERY = 4


def check_request(model: Transformer, prompts: List[List[int]], max_new_tokens: int, temperature: float,
                  use_mtp: bool, eos_id: Optional[int] = None, stop_check_every: int = STOP_CHECK_EVERY) -> None:
    """generate's arguments, checked before any work: ValueError naming what is wrong."""
    capacity = model.args.max_position_embeddings - (1 if use_mtp else 0)  # MTP verifies one token ahead
    _check_prompts(prompts, max_new_tokens, capacity, model.args.vocab_size)
    if eos_id is not None and not 0 <= eos_id < model.args.vocab_size:
        raise ValueError(f"argument 'eos_id': expected a token id in [0, {model.args.vocab_size}), got {eos_id}")
    if stop_check_every < 1:
        raise ValueError(f"argument 'stop_check_every': expected >= 1, got {stop_check_every}")
    if use_mtp and model.mtp is None:
        raise ValueError("use_mtp=True needs the MTP module, and this model has none (num_nextn_predict_layers = 0: "
                         "its config has none, its checkpoint holds no MTP weights, or it was loaded with mtp=False)")
    if use_mtp and temperature > 0:
        raise ValueError("use_mtp=True is exact greedy self-speculation: it needs temperature=0")


def _check_prompts(prompts: List[List[int]], max_new_tokens: int, capacity: int, vocab: int) -> None:
    if not prompts:
        raise ValueError("argument 'prompts': expected at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"argument 'max_new_tokens': expected >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if len(p) + max_new_tokens > capacity:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} exceed the cache "
                             f"capacity of {capacity} tokens (max_position_embeddings)")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i}: token ids must be in [0, {vocab}), got [{min(p)}, {max(p)}]")


@torch.no_grad()
def generate(model: Transformer, prompts: List[List[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, use_mtp: bool = False, compile: bool = False, progress: bool = False,
             seed: Optional[int] = None, shuffle_pages: bool = True, eos_id: Optional[int] = None,
             stop_check_every: int = STOP_CHECK_EVERY,
             cuda_graph: bool = False) -> Tuple[List[List[int]], Dict[str, float]]:
    """Generates max_new_tokens after each prompt. Returns the new tokens per prompt and stats
    (tokens_per_s; with use_mtp, acceptance_rate = accepted drafts / verify steps).

    cuda_graph: replay the prefill and decode steps from CUDA graphs (model/step_graphs.py; a model
    on CUDA, without expert parallelism); the tokens are those of the eager steps.

    With eos_id, decoding stops once every row has produced eos_id (seen every stop_check_every
    tokens; with use_mtp every verify step, whose tokens the host holds anyway): each row is then
    a prefix, holding its first eos_id, of the row generate returns without eos_id."""
    check_request(model, prompts, max_new_tokens, temperature, use_mtp, eos_id, stop_check_every)
    device = model.model.embed_tokens.weight.device
    if cuda_graph and (device.type != "cuda" or compile or model.ep_group is not None):
        raise ValueError(f"argument 'cuda_graph': needs a model on CUDA (got {device}), compile=False (got {compile}) "
                         f"and no expert parallelism (ep_group {'set' if model.ep_group is not None else 'None'})")
    generator = torch.Generator(device)  # pages and samples: one seeded stream on the model's device
    if seed is not None:
        generator.manual_seed(seed)
    batch, max_prompt = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    block_table, num_blocks = allocate_block_table(batch, max_prompt + max_new_tokens + 1, device,
                                                   generator if shuffle_pages else None)
    model.setup_cache(num_blocks)
    # [B, S] right-padded, made as one tensor: a row at a time costs ~10 us of host time per prompt, as
    # much as a short rollout's decode steps at GRPO's 512 prompts.
    tokens = torch.tensor([list(p) + [0] * (max_prompt - len(p)) for p in prompts], dtype=torch.long).to(device)
    decode = torch.compile(decode_one_token, fullgraph=True, dynamic=False) if compile else decode_one_token
    first_step = prefill
    if cuda_graph:
        steps = GraphedSteps(model)
        first_step, decode = steps.graphed(prefill), steps.graphed(decode_one_token)

    start = time.perf_counter()
    bar = Progress(max_new_tokens * batch, progress)
    logits, hidden = first_step(model, tokens, block_table)
    last = (lengths - 1)[:, None]  # [B, 1]
    next_token = sample(logits.gather(1, last[..., None].expand(-1, -1, logits.shape[-1]))[:, 0],
                        temperature, top_p, generator)  # [B]
    stats: Dict[str, float] = {}
    if use_mtp:
        out, stats = _speculative_loop(model, tokens, lengths, hidden, next_token, block_table,
                                       max_new_tokens, decode, bar, eos_id)
    else:
        out = _sampling_loop(model, next_token, lengths, block_table, max_new_tokens, temperature, top_p,
                             generator, decode, bar, eos_id, stop_check_every)
    elapsed = time.perf_counter() - start
    out = [row[:max_new_tokens] for row in out]
    new_tokens = sum(len(row) for row in out)
    bar.update(bar.total, new_tokens)
    stats["tokens_per_s"] = new_tokens / elapsed
    return out, stats


def _sampling_loop(model, first, lengths, block_table, max_new_tokens, temperature, top_p, generator, decode,
                   bar, eos_id, stop_check_every) -> List[List[int]]:
    """Plain decoding from the first sampled token [B]: one decode step per token, all on the device
    but the stop check."""
    batch = first.shape[0]
    next_token, seqlens, out = first, lengths.clone(), [first]
    finished = first == eos_id if eos_id is not None else None  # [B] on the device
    while len(out) < max_new_tokens:
        if finished is not None and len(out) % stop_check_every == 0 and bool(finished.all()):
            break
        logits, _ = decode(model, next_token[:, None], seqlens, block_table)
        seqlens += 1
        next_token = sample(logits[:, 0], temperature, top_p, generator)
        out.append(next_token)
        if finished is not None:
            finished |= next_token == eos_id
        bar.update(len(out) * batch, len(out) * batch)
    return torch.stack(out, dim=1).tolist()  # [B, tokens generated]


def _speculative_loop(model, tokens, lengths, hidden, first, block_table, max_new_tokens, decode, bar,
                      eos_id):
    """Greedy decoding with MTP drafts. Cache invariant: main and MTP caches hold positions < seqlens[b];
    t0[b] (at position seqlens[b]) is emitted but not yet cached; draft[b] is the guess for the next one."""
    batch = tokens.shape[0]
    rows = torch.arange(batch, device=tokens.device)
    # MTP over the prompt: position i pairs hidden i with token i+1 (the first new token at the end).
    next_tokens = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # [B, S]; the last column is overwritten
    next_tokens[rows, lengths - 1] = first
    draft = mtp_step(model, hidden, next_tokens, None, block_table, decode=False)[rows, lengths - 1].argmax(-1)
    emitted = [[int(t)] for t in first]
    t0, seqlens = first, lengths.clone()
    steps = accepted_total = 0
    while min(len(e) for e in emitted) < max_new_tokens:
        if eos_id is not None and all(eos_id in e for e in emitted):
            break
        logits, h = decode(model, torch.stack([t0, draft], dim=1), seqlens, block_table)  # [B, 2, V], [B, 2, D]
        pred = logits.argmax(-1)  # [B, 2]: the greedy token after t0, and after the draft
        accepted = pred[:, 0] == draft  # [B]
        # MTP at positions seqlens, seqlens+1: (h after t0, pred0), (h after draft, pred1); when the
        # draft is rejected the second slot is stale, masked, and overwritten next step.
        mtp_logits = mtp_step(model, h, pred, seqlens, block_table, decode=True)  # [B, 2, V]
        draft = mtp_logits.argmax(-1)[rows, accepted.long()]
        for b in range(batch):
            emitted[b] += [int(pred[b, 0]), int(pred[b, 1])] if accepted[b] else [int(pred[b, 0])]
        t0 = torch.where(accepted, pred[:, 1], pred[:, 0])
        seqlens = seqlens + 1 + accepted.long()
        steps += 1
        accepted_total += int(accepted.sum())
        done = sum(min(len(e), max_new_tokens) for e in emitted)
        bar.update(done, done)
    return emitted, {"acceptance_rate": accepted_total / max(steps * batch, 1), "verify_steps": steps}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
DEFAULT_PROMPTS = ["The quick brown fox", "DeepSeek-V3 on Hopper"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path,
                        help="HF-format DeepSeek-V3 folder (config.json + safetensors); default: none, the model "
                             "is RANDOM, built from --preset")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="config of the random model, ignored with --checkpoint (default: %(default)s)")
    parser.add_argument("--prompt", action="append",
                        help=f"repeat for a batch (default: {' and '.join(map(repr, DEFAULT_PROMPTS))})")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s)")
    mtp = parser.add_mutually_exclusive_group()
    mtp.add_argument("--mtp", action="store_true", help="MTP self-speculative greedy decoding")
    mtp.add_argument("--no-mtp", action="store_true", help="build and load no MTP module (its weights are skipped)")
    parser.add_argument("--backend", default="reference", choices=("reference", "kernels"),
                        help="(default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="(default here: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="weight dtype (default: the checkpoint's, or the preset's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the decode step")
    parser.add_argument("--cuda-graph", action="store_true", help="replay the decode step from a CUDA graph")
    parser.add_argument("--seed", type=int, default=0, help="random weights and sampling (default: %(default)s)")
    return parser


def main(argv=None) -> None:
    parser = _parser()
    opts = parser.parse_args(argv)

    torch.manual_seed(opts.seed)
    ep_group, rank, device = None, 0, opts.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: experts sharded over the ranks
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        ep_group, rank = dist.group.WORLD, dist.get_rank()
        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(device)
    try:
        if opts.checkpoint:
            model = load_checkpoint(opts.checkpoint, opts.backend, device=device, dtype=opts.dtype,
                                    ep_group=ep_group, mtp=False if opts.no_mtp else None)
        else:
            overrides = {"dtype": opts.dtype} if opts.dtype else {}
            if opts.no_mtp:
                overrides["num_nextn_predict_layers"] = 0
            model = random_model(preset(opts.preset, **overrides), opts.backend, device=device, seed=opts.seed,
                                 ep_group=ep_group)
        tok = load_tokenizer(opts.checkpoint, model.args.bos_token_id, model.args.eos_token_id)
        texts = opts.prompt or DEFAULT_PROMPTS
        prompts = [tok.encode(t) for t in texts]
        check_request(model, prompts, opts.max_new_tokens, opts.temperature, opts.mtp, tok.eos_id)
    except ValueError as e:  # a bad checkpoint, config or request (CheckpointError is one): no traceback
        parser.error(str(e))
    if rank == 0 and not opts.checkpoint:
        print(f"no --checkpoint: a RANDOM model (preset {opts.preset!r}, seed {opts.seed}), its output is noise",
              file=sys.stderr)
    # Every rank runs every prompt (same steps on all ranks, as the MoE exchanges need); rank 0 prints.
    outputs, stats = generate(model, prompts, opts.max_new_tokens, opts.temperature, opts.top_p, opts.mtp,
                              opts.compile, progress=rank == 0, seed=opts.seed, eos_id=tok.eos_id)
    if ep_group is not None:
        dist.destroy_process_group()
    if rank != 0:
        return
    for text, new in zip(texts, outputs):
        if tok.eos_id is not None and tok.eos_id in new:
            new = new[:new.index(tok.eos_id)]
        print(f"{text!r} -> {tok.decode(new)!r}")
    print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
