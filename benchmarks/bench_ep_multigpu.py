"""Expert all-to-all across GPUs: one process per GPU, ranks = the GPUs present (2-8), over NVLink.

Records: ep_dispatch (bf16 and FP8, the 1x128 scales travel with the rows) and ep_combine (bf16)
at the DeepSeek-V3 setting (4096 tokens per rank, hidden 7168, 256 experts, top-8) and the decode
setting (128 tokens per rank); moe_layer (router, FP8 dispatch, grouped FP8 GEMMs, combine, shared
expert: model.model.MoE with the full DeepSeek-V3 widths, E/R experts per rank) at both.
Implementations, in the same processes, on the same inputs:
- deepseek_ops: Buffer(backend="ipc"), our kernels writing into the peers' memory over NVLink;
- torch: Buffer(backend="torch"), the torch.distributed backend (NCCL all_to_all_single), the
  reference: the ipc results must equal it bit for bit before anything is timed;
- nccl: one bare all_to_all_single of the same rows (x, with the scales for FP8; the returning
  rows for combine), no layout or permutation work: the transport alone.
Times: benchmarks.timing.bench_ranks (every run starts on a barrier; the slowest rank's median),
end to end: the ipc and torch backends sync with the host once per call.
GB/s: bytes received over NVLink per rank (rows from other ranks only: a rank's rows to itself
never leave its GPU; the mean over ranks) / time, the same bytes for every impl. Combine brings one
bf16 row per (token, expert) pair home (so that its sum is bitwise the one-GPU combine's), more
bytes than a combine that pre-sums per (token, rank) would move.
Printed beside: the NVLink ceiling, a 1 GiB peer copy GPU 0 -> GPU 1 (one direction, and both at
once). With fewer than two GPUs the module says so and records nothing.

    python -m benchmarks --only ep_multigpu
"""
import json
import os
import socket
import tempfile
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.bench_ep import rows_mismatch, make_routing
from benchmarks.bench_model import layer_args
from benchmarks.report import OURS, Record, throughput
from benchmarks.timing import bench_ranks
from deepseek_ops import ep, per_token_group_quant_fp8
from deepseek_ops.testing import calc_diff
from model.model import MoE, init_random_

MAX_RANKS = 8
SETTINGS = [dict(tokens=4096, hidden=7168, experts=256, topk=8), dict(tokens=128, hidden=7168, experts=256, topk=8)]


def nvlink_probe(num_bytes: int = 1 << 30, copies: int = 10) -> Dict[str, float]:
    """GB/s per direction of peer copies GPU 0 <-> GPU 1 (copy engines, wall clock over `copies`)."""
    a0 = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, device="cuda:0")
    b1 = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:1")
    a1 = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, device="cuda:1")
    b0 = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:0")
    streams = [torch.cuda.Stream(device=0), torch.cuda.Stream(device=1)]

    def timed(pairs) -> float:
        for _ in range(2):  # warm-up: peer mappings, clocks
            for (dst, src), stream in zip(pairs, streams):
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
        for d in (0, 1):
            torch.cuda.synchronize(d)
        start = time.perf_counter()
        for _ in range(copies):
            for (dst, src), stream in zip(pairs, streams):
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
        for d in (0, 1):
            torch.cuda.synchronize(d)
        return num_bytes * copies / (time.perf_counter() - start) / 1e9

    result = {"one_direction_gbps": timed([(b1, a0)]), "each_direction_both_gbps": timed([(b1, a0), (b0, a1)])}
    del a0, b1, a1, b0
    torch.cuda.empty_cache()
    return result


def _dispatch_mismatch(got, want) -> float:
    """Rows of `got` (ipc) that differ from `want` (torch): layout, valid rows, scales, weights."""
    if not torch.equal(got.recv_topk_idx, want.recv_topk_idx):
        return 1.0
    valid = want.recv_topk_idx >= 0
    pairs = [(got.recv_x, want.recv_x)] if isinstance(got.recv_x, torch.Tensor) else list(zip(got.recv_x, want.recv_x))
    errors = [rows_mismatch(g.view(torch.uint8)[valid], w.view(torch.uint8)[valid]) for g, w in pairs]
    errors.append(rows_mismatch(got.recv_topk_weights[valid], want.recv_topk_weights[valid]))
    return max(errors)


def _mean_over_ranks(value: float, group) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, group=group)
    return float(t.item()) / dist.get_world_size(group)


def exchange_records(s: dict, group) -> List[Record]:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    t, h, e, k = s["tokens"], s["hidden"], s["experts"], s["topk"]
    topk_idx, weights = make_routing(t, e, k)
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    ours = ep.Buffer(group, t, h, e, backend="ipc", max_topk=k)
    ref = ep.Buffer(group, t, h, e, backend="torch", max_topk=k)
    to_rank = ours.get_dispatch_layout(topk_idx)[0].long()
    from_rank = torch.empty_like(to_rank)
    dist.all_to_all_single(from_rank, to_rank, group=group)
    to_rank, from_rank = to_rank.tolist(), from_rank.tolist()
    shape = dict(tokens=t, hidden=h, experts=e, topk=k, ranks=world)
    records = []

    def time_all(kernel, dtype, impls, error, bytes_in):
        nvlink_bytes = _mean_over_ranks(bytes_in, group)
        for impl, fn in impls.items():
            ms = bench_ranks(fn, group)
            records.append(Record(kernel, dict(shape, dtype=dtype), impl, ms, None,
                                  throughput(ms, bytes_moved=nvlink_bytes)[1], None if impl == "nccl" else error))

    for dtype, arg in (("bf16", x), ("fp8", per_token_group_quant_fp8(x, 128))):
        row_bytes = h * 2 if dtype == "bf16" else h + h // 128 * 4
        error = _dispatch_mismatch(ours.dispatch(arg, topk_idx, weights), ref.dispatch(arg, topk_idx, weights))
        if error != 0.0:
            raise AssertionError(f"ep_dispatch {shape} {dtype}: ipc differs from the torch backend in {error:.3%} of "
                                 "rows; not timed")
        send = torch.randint(0, 256, (sum(to_rank), row_bytes), dtype=torch.uint8, device="cuda")
        recv = torch.empty(sum(from_rank), row_bytes, dtype=torch.uint8, device="cuda")
        time_all("ep_dispatch", dtype, {
            OURS: lambda: ours.dispatch(arg, topk_idx, weights),
            "torch": lambda: ref.dispatch(arg, topk_idx, weights),
            "nccl": lambda: dist.all_to_all_single(recv, send, from_rank, to_rank, group=group),
        }, error, (sum(from_rank) - from_rank[rank]) * row_bytes)

    got, want = ours.dispatch(x, topk_idx, weights), ref.dispatch(x, topk_idx, weights)
    y = torch.randn(got.recv_x.shape, device="cuda").to(torch.bfloat16)
    error = rows_mismatch(ours.combine(y, got.handle, weights), ref.combine(y, want.handle, weights))
    if error != 0.0:
        raise AssertionError(f"ep_combine {shape}: ipc differs from the torch backend in {error:.3%} of tokens; "
                             "not timed")
    back_in, back_out = want.handle.pairs_to_rank, want.handle.pairs_from_rank  # pair rows home / sent home
    send = torch.randn(sum(back_out), h, device="cuda").to(torch.bfloat16)
    recv = torch.empty(sum(back_in), h, dtype=torch.bfloat16, device="cuda")
    time_all("ep_combine", "bf16", {
        OURS: lambda: ours.combine(y, got.handle, weights),
        "torch": lambda: ref.combine(y, want.handle, weights),
        "nccl": lambda: dist.all_to_all_single(recv, send, back_in, back_out, group=group),
    }, error, (sum(back_in) - back_in[rank]) * h * 2)
    ours.close()
    ref.close()
    return records


def moe_records(tokens: int, group) -> List[Record]:
    """model.model.MoE (kernels backend, FP8 experts E/R per rank) with ep_backend ipc vs torch."""
    args = layer_args()
    torch.manual_seed(1234)  # the same router on every rank (drawn first); experts differ by rank anyway
    with torch.device("cuda"):
        moe = MoE(args, "kernels", ep_group=group)
    init_random_(moe)
    moe.prepare_kernels()
    torch.manual_seed(4321 + dist.get_rank(group))
    x = torch.randn(tokens, args.hidden_size, device="cuda").to(torch.bfloat16)
    shape = dict(B=tokens, context=4096, phase="decode", ranks=dist.get_world_size(group)) if tokens <= 256 else \
        dict(B=1, context=tokens, phase="prefill", ranks=dist.get_world_size(group))
    out = {}
    with torch.no_grad():
        for backend in ("ipc", "torch"):
            moe.ep_backend = backend
            out[backend] = moe(x)
        error = calc_diff(out["ipc"].double(), out["torch"].double())
        if error > 1e-6:
            raise AssertionError(f"moe_layer {shape}: ipc vs torch backend calc_diff {error:.2e}; not timed")
        records = []
        for impl, backend in ((OURS, "ipc"), ("torch", "torch")):
            moe.ep_backend = backend
            moe(x)  # builds this backend's Buffer outside the timing
            records.append(Record("moe_layer", shape, impl, bench_ranks(lambda: moe(x), group), error=error))
    moe.ep_buffer.close()
    return records


def _rank_main(rank: int, world: int, port: int, out_path: str):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    group = dist.group.WORLD
    torch.manual_seed(1000 + rank)
    records = []
    for s in SETTINGS:
        records += exchange_records(s, group)
    for s in SETTINGS:
        records += moe_records(s["tokens"], group)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump([r.to_dict() for r in records], f)
    dist.barrier(group=group)
    dist.destroy_process_group()


def run(quick: bool = False) -> List[Record]:
    del quick  # two settings either way
    world = min(torch.cuda.device_count(), MAX_RANKS)
    if world < 2:
        print(f"[bench_ep_multigpu] needs >= 2 GPUs (one process per GPU), found {world}: nothing recorded",
              flush=True)
        return []
    probe = nvlink_probe()
    print(f"NVLink peer copy GPU 0 -> 1: {probe['one_direction_gbps']:.1f} GB/s one direction, "
          f"{probe['each_direction_both_gbps']:.1f} GB/s each way with both at once", flush=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        out_path = os.path.join(out_dir, "records.json")
        mp.spawn(_rank_main, args=(world, port, out_path), nprocs=world, join=True)
        with open(out_path) as f:
            return [Record(**r) for r in json.load(f)]
