"""Expert-parallel dispatch and combine on one GPU (ep_dispatch, ep_combine) against PyTorch.

DeepSeek-V3 shape: 4096 tokens, hidden 7168, 256 experts, top-8, bf16 and FP8 dispatch (the 1x128
scales travel with the rows), bf16 combine. Ours: deepseek_ops.ep.dispatch(exact=False) (the
no-sync, CUDA-graph-safe variant) and ep.combine. Peer `torch`: the same contiguous padded layout
with plain PyTorch (sort, index_select, index_copy_; combine with index_select and index_add_).

Bytes actually moved (benchmarks/README.md): dispatch reads each token row (+ scales) once and writes it
once per (token, expert) pair, plus topk_idx / weights read and row_of, m_indices, weights written;
combine reads one bf16 row per pair (+ row_of, weights) and writes one bf16 row per token.
"""
import argparse
import json
import os
import socket
import tempfile
from typing import Callable, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deepseek_ops
from benchmarks.report import OURS, Record, throughput
from benchmarks.timing import bench, bench_ranks, pytest_benchmark
from deepseek_ops import ep, reference
from deepseek_ops.constants import GROUPED_GEMM_ALIGNMENT

SHAPES = [dict(tokens=4096, hidden=7168, experts=256, topk=8)]
QUICK_SHAPES = SHAPES
ALIGNMENT = GROUPED_GEMM_ALIGNMENT


def make_routing(tokens: int, experts: int, topk: int, device: str = "cuda"):
    """Distinct random experts per token (what a top-k router produces), fp32 weights."""
    topk_idx = torch.rand(tokens, experts, device=device).topk(topk, dim=1).indices
    return topk_idx, torch.rand(tokens, topk, device=device)


def worst_rows(tokens: int, topk: int, experts: int, alignment: int = ALIGNMENT) -> int:
    return tokens * topk + experts * (alignment - 1)


def torch_dispatch(x, x_scales, topk_idx, topk_weights, num_experts: int, alignment: int, num_rows: int):
    """Plain PyTorch into the same layout (no host sync): -> (recv_x, recv_scales, m_indices, row_of)."""
    tokens, topk = topk_idx.shape
    flat = topk_idx.reshape(-1)
    key = torch.where(flat >= 0, flat, num_experts)
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    counts = torch.bincount(key, minlength=num_experts + 1)
    padded = (counts + alignment - 1) // alignment * alignment
    starts = torch.cumsum(padded, 0) - padded
    firsts = torch.cumsum(counts, 0) - counts
    rows = starts[sorted_key] + torch.arange(tokens * topk, device=x.device) - firsts[sorted_key]
    rows = torch.where(sorted_key < num_experts, rows, num_rows)  # pairs without an expert -> a spill row
    src = order // topk
    raw = x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x  # index_copy_ has no fp8 kernel
    recv_x = raw.new_empty((num_rows + 1, x.shape[1])).index_copy_(0, rows, raw.index_select(0, src))[:num_rows]
    recv_x = recv_x.view(x.dtype)
    recv_scales = None
    if x_scales is not None:
        recv_scales = x_scales.new_empty((num_rows + 1, x_scales.shape[1])).index_copy_(
            0, rows, x_scales.index_select(0, src))[:num_rows]
    m_indices = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=x.device)
    m_indices.index_copy_(0, rows, sorted_key.to(torch.int32))
    m_indices[num_rows:] = -1
    row_of = torch.empty(tokens * topk, dtype=torch.int64, device=x.device).index_copy_(
        0, order, torch.where(rows < num_rows, rows, -1))
    return recv_x, recv_scales, m_indices[:num_rows], row_of.reshape(tokens, topk)


def torch_combine(y, row_of, topk_weights):
    """Plain PyTorch weighted un-permutation with fp32 accumulation (index_select + index_add_)."""
    tokens, topk = row_of.shape
    flat = row_of.reshape(-1)
    valid = flat >= 0
    pairs = torch.arange(tokens * topk, device=y.device)
    weighted = y.index_select(0, flat.clamp(min=0)).float() * (topk_weights.reshape(-1) * valid).unsqueeze(1)
    out = torch.zeros(tokens, y.shape[1], dtype=torch.float32, device=y.device)
    return out.index_add_(0, pairs // topk, weighted).to(y.dtype)


def dispatch_bytes(tokens, hidden, topk, num_pairs, num_rows, fp8: bool) -> int:
    row = hidden * (1 if fp8 else 2) + (hidden // 128 * 4 if fp8 else 0)
    return tokens * row + tokens * topk * (8 + 4) + num_pairs * (row + 4 + 4) + tokens * topk * 4 + \
        (num_rows - num_pairs) * (4 + 4)


def combine_bytes(tokens, hidden, topk, num_pairs) -> int:
    return num_pairs * hidden * 2 + tokens * topk * (4 + 4) + tokens * hidden * 2


def rows_mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows whose bits differ (0.0: bitwise equal)."""
    if a.shape != b.shape:
        return 1.0
    if a.numel() == 0:
        return 0.0
    a8 = a.contiguous().view(torch.uint8).reshape(a.shape[0], -1)
    b8 = b.contiguous().view(torch.uint8).reshape(b.shape[0], -1)
    return float((a8 != b8).any(1).double().mean())


def _dispatch_error(recv_x, recv_scales, m_indices, ref) -> float:
    valid = ref[3] >= 0
    # Compared as bytes: fp8 has no CUDA indexing kernels.
    err = max(rows_mismatch(m_indices.to(torch.int32), ref[3]),
              rows_mismatch(recv_x.view(torch.uint8)[valid], ref[0].view(torch.uint8)[valid]))
    if recv_scales is not None:
        err = max(err, rows_mismatch(recv_scales[valid], ref[1][valid]))
    return err


def _time(kernel: str, shape: dict, impls: Dict[str, Callable], errors: Dict[str, float], bytes_moved: int):
    records = []
    for impl, fn in impls.items():
        if impl == OURS and errors[impl] != 0.0:
            raise AssertionError(f"{kernel} {shape}: deepseek_ops differs from the reference in {errors[impl]:.3%} "
                                 "of rows; not timed")
        ms = bench(fn)
        records.append(Record(kernel, dict(shape), impl, ms, None, throughput(ms, bytes_moved=bytes_moved)[1],
                              errors[impl]))
    return records


def run_shape(tokens: int, hidden: int, experts: int, topk: int, fp8: bool) -> List[Record]:
    topk_idx, weights = make_routing(tokens, experts, topk)
    x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
    x_scales = None
    if fp8:
        x, x_scales = deepseek_ops.per_token_group_quant_fp8(x, 128)
    arg = x if x_scales is None else (x, x_scales)
    num_rows = worst_rows(tokens, topk, experts)
    num_pairs = int((topk_idx >= 0).sum())
    shape = dict(tokens=tokens, hidden=hidden, experts=experts, topk=topk, ranks=1, dtype="fp8" if fp8 else "bf16")

    ref = reference.ep_permute(x, x_scales, weights, topk_idx, experts, ALIGNMENT, num_rows)
    ours = lambda: ep.dispatch(arg, topk_idx, weights, num_experts=experts, alignment=ALIGNMENT, exact=False)
    peer = lambda: torch_dispatch(x, x_scales, topk_idx, weights, experts, ALIGNMENT, num_rows)
    res, got_peer = ours(), peer()
    recv_x, recv_scales = (res.recv_x, None) if x_scales is None else res.recv_x
    errors = {OURS: _dispatch_error(recv_x, recv_scales, res.recv_topk_idx, ref),
              "torch": _dispatch_error(got_peer[0], got_peer[1], got_peer[2], ref)}
    records = _time("ep_dispatch", shape, {OURS: ours, "torch": peer}, errors,
                    dispatch_bytes(tokens, hidden, topk, num_pairs, num_rows, fp8))

    if not fp8:  # combine is bf16 whatever the dispatch dtype
        y = torch.randn(num_rows, hidden, device="cuda").to(torch.bfloat16)
        row_of = res.handle.row_of
        want = reference.ep_combine(y, row_of, weights)
        ours_c = lambda: ep.combine(y, res.handle, weights)
        peer_c = lambda: torch_combine(y, row_of, weights)
        errors = {OURS: rows_mismatch(ours_c(), want), "torch": rows_mismatch(peer_c(), want)}
        records += _time("ep_combine", dict(shape, dtype="bf16"), {OURS: ours_c, "torch": peer_c}, errors,
                         combine_bytes(tokens, hidden, topk, num_pairs))
    del x, x_scales, res, ref, got_peer
    torch.cuda.empty_cache()
    return records


def run(quick: bool = False) -> List[Record]:
    records: List[Record] = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        for fp8 in (False, True):
            records += run_shape(**shape, fp8=fp8)
    return records


# pytest-benchmark entries (`pytest benchmarks/bench_ep.py --benchmark-only`).

@pytest.mark.gpu
def test_ep_dispatch(benchmark):
    s = SHAPES[0]
    topk_idx, weights = make_routing(s["tokens"], s["experts"], s["topk"])
    x = torch.randn(s["tokens"], s["hidden"], device="cuda").to(torch.bfloat16)
    num_rows = worst_rows(s["tokens"], s["topk"], s["experts"])
    res = ep.dispatch(x, topk_idx, weights, num_experts=s["experts"], alignment=ALIGNMENT, exact=False)
    ref = reference.ep_permute(x, None, weights, topk_idx, s["experts"], ALIGNMENT, num_rows)
    assert _dispatch_error(res.recv_x, None, res.recv_topk_idx, ref) == 0.0, "differs from the reference; not timed"
    pytest_benchmark(benchmark, lambda: ep.dispatch(x, topk_idx, weights, num_experts=s["experts"], alignment=ALIGNMENT,
                                                 exact=False))


@pytest.mark.gpu
def test_ep_combine(benchmark):
    s = SHAPES[0]
    topk_idx, weights = make_routing(s["tokens"], s["experts"], s["topk"])
    x = torch.randn(s["tokens"], s["hidden"], device="cuda").to(torch.bfloat16)
    res = ep.dispatch(x, topk_idx, weights, num_experts=s["experts"], alignment=ALIGNMENT, exact=False)
    y = torch.randn(res.recv_x.shape, device="cuda").to(torch.bfloat16)
    assert rows_mismatch(ep.combine(y, res.handle, weights), reference.ep_combine(y, res.handle.row_of, weights)) == 0.0
    pytest_benchmark(benchmark, lambda: ep.combine(y, res.handle, weights))


# ---- Several processes sharing one GPU (ipc and torch backends): figures only --------------------
# `python -m benchmarks.bench_ep --ranks 2 4 8`: the slowest rank's median ms of Buffer.dispatch and
# Buffer.combine (benchmarks.timing.bench_ranks) with world_size processes on the one GPU (gloo). NOTE: the processes
# time-slice one GPU, so these figures say nothing about NVLink; the multi-GPU run has its own issue.

def _rank_bench(rank: int, world_size: int, port: int, tokens: int, backends, out_dir: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    s = dict(SHAPES[0], tokens=tokens)
    topk_idx, weights = make_routing(s["tokens"], s["experts"], s["topk"])
    x = torch.randn(s["tokens"], s["hidden"], device="cuda").to(torch.bfloat16)
    rows = {}
    for backend in backends:
        buffer = ep.Buffer(dist.group.WORLD, s["tokens"], s["hidden"], s["experts"], backend=backend,
                           max_topk=s["topk"])
        runs = 5 if backend == "torch" else 20  # gloo moves the rows through host memory: slow
        # ipc also without host sync (exact=False: the graph-safe decode variant, worst-case recv_x).
        for exact in (True, False) if backend == "ipc" else (True,):
            res = buffer.dispatch(x, topk_idx, weights, exact=exact)
            y = torch.randn(res.recv_x.shape, device="cuda").to(torch.bfloat16)
            ops = (("dispatch", lambda: buffer.dispatch(x, topk_idx, weights, exact=exact)),
                   ("combine", lambda: buffer.combine(y, res.handle, weights)))
            name = backend if exact else f"{backend}-nosync"
            rows[name] = {op: bench_ranks(fn, dist.group.WORLD, runs=runs, warmup_calls=1) for op, fn in ops}
        buffer.check()
        buffer.close()
    if rank == 0:  # bench_ranks gave every rank the slowest rank's median
        with open(os.path.join(out_dir, "ranks.json"), "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run_processes(world_size: int, tokens: int = 4096, backends=("ipc", "torch")) -> dict:
    """Spawns world_size processes on the one GPU; returns {variant: {op: max over ranks of median ms}}
    (variants: the backends, and "ipc-nosync" for ipc with exact=False)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_bench, args=(world_size, port, tokens, backends, out_dir), nprocs=world_size, join=True)
        with open(f"{out_dir}/ranks.json") as f:
            return json.load(f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="ep dispatch/combine with several processes on one GPU")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    args = parser.parse_args()
    for ws in args.ranks:
        result = run_processes(ws, args.tokens)
        for backend, ops in result.items():
            print(f"ranks={ws} tokens/rank={args.tokens} {backend:11s} dispatch {ops['dispatch']:.3f} ms  "
                  f"combine {ops['combine']:.3f} ms (slowest rank's median)", flush=True)
