"""The test harness itself (tests/conftest.py, pytest.ini), run on a scratch suite in a subprocess: a
failing test's report names its seed and that seed replays its inputs; the slow tier runs only on
request; the per-test timeout is on."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRATCH_TESTS = '''
import time

import pytest
import torch


def test_fails_with_random_input():
    assert False, f"drew {torch.rand(()).item()!r}"


@pytest.mark.slow
def test_slow():
    pass


def test_hangs():
    time.sleep(30)


def test_timeout_configured(request):
    assert float(request.config.getini("timeout")) > 0
'''


def _run_scratch(tmp_path, *args, env=None):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(ROOT / "pytest.ini", tmp_path / "pytest.ini")
    (tmp_path / "test_scratch.py").write_text(SCRATCH_TESTS)
    inherited = {k: v for k, v in os.environ.items() if k != "DSO_TEST_SEED"}
    env = {**inherited, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "-o", "timeout=3", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_failure_report_names_the_seed_and_the_seed_replays(tmp_path):
    first = _run_scratch(tmp_path, "test_scratch.py::test_fails_with_random_input")
    assert first.returncode == 1, first.stdout + first.stderr
    seeds = re.findall(r"DSO_TEST_SEED=(\d+) python -m pytest 'test_scratch.py::test_fails_with_random_input'",
                       first.stdout)
    assert len(seeds) == 1, first.stdout
    drawn = set(re.findall(r"drew (\d\.\d+)", first.stdout))
    replay = _run_scratch(tmp_path, "test_scratch.py::test_fails_with_random_input", env={"DSO_TEST_SEED": seeds[0]})
    assert len(drawn) == 1 and set(re.findall(r"drew (\d\.\d+)", replay.stdout)) == drawn, (first.stdout, replay.stdout)
    assert f"DSO_TEST_SEED={seeds[0]} " in replay.stdout


def test_slow_tier_runs_on_request_and_hangs_time_out(tmp_path):
    default = _run_scratch(tmp_path, "-k", "slow or hangs or configured")
    assert re.search(r"SKIPPED \[1\] .*slow tier: select it with -m slow", default.stdout), default.stdout
    assert "Timeout (>3.0s)" in default.stdout + default.stderr, default.stdout
    assert re.search(r"1 failed, 1 passed, 1 skipped", default.stdout), default.stdout
    slow = _run_scratch(tmp_path, "-m", "slow")
    assert re.search(r"1 passed, 3 deselected", slow.stdout), slow.stdout
