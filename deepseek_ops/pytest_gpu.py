"""The `gpu` marker's pytest hooks, shared by tests/conftest.py and benchmarks/conftest.py (each
imports them into its namespace): items marked `gpu` skip, with the reason, without a Hopper GPU
and the CUDA build."""
import pytest

from deepseek_ops.testing import hopper_available, skip_reason


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a Hopper GPU and the CUDA build; skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    if hopper_available():
        return
    skip = pytest.mark.skip(reason=f"needs a Hopper GPU: {skip_reason()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
