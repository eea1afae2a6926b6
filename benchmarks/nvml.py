"""Mean SM clock and energy of a stretch of GPU work, read through NVML (libnvidia-ml, via ctypes).

For kernel A/B runs under the H200's power cap: two versions that differ by a few percent in time
may differ by more in energy per call, which decides their speed once the cap holds the clock.
"""
import ctypes
import threading
import time
from typing import Callable, Optional, Tuple

import torch

_NVML_CLOCK_SM = 1


class _Nvml:
    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self.lib.nvmlInit_v2())
        self.handle = ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByIndex_v2(torch.cuda.current_device(), ctypes.byref(self.handle)))

    @staticmethod
    def _check(status: int):
        if status != 0:
            raise RuntimeError(f"NVML call failed with status {status}")

    def energy_mj(self) -> int:
        value = ctypes.c_ulonglong()
        self._check(self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(value)))
        return value.value

    def sm_clock_mhz(self) -> int:
        value = ctypes.c_uint()
        self._check(self.lib.nvmlDeviceGetClockInfo(self.handle, _NVML_CLOCK_SM, ctypes.byref(value)))
        return value.value


_nvml: Optional[_Nvml] = None


def measure(fn: Callable[[], object], calls: int) -> Tuple[float, float]:
    """Runs fn `calls` times back to back; returns (mean SM clock in MHz, sampled every ~2 ms, and
    energy per call in mJ). The device's energy counter ticks coarsely: use >= 100 ms of work."""
    global _nvml
    if _nvml is None:
        _nvml = _Nvml()
    samples = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append(_nvml.sm_clock_mhz())
            time.sleep(0.002)

    torch.cuda.synchronize()
    sampler = threading.Thread(target=sample)
    start_mj = _nvml.energy_mj()
    sampler.start()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    done.set()
    sampler.join()
    energy = (_nvml.energy_mj() - start_mj) / calls
    return (sum(samples) / len(samples) if samples else float("nan")), energy
