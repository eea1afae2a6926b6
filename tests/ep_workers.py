"""Multi-process helpers for tests/test_ep.py and tests/test_model_ep.py: one process per rank,
torch.distributed on gloo (CPU, or the control plane of GPU runs) or NCCL (one GPU per rank). With
CUDA, rank r uses GPU r % device_count: on a multi-GPU machine the ranks exchange over NVLink, on one
GPU they share it.

Each rank draws its own inputs from (seed, rank) and can redraw any other rank's, so every rank
checks its received rows exactly against what the senders hold, and its combined output against
the single-process dense reference.
"""
import datetime
import os
import pickle
import signal
import socket
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepseek_ops import ep, per_token_group_quant_fp8, reference
from deepseek_ops.testing import assert_bitwise_equal, calc_diff


# The per-test limit of every test that spawns ranks (pytest.ini's default is for one process).
MULTI_PROCESS_TIMEOUT = pytest.mark.timeout(900)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, pg_backend: str):
    if torch.cuda.is_available():
        # One process per GPU where there are enough GPUs (ranks talk over NVLink), else round robin.
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(pg_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group broken by a timeout test cannot always be torn down
            pass


def run_ranks(fn: Callable, world_size: int, *args, pg_backend: str = "gloo", killed_ranks: Sequence[int] = ()):
    """Runs fn(rank, world_size, *args) in world_size new processes; re-raises a rank's failure.
    pg_backend: the process group's ("nccl" needs a GPU per rank). killed_ranks: ranks that SIGKILL
    themselves on purpose; every other rank must finish its checks."""
    # Ranks fork from a server process that imported this module (torch, deepseek_ops) and fn's once:
    # a spawned rank spent seconds on those imports, most of each multi-process test's time. The server
    # never touches CUDA, so each rank initializes its own context as a spawned one would. It does not
    # take the parent's sys.path (Python 3.11 ignores it), where pytest put this folder: PYTHONPATH does.
    here = str(Path(__file__).resolve().parent)
    if here not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    mp.set_forkserver_preload([__name__, fn.__module__])
    context = mp.start_processes(_entry, args=(world_size, free_port(), fn, args, pg_backend), nprocs=world_size,
                                 join=False, start_method="forkserver")
    try:
        if not killed_ranks:
            while not context.join():
                pass
            return
        # context.join() would terminate the survivors at the first death: wait for each instead.
        for process in context.processes:
            process.join()
        for rank, process in enumerate(context.processes):
            if rank in killed_ranks:
                assert process.exitcode == -signal.SIGKILL, f"rank {rank}: exit code {process.exitcode}, not SIGKILL"
            elif process.exitcode != 0:
                error_file = Path(context.error_files[rank])
                detail = pickle.loads(error_file.read_bytes()) if error_file.exists() else ""
                raise AssertionError(f"rank {rank} failed (exit code {process.exitcode}):\n{detail}")
    finally:
        # A failed rank or the test's timeout: the other ranks must not outlive the test.
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


# -- inputs --------------------------------------------------------------------------------------

def num_tokens_of(rank: int, case: dict) -> int:
    return case["tokens"][rank % len(case["tokens"])]


def make_inputs(seed: int, rank: int, case: dict, device="cpu"):
    """x bf16 [T, H] tagged with (rank, token id) in columns 0 and 1, topk_idx with distinct experts
    per token and some -1, fp32 weights. case["route"]: "random" or "rank0" (only rank 0's experts)."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    t, h, e, topk = num_tokens_of(rank, case), case["hidden"], case["experts"], case["topk"]
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    x[:, 0] = rank
    x[:, 1] = torch.arange(t).to(torch.bfloat16)  # exact in bf16 for t <= 256
    pool = e if case.get("route", "random") == "random" else e // case["world_size"]
    topk_idx = torch.stack([torch.randperm(pool, generator=gen)[:topk] for _ in range(t)]) if t else \
        torch.empty(0, topk, dtype=torch.int64)
    drop = torch.rand(t, topk, generator=gen) < case.get("drop", 0.15)
    topk_idx = torch.where(drop, -1, topk_idx)
    weights = torch.rand(t, topk, generator=gen)
    return x.to(device), topk_idx.to(device), weights.to(device)


def expert_fn(e: int, rows: torch.Tensor) -> torch.Tensor:
    """A per-expert elementwise map (exact IEEE ops: the same bits whatever the batch)."""
    return (rows.float() * (1.0 + e / 8.0) + e / 16.0).to(torch.bfloat16)


def apply_experts(recv_x: torch.Tensor, m_indices: torch.Tensor, expert_offset: int) -> torch.Tensor:
    y = torch.zeros(recv_x.shape, dtype=torch.bfloat16, device=recv_x.device)
    for e in torch.unique(m_indices).tolist():
        if e >= 0:
            rows = (m_indices == e).nonzero().squeeze(1)
            y[rows] = expert_fn(expert_offset + e, recv_x[rows])
    return y


def expected_rows(seed: int, rank: int, world_size: int, case: dict):
    """For each local expert of `rank`: the (source rank, token) of its rows, in (source, token, k) order."""
    epr = case["experts"] // world_size
    per_expert = {e: [] for e in range(epr)}
    for src in range(world_size):
        _, topk_idx, _ = make_inputs(seed, src, case)
        for t in range(topk_idx.shape[0]):
            for k in range(topk_idx.shape[1]):
                g = int(topk_idx[t, k])
                if g >= 0 and g // epr == rank:
                    per_expert[g % epr].append((src, t))
    return per_expert


# -- scenarios -----------------------------------------------------------------------------------

def check_exchange(rank: int, world_size: int, seed: int, case: dict):
    """dispatch -> per-expert f -> combine against the dense reference; exact routing; fp8 variant."""
    device = case.get("device", "cpu")
    x, topk_idx, weights = make_inputs(seed, rank, case, device)
    buffer = ep.Buffer(dist.group.WORLD, max(case["tokens"]), case["hidden"], case["experts"],
                       backend=case.get("backend", "torch"), alignment=case.get("alignment", 4),
                       max_topk=case["topk"])
    layout_rank, layout_expert, in_rank = buffer.get_dispatch_layout(topk_idx)
    ref_layout = reference.ep_dispatch_layout(topk_idx.cpu(), case["experts"], world_size)
    for got, want in zip((layout_rank, layout_expert, in_rank), ref_layout):
        assert_bitwise_equal(got.cpu(), want, "layout")

    epr = case["experts"] // world_size
    sent = [make_inputs(seed, src, case)[0] for src in range(world_size)]  # every rank's rows, redrawn once
    for exact in (True, False):
        res = buffer.dispatch(x, topk_idx, weights, exact=exact)
        m_indices = res.recv_topk_idx.cpu()
        recv_x = res.recv_x.cpu()
        want = expected_rows(seed, rank, world_size, case)
        for e in range(epr):
            rows = (m_indices == e).nonzero().squeeze(1)
            got = [(int(recv_x[r, 0]), int(recv_x[r, 1])) for r in rows]
            assert got == want[e], f"rank {rank} expert {e}: rows from {got[:8]}, expected {want[e][:8]}"
            assert int(res.num_recv_tokens_per_expert[e]) == len(want[e])
            for r, (src, t) in zip(rows.tolist(), want[e]):
                assert torch.equal(recv_x[r].view(torch.int16), sent[src][t].view(torch.int16))
        starts = [int(r[0]) for r in ((m_indices == e).nonzero().flatten() for e in range(epr)) if r.numel()]
        assert all(s % buffer.alignment == 0 for s in starts), f"groups not aligned: {starts}"
        y = apply_experts(res.recv_x, res.recv_topk_idx, rank * epr)
        out = buffer.combine(y, res.handle, weights)
        dense = reference.moe_dense(x.cpu(), topk_idx.cpu(), weights.cpu(), expert_fn)
        assert_bitwise_equal(out.cpu(), dense, f"rank {rank} combine")
        assert calc_diff(out.cpu(), dense) < 1e-6

    # FP8: the 1x128 scales travel with their rows (column 0 of the scales carries the tag).

    x_fp8, scales = per_token_group_quant_fp8(x.float().cpu(), 128)
    scales[:, 0] = rank * 1000 + torch.arange(x.shape[0], dtype=torch.float32) + 1
    res = buffer.dispatch((x_fp8.to(device), scales.to(device)), topk_idx, weights)
    recv_fp8, recv_scales = (t.cpu() for t in res.recv_x)
    m_indices = res.recv_topk_idx.cpu()
    want = expected_rows(seed, rank, world_size, case)
    sent_fp8 = [per_token_group_quant_fp8(rows.float(), 128)[0] for rows in sent]
    for e in range(epr):
        rows = (m_indices == e).nonzero().squeeze(1)
        got = [divmod(int(recv_scales[r, 0]) - 1, 1000) for r in rows]
        assert got == want[e], f"rank {rank} fp8 expert {e}: rows from {got[:8]}, expected {want[e][:8]}"
        for r, (src, t) in zip(rows.tolist(), want[e]):
            assert torch.equal(recv_fp8[r].view(torch.uint8), sent_fp8[src][t].view(torch.uint8))
    buffer.close()


def check_bad_input(rank: int, world_size: int, seed: int, case: dict):
    """One rank's bad call raises ValueError on every rank (no rank is left waiting)."""
    x, topk_idx, weights = make_inputs(seed, rank, case, case.get("device", "cpu"))
    buffer = ep.Buffer(dist.group.WORLD, max(case["tokens"]), case["hidden"], case["experts"],
                       backend=case.get("backend", "torch"), max_topk=case["topk"])
    bad_idx = topk_idx.clone()
    if rank == world_size - 1 and bad_idx.numel():
        bad_idx[0, 0] = case["experts"]  # out of range on the last rank only
    _expect_value_error(lambda: buffer.dispatch(x, bad_idx, weights), "topk_idx", rank)
    # dtype mismatch between ranks: rank 0 sends FP8, the others bf16.
    if rank == 0:
        arg = per_token_group_quant_fp8(x.float(), 128)
    else:
        arg = x
    _expect_value_error(lambda: buffer.dispatch(arg, topk_idx, weights), "disagree", rank)
    # The buffer still works after errors.
    res = buffer.dispatch(x, topk_idx, weights)
    y = apply_experts(res.recv_x, res.recv_topk_idx, rank * (case["experts"] // world_size))
    out = buffer.combine(y, res.handle, weights)
    assert_bitwise_equal(out, reference.moe_dense(x, topk_idx, weights, expert_fn), "combine after errors")
    _expect_value_error(lambda: buffer.combine(y[:, :-8] if rank == 0 else y, res.handle, weights), "'y'", rank)
    buffer.close()  # collectively: the next check of check_errors_raise_on_every_rank builds its own


def check_errors_raise_on_every_rank(rank: int, world_size: int, seed: int, case: dict):
    """check_bad_input, check_too_many_tokens (case["exact"]) and check_layout_agreement (case["differ"],
    case["message"]) in one group of ranks: each starts from its own Buffer."""
    check_bad_input(rank, world_size, seed, case)
    check_too_many_tokens(rank, world_size, seed, case)
    check_layout_agreement(rank, world_size, seed, case)


def check_layout_agreement(rank: int, world_size: int, seed: int, case: dict):
    """case["differ"] = (argument, value on the last rank): every rank's Buffer() raises one ValueError
    naming the argument and each rank's value, before any memory is shared."""
    args = dict(max_tokens_per_rank=16, hidden=256, num_experts=4 * world_size, max_topk=4, alignment=8)
    name, value = case["differ"]
    if rank == world_size - 1:
        args[name] = value
    try:
        ep.Buffer(dist.group.WORLD, backend=case["backend"], timeout_s=30.0, **args)
    except ValueError as exc:
        for expected in case["message"]:
            assert expected in str(exc), f"rank {rank}: message {exc} does not mention {expected!r}"
        return
    raise AssertionError(f"rank {rank}: Buffer() accepted {name}={args[name]!r}")


def check_too_many_tokens(rank: int, world_size: int, seed: int, case: dict):
    """The last rank passes max_tokens_per_rank + 1 tokens: with exact=True every rank raises ValueError
    naming max_tokens_per_rank, and the Buffer keeps working."""
    x, topk_idx, weights = make_inputs(seed, rank, case, case.get("device", "cpu"))
    max_tokens = max(case["tokens"])
    buffer = ep.Buffer(dist.group.WORLD, max_tokens, case["hidden"], case["experts"],
                       backend=case.get("backend", "torch"), max_topk=case["topk"])
    big_x, big_idx, big_w = x, topk_idx, weights
    if rank == world_size - 1:
        big_x = x.new_zeros(max_tokens + 1, x.shape[1])
        big_idx = topk_idx.new_full((max_tokens + 1, topk_idx.shape[1]), -1)
        big_w = weights.new_zeros(max_tokens + 1, weights.shape[1])
    for exact in case["exact"]:
        _expect_value_error(lambda: buffer.dispatch(big_x, big_idx, big_w, exact=exact), "max_tokens_per_rank", rank)
    res = buffer.dispatch(x, topk_idx, weights)
    y = apply_experts(res.recv_x, res.recv_topk_idx, rank * (case["experts"] // world_size))
    out = buffer.combine(y, res.handle, weights)
    assert_bitwise_equal(out.cpu(), reference.moe_dense(x.cpu(), topk_idx.cpu(), weights.cpu(), expert_fn),
                         "combine after the error")
    buffer.close()


def check_killed_peer(rank: int, world_size: int, seed: int, case: dict):
    """The last rank is SIGKILLed: on the host before dispatch (case["when"] == "host"), or on the GPU
    mid-exchange ("device": after the dispatch barrier, before it sends; ipc backend, exact=False).
    The survivors raise TimeoutError naming the step (and, on the device, the dead rank) within the
    timeout, and their output buffers are untouched outside what dispatch returns."""
    device = case.get("device", "cpu")
    x, topk_idx, weights = make_inputs(seed, rank, case, device)
    buffer = ep.Buffer(dist.group.WORLD, max(case["tokens"]), case["hidden"], case["experts"],
                       backend=case["backend"], timeout_s=3.0, max_topk=case["topk"])
    victim = world_size - 1
    if rank == victim:
        if case["when"] == "device":
            buffer._impl._barrier(1)  # the peers get past the barrier, then wait for rows that never come
            torch.cuda.synchronize()
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        if case["when"] == "device":
            buffer.dispatch(x, topk_idx, weights, exact=False)
            buffer.check()
        else:
            buffer.dispatch(x, topk_idx, weights)
    except TimeoutError as exc:
        elapsed = time.monotonic() - start
        assert "dispatch" in str(exc), str(exc)
        if case["when"] == "device":
            assert f"waiting for rank {victim}" in str(exc), str(exc)
        assert elapsed < 3.0 + 10.0, f"rank {rank}: the timeout took {elapsed:.1f} s for timeout_s=3"
    else:
        raise AssertionError(f"rank {rank}: dispatch returned although rank {victim} was killed")


def check_close_and_recreate(rank: int, world_size: int, seed: int, case: dict):
    """case["rounds"] times: a Buffer, one exchange, close() (collective): nothing is leaked and every
    round's result is right (a peer's freed buffer would fail the next round or crash)."""
    from deepseek_ops.ep import _ipc
    for round_idx in range(case["rounds"]):
        x, topk_idx, weights = make_inputs(seed + round_idx, rank, case, case.get("device", "cpu"))
        buffer = ep.Buffer(dist.group.WORLD, max(case["tokens"]), case["hidden"], case["experts"],
                           backend=case["backend"], max_topk=case["topk"])
        res = buffer.dispatch(x, topk_idx, weights)
        out = buffer.combine(apply_experts(res.recv_x, res.recv_topk_idx, rank * (case["experts"] // world_size)),
                             res.handle, weights)
        assert_bitwise_equal(out.cpu(), reference.moe_dense(x.cpu(), topk_idx.cpu(), weights.cpu(), expert_fn),
                             f"rank {rank} round {round_idx}")
        buffer.close()
    assert not _ipc._LEAKED, f"rank {rank}: {len(_ipc._LEAKED)} buffer(s) leaked by a coordinated close"


def check_close_protocol(rank: int, world_size: int, seed: int, case: dict):
    """IpcBackend.close() over the real group, on CPU tensors standing in for the buffer and the peers'
    mappings. case["peer_closes"]: whether the last rank closes too (else it sleeps past the timeout)."""
    import warnings

    from deepseek_ops.ep import _ipc
    backend = object.__new__(_ipc.IpcBackend)
    own, mapped = torch.zeros(16), {p: torch.zeros(16) for p in range(world_size) if p != rank}
    backend.__dict__.update(group=dist.group.WORLD, rank=rank, timeout=datetime.timedelta(seconds=2), buffer=own,
                            peers=dict(mapped), peer_ptrs=torch.zeros(world_size), broken=False,
                            _device_idle=lambda: None)
    if rank == world_size - 1 and not case["peer_closes"]:
        time.sleep(6.0)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.close()
    assert backend.buffer is None and not backend.peers, "close() must drop the buffer and the peers' mappings"
    leaked = any(t is own for t in _ipc._LEAKED)
    if case["peer_closes"]:
        assert not leaked and not caught, f"rank {rank}: leaked {leaked}, warnings {[str(w.message) for w in caught]}"
    else:
        assert leaked, f"rank {rank}: the buffer was released although a peer never confirmed its unmap"
        assert any("close: peers done" in str(w.message) and "leaking" in str(w.message) for w in caught), caught


def _expect_value_error(fn, match: str, rank: int):
    try:
        fn()
    except ValueError as exc:
        assert match in str(exc), f"rank {rank}: message {exc} does not mention {match!r}"
        return
    raise AssertionError(f"rank {rank}: no ValueError (expected one mentioning {match!r})")


def check_timeout(rank: int, world_size: int, seed: int, case: dict):
    """The last rank never calls dispatch: the others raise TimeoutError naming the step, in time."""
    x, topk_idx, weights = make_inputs(seed, rank, case, case.get("device", "cpu"))
    buffer = ep.Buffer(dist.group.WORLD, max(case["tokens"]), case["hidden"], case["experts"],
                       backend=case.get("backend", "torch"), timeout_s=2.0, max_topk=case["topk"])
    if rank == world_size - 1:
        time.sleep(8.0)  # alive but absent
        return
    start = time.monotonic()
    try:
        buffer.dispatch(x, topk_idx, weights)
    except TimeoutError as exc:
        elapsed = time.monotonic() - start
        assert "dispatch" in str(exc), str(exc)
        assert elapsed < 7.0, f"timeout took {elapsed:.1f} s for timeout_s=2"
        return
    raise AssertionError(f"rank {rank}: dispatch returned although a rank never arrived")


def check_repeat(rank: int, world_size: int, seed: int, case: dict):
    """case["rounds"] rounds of dispatch -> f -> combine give the same bits every time (no races)."""
    x, topk_idx, weights = make_inputs(seed, rank, case, "cuda")
    buffer = ep.Buffer(dist.group.WORLD, max(case["tokens"]), case["hidden"], case["experts"],
                       backend=case.get("backend", "ipc"), max_topk=case["topk"])
    epr = case["experts"] // world_size
    first = None
    for round_idx in range(case["rounds"]):
        res = buffer.dispatch(x, topk_idx, weights)
        out = buffer.combine(apply_experts(res.recv_x, res.recv_topk_idx, rank * epr), res.handle, weights)
        if first is None:
            first = (res.recv_topk_idx.clone(), res.recv_x.clone(), out.clone())
            assert_bitwise_equal(out.cpu(), reference.moe_dense(x.cpu(), topk_idx.cpu(), weights.cpu(), expert_fn),
                                 f"rank {rank} combine")
            continue
        assert torch.equal(res.recv_topk_idx, first[0]), f"rank {rank} round {round_idx}: m_indices changed"
        valid = first[0] >= 0
        assert torch.equal(res.recv_x[valid], first[1][valid]), f"rank {rank} round {round_idx}: recv_x changed"
        assert torch.equal(out, first[2]), f"rank {rank} round {round_idx}: combine changed"
    buffer.close()


def check_ipc_device_timeout(rank: int, world_size: int, seed: int, case: dict):
    """Past the host checks, a peer that never launches its kernels: the device wait gives up after
    timeout_s and the host raises TimeoutError naming the step (no hang, no kernel left spinning)."""
    x, topk_idx, weights = make_inputs(seed, rank, case, "cuda")
    buffer = ep.Buffer(dist.group.WORLD, max(case["tokens"]), case["hidden"], case["experts"], backend="ipc",
                       timeout_s=2.0, max_topk=case["topk"])
    if rank == world_size - 1:
        time.sleep(10.0)  # alive, buffer mapped, but never arrives
        return
    start = time.monotonic()
    try:
        buffer._impl._dispatch(x, None, topk_idx, weights, True)  # skips the host-side agreement on purpose
    except TimeoutError as exc:
        assert "dispatch: barrier" in str(exc), str(exc)
        assert time.monotonic() - start < 8.0
    else:
        raise AssertionError(f"rank {rank}: dispatch returned although a peer never arrived")
    try:
        buffer.dispatch(x, topk_idx, weights)
    except RuntimeError as exc:
        assert "timed out earlier" in str(exc), str(exc)
    else:
        raise AssertionError("a Buffer that timed out must refuse further rounds")
    buffer.close()


def check_graph_replays(rank: int, world_size: int, seed: int, case: dict):
    """exact=False (no host sync) dispatch -> per-expert f -> combine, captured in a CUDA graph and
    replayed over case["rounds"] new inputs (same token count, copied into the captured tensors)."""
    x, topk_idx, weights = make_inputs(seed, rank, case, "cuda")
    buffer = ep.Buffer(dist.group.WORLD, max(case["tokens"]), case["hidden"], case["experts"], backend="ipc",
                       max_topk=case["topk"])
    first_expert = rank * (case["experts"] // world_size)

    def step():
        res = buffer.dispatch(x, topk_idx, weights, exact=False)
        e = (res.recv_topk_idx + first_expert).float().unsqueeze(1)  # expert_fn, vectorized (padding: unused)
        y = (res.recv_x.float() * (1.0 + e / 8.0) + e / 16.0).to(torch.bfloat16)
        return buffer.combine(y, res.handle, weights)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # eager warm-up: every rank runs the same rounds, so the device round counters agree
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for round_idx in range(case["rounds"]):
        new_x, new_idx, new_weights = make_inputs(seed + 1 + round_idx, rank, case, "cuda")
        x.copy_(new_x), topk_idx.copy_(new_idx), weights.copy_(new_weights)
        graph.replay()
        dense = reference.moe_dense(new_x.cpu(), new_idx.cpu(), new_weights.cpu(), expert_fn)
        assert_bitwise_equal(out.cpu(), dense, f"rank {rank} replay {round_idx}")
    buffer.check()
    buffer.close()
