"""torch.ops.deepseek_ops.* called directly, past the public functions' checks, with bad shapes: an
error on CPU (the reference kernels), on the meta device (the fake kernels, as torch.compile traces
them) and on the GPU before any kernel launches (the CUDA adapters' memory-safety checks)."""
import re

import pytest
import torch

import deepseek_ops  # noqa: F401 - registers the ops
from isolated import raised_in_subprocess

FP8 = torch.float8_e4m3fn
ops = torch.ops.deepseek_ops


def _bad_calls(device):
    def t(*shape, dtype=torch.float32):
        return torch.zeros(*shape, device=device).to(dtype)

    return {
        "fp8_gemm K mismatch": lambda: ops.fp8_gemm(t(128, 256, dtype=FP8), t(128, 2), t(128, 384, dtype=FP8),
                                                     t(1, 3), torch.bfloat16, None),
        "grouped contiguous m_indices short": lambda: ops.grouped_fp8_gemm_contiguous(
            t(256, 128, dtype=FP8), t(256, 1), t(2, 128, 128, dtype=FP8), t(2, 1, 1), t(128, dtype=torch.int32)),
        "grouped masked G mismatch": lambda: ops.grouped_fp8_gemm_masked(
            t(2, 64, 128, dtype=FP8), t(2, 64, 1), t(3, 128, 128, dtype=FP8), t(3, 1, 1), t(2, dtype=torch.int32), 64),
        "dequant scales too small": lambda: ops.dequant_fp8_block(t(256, 256, dtype=FP8), t(1, 1), 128,
                                                                   torch.bfloat16),
        "mla_decode block_table rows": lambda: ops.mla_decode(
            t(2, 1, 16, 576, dtype=torch.bfloat16), t(4, 64, 1, 576, dtype=torch.bfloat16),
            t(1, 2, dtype=torch.int32), t(2, dtype=torch.int32), 0.1, False, t(132, 8, dtype=torch.int32),
            t(3, dtype=torch.int32), t(2, 1, 16, 512, dtype=torch.bfloat16)),
        "ep_combine weights shape": lambda: ops.ep_combine(t(8, 64, dtype=torch.bfloat16), t(4, 2, dtype=torch.int32),
                                                           t(4, 3)),
        "ep_permute x rows": lambda: ops.ep_permute(t(3, 64, dtype=torch.bfloat16), None, None,
                                                    t(4, 2, dtype=torch.int64), 8, 4, 40),
    }


CASES = list(_bad_calls("cpu"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_shapes_raise(case, device):
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        _bad_calls(device)[case]()


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_bad_shapes_raise_before_launch(case):
    # In a child process: a crash in the adapters' checks fails this case, not the whole session.
    raised = raised_in_subprocess("test_direct_ops", f"m._bad_calls('cuda')[{case!r}]()")
    assert re.match(r"RuntimeError: .*(deepseek_ops|_gemm|mla_|ep_|dequant)", raised), raised
