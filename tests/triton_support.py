"""Shared by the Triton kernel tests: the device they run on and random inputs there.

Triton kernels run on a CUDA device, or on CPU under Triton's interpreter (``TRITON_INTERPRET=1``,
which ``conftest.py`` sets where there is no GPU; the test extra installs Triton on Linux x86-64).
"""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_a_triton_device = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a CUDA device (or TRITON_INTERPRET=1 for Triton's interpreter on CPU)",
)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def random_inputs(batch, q_heads, kv_heads, seq_q, seq_kv, dtype=torch.float32, dim=64, seed=0):
    """q ``[batch, q_heads, seq_q, dim]`` and k, v ``[batch, kv_heads, seq_kv, dim]`` on :data:`DEVICE`."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return tuple(
        torch.randn(batch, heads, seq, dim, generator=gen, device=DEVICE, dtype=dtype)
        for heads, seq in ((q_heads, seq_q), (kv_heads, seq_kv), (kv_heads, seq_kv))
    )


def left_padding(batch, seq_kv, lengths):
    """``[batch, seq_kv]`` key padding mask with the last ``lengths[b]`` keys of row ``b`` real."""
    return torch.arange(seq_kv, device=DEVICE)[None, :] >= (seq_kv - torch.tensor(lengths, device=DEVICE))[:, None]
