"""The generated PTX headers are what their generators write today (no hand edits, no stale copy)."""
import subprocess
import sys
from pathlib import Path

import pytest

PTX = Path(__file__).resolve().parent.parent / "ptx"


@pytest.mark.parametrize("generator, args, header", [
    ("gen_wgmma.py", ["bf16"], "wgmma_bf16.cuh"),
    ("gen_wgmma.py", ["e4m3"], "wgmma_e4m3.cuh"),
])
def test_header_matches_its_generator(generator, args, header):
    written = subprocess.run([sys.executable, str(PTX / generator), *args], check=True, capture_output=True,
                             text=True).stdout
    assert written == (PTX / header).read_text(), f"ptx/{header} differs from `python ptx/{generator} {' '.join(args)}`"
