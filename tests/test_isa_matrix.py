"""The C++ kernel under every oneDNN ISA cap this CPU can take: most users' CPUs have no bf16
instructions, and oneDNN decides at run time what it can generate (``ONEDNN_MAX_CPU_ISA`` caps it).

Each cap runs tests/isa_probe.py in a fresh process with an empty tuning cache (the built kernel is
reused): the install-time calibration, then ``impl="auto"`` prefill and decode, forward and backward,
in fp32/bf16/fp16 against the reference. Caps above this CPU are skipped."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from kernel_support import cpu_flags

from aha.kernels import _cpp_build

#: oneDNN ISA caps, lowest first, and the /proc/cpuinfo flags a CPU needs to run under each.
CAPS = {
    "AVX2": {"avx2", "fma"},
    "AVX512_CORE": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "AVX512_CORE_VNNI": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
    "AVX512_CORE_BF16": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"},
    "AVX512_CORE_AMX": {
        "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
        "amx_tile", "amx_bf16", "amx_int8",
    },
}  # fmt: skip


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="oneDNN ISA caps are x86-64")
@pytest.mark.parametrize("cap", CAPS)
def test_auto_is_exact_in_every_dtype_under_the_isa_cap(cap, tmp_path):
    missing = CAPS[cap] - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)}")
    if not _cpp_build.load_cpp_kernel():
        pytest.skip(f"no C++ kernel here: {_cpp_build.cpp_kernel_error()}")
    built = _cpp_build.library_path(_cpp_build._compiler() or "")
    (tmp_path / built.name).symlink_to(built)  # the same kernel, an empty tuning cache
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap, "AHA_CACHE_DIR": str(tmp_path)}
    env.pop("AHA_CPU_TUNING", None)  # measure, as `make install` does
    env.pop("AHA_CPU_MICROKERNEL", None)
    probe = Path(__file__).with_name("isa_probe.py")
    result = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{cap}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"torch.float32", "torch.bfloat16", "torch.float16"}
    tuned = sorted(p.name.split("-")[0] for p in (tmp_path / "cpu-tuning").glob("*.json"))
    assert tuned == ["bfloat16", "float16", "float32"], tuned
    for dtype, found in report.items():
        assert found["microkernels"]["vector"].startswith(("avx", "generic")), (dtype, found)
        assert found["chosen"] in ("vector", "onednn"), (dtype, found)
