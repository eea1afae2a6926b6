"""Expert parallelism on CPU (gloo, 2 ranks): experts sharded by rank, tokens exchanged through
deepseek_ops.ep; the model computes what the one-process model computes, and loads its shard
of a checkpoint. On the GPU (marked): the kernels backend with FP8 dispatch over the ipc tier (one
GPU per rank where there are enough, over NVLink) and over torch.distributed."""
import pytest
import torch
import torch.distributed as dist

from deepseek_ops.testing import calc_diff
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.model import RemoteExpert, random_model

from ep_workers import MULTI_PROCESS_TIMEOUT, run_ranks

WORLD = 2
ARGS = dict(dtype="bfloat16")  # ep dispatch carries bf16 rows


def _worker(rank, world_size, ckpt, seed):
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
    try:  # not pytest.raises: its Failed is no Exception, and mp.spawn reports only Exceptions' tracebacks
        save_checkpoint(sharded, ckpt / f"shard{rank}")
    except ValueError as exc:
        assert "expert parallel" in str(exc)
    else:
        raise AssertionError("saving an expert-parallel shard must be refused")


@MULTI_PROCESS_TIMEOUT
def test_expert_parallel_matches_one_process(tmp_path):
    seed = int(torch.randint(0, 2**30, ()))
    save_checkpoint(random_model(preset("tiny", **ARGS), seed=seed), tmp_path)
    run_ranks(_worker, WORLD, tmp_path, seed)


def _uneven_worker(rank, world_size, seed):
    # Rank 1 has more tokens than the Buffer's first capacity (4096), rank 0 few: both must re-create
    # it together, with the same capacity, or the collective construction waits forever. Rank 1's
    # 4100 tokens are 41 sequences of 100: the MoE counts tokens, and attention over one 4100-token
    # sequence in bf16 took minutes on a CPU without bf16 matmul units (past the ranks' 100 s deadline).
    torch.manual_seed(seed + rank)
    full = random_model(preset("tiny", **ARGS), seed=seed)
    sharded = random_model(preset("tiny", **ARGS), seed=seed, ep_group=dist.group.WORLD)
    moe = sharded.main_layers[1].mlp
    with torch.no_grad():
        for batch, length in ((1, 16), (41, 100) if rank == 1 else (1, 7), (1, 16)):
            tokens = torch.randint(0, full.args.vocab_size, (batch, length))
            expected, _ = full(tokens)
            got, _ = sharded(tokens)
            error = calc_diff(got.double(), expected.double())
            assert error < 1e-4, f"{batch} x {length} tokens: calc_diff {error:.3e}"
            capacities = [None] * world_size
            dist.all_gather_object(capacities, moe.ep_buffer.max_tokens_per_rank)
            assert len(set(capacities)) == 1 and capacities[0] >= 4096, capacities
    assert moe.ep_buffer.max_tokens_per_rank >= 4100


@MULTI_PROCESS_TIMEOUT
def test_expert_parallel_ranks_agree_on_buffer_capacity():
    run_ranks(_uneven_worker, WORLD, int(torch.randint(0, 2**30, ())))


def _kernels_worker(rank, world_size, seed, ep_backend):
    args = preset("tiny", dtype="bfloat16", fp8=True)
    full = random_model(args, "kernels", device="cuda", seed=seed).prepare()
    sharded = random_model(args, "kernels", device="cuda", seed=seed, ep_group=dist.group.WORLD).prepare()
    moe = sharded.main_layers[1].mlp
    assert moe.w13 is not None and moe.w13.shape[0] == args.n_routed_experts // world_size  # grouped FP8 path on
    moe.ep_backend = ep_backend
    torch.manual_seed(seed + rank)  # each rank its own tokens, and a different count
    tokens = torch.randint(0, args.vocab_size, (3, 29 + 11 * rank), device="cuda")
    with torch.no_grad():
        expected, _ = full(tokens)
        got, _ = sharded(tokens)
    assert moe.ep_buffer.backend == ep_backend
    error = calc_diff(got.double(), expected.double())
    assert error < 1e-6, f"calc_diff {error:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("ep_backend", ["ipc", "torch"])
@MULTI_PROCESS_TIMEOUT
def test_gpu_expert_parallel_kernels_match_one_process(ep_backend):
    seed = int(torch.randint(0, 2**30, ()))
    run_ranks(_kernels_worker, WORLD, seed, ep_backend)
