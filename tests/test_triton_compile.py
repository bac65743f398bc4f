"""The Triton kernels compile for NVIDIA GPUs (frontend, LLVM and ptxas), checked without a GPU.

Catches what Triton's interpreter does not (types that differ between branches, unsupported ops,
shared memory over the limit). Skipped where Triton is not installed (CI).
"""

import inspect

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from aha.kernels import triton_decode, triton_prefill  # noqa: E402

POINTER_TYPES = {
    "route_ptr": "u8",
    "order_ptr": "i32",
    "n_global_ptr": "i32",
    "first_key_ptr": "i32",
    "acc_ptr": "fp32",
    "max_ptr": "fp32",
    "sum_ptr": "fp32",
}  # q, k, v and out pointers take the input dtype
KERNELS = {
    "prefill": (triton_prefill._prefill_tiles, {"BLOCK_M": triton_prefill.BLOCK_M, "BLOCK_N": triton_prefill.BLOCK_N, "NUM_SPLITS": triton_prefill.NUM_SPLITS}),
    "merge": (triton_prefill._merge_splits, {"BLOCK_M": triton_prefill.BLOCK_M, "NUM_SPLITS": triton_prefill.NUM_SPLITS}),
    "decode": (triton_decode._decode_chunks, {"CHUNK_SIZE": triton_decode.CHUNK, "BLOCK": triton_decode.BLOCK_N}),
}


def signature(kernel, dtype: str) -> dict[str, str]:
    types = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name.endswith("_ptr"):
            types[name] = "*" + POINTER_TYPES.get(name, dtype)
        elif name.isupper():
            types[name] = "constexpr"
        else:
            types[name] = "fp32" if name == "scale_log2e" else "i32"
    return types


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kernel_name", list(KERNELS))
def test_kernel_compiles_for_the_gpu(kernel_name, dtype, capability):
    kernel, constants = KERNELS[kernel_name]
    constants = {"HEAD_DIM": 64, **constants}
    if "PRECISION" in inspect.signature(kernel.fn).parameters:
        constants["PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
    source = ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
    assert compiled.asm["ptx"]
