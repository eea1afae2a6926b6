import pytest
import torch

from deepseek_ops.pytest_gpu import pytest_collection_modifyitems, pytest_configure  # noqa: F401 - pytest hooks


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run (the seed is printed on failure), never a fixed dataset."""
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.fixture
def gemm_config(monkeypatch):
    """Forces an FP8 GEMM tile configuration through DSO_FP8_GEMM_CONFIG (read on every launch)."""

    def force(block_m: int, block_n: int, stages: int = 0, cluster: int = 1):
        monkeypatch.setenv("DSO_FP8_GEMM_CONFIG", f"{block_m}x{block_n}x{stages}x{cluster}")

    return force
