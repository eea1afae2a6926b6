"""Runs a statement that must raise in a fresh Python process, so that a crash (a segmentation fault
in an extension) fails the calling test with the child's output instead of ending the test session."""
import os
import subprocess
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)

_CHILD = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
import {module} as m
try:
    {statement}
except Exception as exc:
    print("RAISED", type(exc).__name__ + ":", str(exc).splitlines()[0] if str(exc) else "", flush=True)
else:
    print("RAISED nothing", flush=True)
if torch.cuda.is_available():
    torch.cuda.synchronize()  # no kernel ran into a fault
"""


def raised_in_subprocess(module: str, statement: str, timeout: float = 300) -> str:
    """'Type: first line of the message' of what `statement` raised, with tests/`module` imported
    as m; 'nothing' if it returned. Fails (AssertionError with the child's output) if the child
    process did not exit normally."""
    code = _CHILD.format(root=ROOT, tests=TESTS_DIR, module=module, statement=statement)
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                       timeout=timeout)
    output = (r.stdout + r.stderr).strip()
    assert r.returncode == 0, f"the process ended with {r.returncode} instead of raising:\n{output[-3000:]}"
    lines = [line for line in r.stdout.splitlines() if line.startswith("RAISED ")]
    assert lines, f"no result from the child:\n{output[-3000:]}"
    return lines[-1][len("RAISED "):]
