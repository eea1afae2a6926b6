"""The one timing helper every benchmark uses (the protocol: benchmarks/README.md).

bench(fn)            median ms of single eager calls, CUDA events, L2 flushed before each run.
bench_graph(*fns)    median ms per call of `calls` invocations captured in one CUDA graph:
                     the kernel time of ops under ~50 us, with the launch path taken out;
                     several fns (the op on copies of its inputs) are called in turn.
time_op(*fns)        bench(fns[0]), or for an op under SHORT_OP_MS bench_graph over every fn
                     (the op on input_copies(...) of its inputs: operands from DRAM).
pytest_benchmark(b, fn) the pytest-benchmark entry of fn (time_op's median into its extra_info).
host_overhead_us(fn) wall-clock us per call of back-to-back eager calls (see its docstring).
bench_ranks(fn, g)   the slowest rank's median ms of a collective op, every run started together.
warm_up()            >= 1 s of sustained GPU work; every function above runs it once per process.

`fn` is a zero-argument callable that launches the work on the current stream; inputs are made
by the caller once and shared by every implementation being compared.
"""
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

L2_FLUSH_BYTES = 256 * 1024 * 1024  # several times the 50-60 MB L2 of H100/H200
SHORT_OP_MS = 0.05  # protocol: under ~50 us the kernel time comes from CUDA-graph replay
ROTATION_BYTES = 256 * 1024 * 1024  # inputs of the rotated copies together: several times the L2
MAX_COPIES = 64
MAX_RUNS = 1000

IDLE_REWARM_S = 2.0  # GPU idle longer than this (compiling a peer, checking results): warm again

_flush_buffer: Optional[torch.Tensor] = None
_last_busy: dict = {}  # device index -> time.perf_counter() when our last timing finished


def warm_up(seconds: float = 1.0) -> None:
    """Keeps the GPU busy with bf16 matmuls for `seconds` of wall time.

    NOTE: an idle H100/H200 sits at 345 MHz and ramps its clocks only under sustained load; a
    cold first measurement reads 20-40% low. The timing functions call it on their first use in
    the process and again whenever the GPU sat idle for more than IDLE_REWARM_S since the last one
    (a torch.compile of a peer takes long enough for the clocks to drop).
    """
    device = torch.cuda.current_device()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
    _last_busy[device] = time.perf_counter()


def _ensure_warm() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks.timing needs a CUDA GPU")
    last = _last_busy.get(torch.cuda.current_device())
    if last is None or time.perf_counter() - last > IDLE_REWARM_S:
        warm_up()


def _mark_busy() -> None:
    _last_busy[torch.cuda.current_device()] = time.perf_counter()


def flush_l2_cache() -> None:
    """Evicts the L2 by writing a 256 MiB buffer (the buffer is allocated once per process)."""
    global _flush_buffer
    if _flush_buffer is None or _flush_buffer.device.index != torch.cuda.current_device():
        _flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    _flush_buffer.fill_(0x5A)


def _estimate_ms(fn: Callable[[], object], warmup_ms: float) -> float:
    """Runs fn for about warmup_ms (at least 2 calls) and returns the mean ms per call."""
    fn()  # first call: lazy init, autotuning, allocator growth
    torch.cuda.synchronize()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if calls >= 2 and elapsed_ms >= warmup_ms:
            return elapsed_ms / calls


def _num_runs(estimate_ms: float, min_runs: int, target_ms: float = 200.0) -> int:
    # More runs for fast ops (cheap and steadier medians), never fewer than min_runs.
    return int(min(MAX_RUNS, max(min_runs, target_ms / max(estimate_ms, 1e-3))))


def bench(fn: Callable[[], object], *, flush_l2: bool = True, min_runs: int = 30,
          warmup_ms: float = 50.0) -> float:
    """Median ms of `fn()` over at least min_runs runs, each timed with CUDA events.

    With flush_l2 the L2 is flushed before every run, outside the timed region. The flush also
    gives the host a head start (it is queued ahead of the start event and takes ~80 us on the
    GPU), so the launch cost of fn is mostly hidden; ops under ~50 us should still use
    bench_graph, whose figure has no launch cost at all.
    """
    _ensure_warm()
    runs = _num_runs(_estimate_ms(fn, warmup_ms), min_runs)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for start, end in zip(starts, ends):
        if flush_l2:
            flush_l2_cache()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    _mark_busy()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def bench_graph(*fns: Callable[[], object], calls: int = 100, replays: int = 30,
                warmup_ms: float = 20.0) -> float:
    """Median ms per call: `calls` invocations captured in one CUDA graph, replayed >= 30 times.

    This is the kernel time of short ops (protocol: ops under ~50 us) with the Python, dispatcher
    and launch costs removed; report host_overhead_us(fn) beside it. The L2 is not flushed
    between the captured calls. With one fn, an op whose inputs fit in L2 (~50 MB) is measured
    with warm inputs. With several (the same op on copies of its inputs, together well over the
    L2), the calls cycle through them, so every call reads its inputs from DRAM (protocol: inputs
    rotated), as a model step reads each layer's own weights. If capture fails (an op that
    synchronizes, allocates through a non-graph-safe path, or calls the host), this says so on
    stderr and returns bench(fns[0]) instead.
    """
    _ensure_warm()
    _estimate_ms(fns[0], warmup_ms)  # eager warm-up before capture: lazy init must not be captured
    for fn in fns[1:]:
        fn()
    try:
        graph = _capture(fns, calls)
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager timing
        print(f"bench_graph: CUDA graph capture failed ({type(exc).__name__}: {exc}); "
              "falling back to bench() (eager, CUDA events)", file=sys.stderr)
        try:
            torch.cuda.synchronize()
        except RuntimeError:
            pass
        return bench(fns[0])
    graph.replay()  # first replay uploads the graph
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    _mark_busy()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / calls


def _capture(fns, calls: int) -> "torch.cuda.CUDAGraph":
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for i in range(calls):
                fns[i % len(fns)]()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def input_copies(inputs: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """inputs and copies of them in fresh memory (same shapes and strides), enough that a graph
    replay cycling through them reads every operand from DRAM (protocol: inputs rotated)."""
    size = sum(t.untyped_storage().nbytes() for t in inputs.values())
    copies = [inputs]
    for _ in range(min(MAX_COPIES, -(-ROTATION_BYTES // size)) - 1):
        copies.append({k: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                       for k, t in inputs.items()})
    return copies


def time_op(*fns: Callable[[], object]) -> float:
    """Median ms of fns[0] (bench); an op under SHORT_OP_MS is timed by bench_graph over all fns:
    the same op on input_copies of its inputs, so that no call finds its operands in L2."""
    ms = bench(fns[0])
    return bench_graph(*fns) if ms < SHORT_OP_MS else ms


def pytest_benchmark(benchmark, fn: Callable[[], object]) -> float:
    """A pytest-benchmark entry for fn: its protocol time (time_op) goes into
    benchmark.extra_info["median_ms"] and is returned; pytest-benchmark's own figure is the wall
    time of a synchronized call (30 rounds after 3 warm-up rounds)."""
    ms = time_op(fn)
    benchmark.extra_info["median_ms"] = ms

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=30, warmup_rounds=3)
    return ms


def host_overhead_us(fn: Callable[[], object], *, calls: int = 200) -> float:
    """Wall-clock us per call of `calls` back-to-back eager calls, synchronized once at the end.

    Nothing is subtracted. For a short op this is the host cost of one call (Python wrapper,
    argument checks, dispatcher, allocation, launch), because the GPU finishes each kernel before
    the host has queued the next; for an op whose kernel outlasts its launch path it tends to the
    kernel time instead. Either way it is the per-call time an eager caller sees.
    """
    _ensure_warm()
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    elapsed_s = time.perf_counter() - start
    _mark_busy()
    return elapsed_s * 1e6 / calls


def bench_ranks(fn: Callable[[], object], group, *, runs: int = 50, warmup_calls: int = 10) -> float:
    """The slowest rank's median ms of `fn()` (a collective: every rank of `group` calls it).

    Each run: L2 flush, a barrier of the group (the ranks start together, so a rank's time includes
    waiting for its slowest peer, as in a model step), CUDA events around one eager call, a device
    sync. An op that syncs with the host inside is timed end to end, its host work included. Every
    rank makes the same number of calls (a collective called a different number of times hangs).
    """
    _ensure_warm()
    for _ in range(warmup_calls):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        flush_l2_cache()
        dist.barrier(group=group)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    _mark_busy()
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return float(slowest.item())


def time_rounds(copies: List[Dict[str, Callable[[], object]]], impls: List[str],
                rounds: Optional[Dict[str, List[float]]] = None) -> Dict[str, float]:
    """Protocol for implementations compared in one process: each impl is timed (time_op over the
    copies of its inputs) in two rounds, the second in reversed order, and the mean of its two
    medians returned: the H200 drifts under its power cap, so a single round's ratio can be off by
    several percent. `rounds`, if given, receives each impl's two medians (their spread is reported)."""
    times: Dict[str, List[float]] = {impl: [] for impl in impls}
    for order in (list(impls), list(reversed(impls))):
        for impl in order:
            times[impl].append(time_op(*[c[impl] for c in copies]))
    if rounds is not None:
        rounds.update(times)
    return {impl: sum(t) / len(t) for impl, t in times.items()}
