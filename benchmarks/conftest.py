"""`pytest benchmarks/ --benchmark-only`: collects the bench_*.py modules' pytest-benchmark tests.

Tests marked `gpu` skip, with the reason, without a Hopper GPU and the CUDA build.
"""
import pytest

from deepseek_ops.pytest_gpu import pytest_collection_modifyitems, pytest_configure  # noqa: F401 - pytest hooks


def pytest_collect_file(file_path, parent):
    # bench_<op>.py is not a test_*.py name, so pytest's default collection would miss it.
    # A bench file named on the command line is collected by pytest itself.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None

