"""`pytest benchmarks/ --benchmark-only`: collects the bench_*.py modules' pytest-benchmark tests.

Tests marked `gpu` skip, with the reason, without a Hopper GPU and the CUDA build.
"""
import pytest

from deepseek_ops.testing import hopper_available, skip_reason


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a Hopper GPU and the CUDA build; skipped elsewhere")


def pytest_collect_file(file_path, parent):
    # bench_<op>.py is not a test_*.py name, so pytest's default collection would miss it.
    # A bench file named on the command line is collected by pytest itself.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if hopper_available():
        return
    skip = pytest.mark.skip(reason=f"GPU benchmark: {skip_reason()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
