"""The fast implementations under test: the C++ kernel once per microkernel this CPU runs."""

import torch

from aha.kernels.cpu_tuning import microkernel_name


def cpp_microkernels(dtype: torch.dtype = torch.float32) -> list[str]:
    """``cpp:<microkernel>`` for the C++ kernel's microkernels that run ``dtype`` here (none without the kernel)."""
    return [f"cpp:{m}" for m in ("vector", "onednn") if microkernel_name(dtype, m)]


#: ``split`` and ``cpp:<microkernel>`` for every microkernel this CPU runs in fp32.
FAST_IMPLS = ["split", *cpp_microkernels()]


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()
