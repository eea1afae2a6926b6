import os

import pytest
import torch

from deepseek_ops import pytest_gpu

SEED_ENV = "DSO_TEST_SEED"


def pytest_configure(config):
    pytest_gpu.pytest_configure(config)


def pytest_collection_modifyitems(config, items):
    pytest_gpu.pytest_collection_modifyitems(config, items)
    # The slow tier runs on request only: when the -m expression names it (-m slow, -m "gpu or slow").
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow tier: select it with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run, never a fixed dataset. A failing test's report shows its seed;
    DSO_TEST_SEED=<seed> re-runs it with the same inputs."""
    seed = int(os.environ[SEED_ENV]) if os.environ.get(SEED_ENV) else torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = dict(item.user_properties).get("seed")
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"{SEED_ENV}={seed} python -m pytest '{item.nodeid}'"))


@pytest.fixture
def gemm_config(monkeypatch):
    """Forces an FP8 GEMM tile configuration through DSO_FP8_GEMM_CONFIG (read on every launch)."""

    def force(block_m: int, block_n: int, stages: int = 0, cluster: int = 1, splits: int = 1):
        monkeypatch.setenv("DSO_FP8_GEMM_CONFIG", f"{block_m}x{block_n}x{stages}x{cluster}x{splits}")

    return force
