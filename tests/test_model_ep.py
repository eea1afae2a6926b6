"""Expert parallelism on CPU (gloo, 2 ranks): experts sharded by rank, tokens exchanged through
deepseek_ops.ep; the model computes what the one-process model computes, and loads its shard
of a checkpoint."""
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepseek_ops.testing import calc_diff
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.model import RemoteExpert, random_model

WORLD = 2
ARGS = dict(dtype="bfloat16")  # ep dispatch carries bf16 rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, ckpt, seed, errors):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        torch.manual_seed(1234 + rank)  # each rank its own tokens
        full = random_model(preset("tiny", **ARGS), seed=seed)
        sharded = random_model(preset("tiny", **ARGS), seed=seed, ep_group=dist.group.WORLD)
        loaded = load_checkpoint(ckpt, ep_group=dist.group.WORLD)
        experts = loaded.main_layers[1].mlp.experts
        held = [j for j, e in enumerate(experts) if not isinstance(e, RemoteExpert)]
        assert held == list(range(rank * 8, rank * 8 + 8)), held
        tokens = torch.randint(0, full.args.vocab_size, (2, 13 + 5 * rank))  # ranks differ in token count
        with torch.no_grad():
            expected, _ = full(tokens)
            for model in (sharded, loaded):
                got, _ = model(tokens)
                assert calc_diff(got.double(), expected.double()) < 1e-4, calc_diff(got.double(), expected.double())
        try:
            save_checkpoint(sharded, ckpt / f"shard{rank}")
            raise AssertionError("saving an expert-parallel shard must be refused")
        except ValueError as exc:
            assert "expert parallel" in str(exc)
        dist.destroy_process_group()
    except Exception:  # report to the parent, which fails the test with the traceback
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")


def test_expert_parallel_matches_one_process(tmp_path):
    seed = int(torch.randint(0, 2**30, ()))
    save_checkpoint(random_model(preset("tiny", **ARGS), seed=seed), tmp_path)
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, tmp_path, seed, errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(failures)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
