"""The Triton kernels compile for NVIDIA GPUs (frontend, LLVM and ptxas), checked without a GPU.

Catches what Triton's interpreter does not (types that differ between branches, unsupported ops,
shared memory over the limit). The compiler needs the kernels decorated outside the interpreter,
so the compilation runs in a child process with ``TRITON_INTERPRET=0`` (this file is its script).
Skipped where Triton is not installed.
"""

import inspect
import itertools
import json
import os
import subprocess
import sys

import pytest

CAPABILITIES = [80, 90]
DTYPES = ["fp32", "bf16"]
KERNEL_NAMES = ["prefill", "merge", "dq", "dkdv", "decode"]
POINTER_TYPES = {
    "route_ptr": "u8",
    "order_ptr": "i32",
    "n_global_ptr": "i32",
    "first_key_ptr": "i32",
    "tile_lo_ptr": "i32",
    "tile_hi_ptr": "i32",
    "acc_ptr": "fp32",
    "max_ptr": "fp32",
    "sum_ptr": "fp32",
    "lse_ptr": "fp32",
    "delta_ptr": "fp32",
    "dq_ptr": "fp32",
}  # q, k, v, out, do, dk and dv pointers take the input dtype
FLOAT_ARGUMENTS = ("scale", "scale_log2e")


def signature(kernel, dtype: str) -> dict[str, str]:
    types = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name.endswith("_ptr"):
            types[name] = "*" + POINTER_TYPES.get(name, dtype)
        elif name.isupper():
            types[name] = "constexpr"
        else:
            types[name] = "fp32" if name in FLOAT_ARGUMENTS else "i32"
    return types


def compile_all() -> dict[str, str]:
    """``"kernel-dtype-capability" -> "ok"`` or the compiler's error, for every combination."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from aha.kernels.triton import decode as triton_decode
    from aha.kernels.triton import prefill as triton_prefill

    tiles = {"BLOCK_M": triton_prefill.BLOCK_M, "BLOCK_N": triton_prefill.BLOCK_N}
    kernels = {
        "prefill": (triton_prefill._prefill_tiles, {**tiles, "NUM_SPLITS": triton_prefill.NUM_SPLITS}),
        "merge": (triton_prefill._merge_splits, {"BLOCK_M": triton_prefill.BLOCK_M, "NUM_SPLITS": triton_prefill.NUM_SPLITS}),
        "dq": (triton_prefill._dq_tiles, {**tiles, "NUM_SPLITS": triton_prefill.NUM_SPLITS}),
        "dkdv": (triton_prefill._dkdv_blocks, tiles),
        "decode": (triton_decode._decode_chunks, {"CHUNK_SIZE": triton_decode.CHUNK, "BLOCK": triton_decode.BLOCK_N}),
    }
    results = {}
    for name, dtype, capability in itertools.product(KERNEL_NAMES, DTYPES, CAPABILITIES):
        kernel, constants = kernels[name]
        constants = {"HEAD_DIM": 64, **constants}
        if "PRECISION" in inspect.signature(kernel.fn).parameters:
            constants["PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
        try:
            source = ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=constants)
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
            results[f"{name}-{dtype}-{capability}"] = "ok" if compiled.asm["ptx"] else "no PTX"
        except Exception as exc:  # noqa: BLE001 -- reported per combination
            results[f"{name}-{dtype}-{capability}"] = repr(exc)[-2000:]
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_kernel_compiles_for_the_gpu(compiled, kernel_name, dtype, capability):
    assert compiled[f"{kernel_name}-{dtype}-{capability}"] == "ok"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
