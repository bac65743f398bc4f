"""``triton``: the Triton kernels (GPU; CPU tensors under ``TRITON_INTERPRET=1``, Triton's interpreter).

* :mod:`aha.kernels.triton.prefill` -- forward and backward over queries sorted by route, global
  tiles split over the keys;
* :mod:`aha.kernels.triton.decode` -- split-KV decode steps in which local heads read only their window.

Importing this package needs no Triton; the kernel modules are imported on first use.
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

from aha.kernels.gating import apply_route_with_kernel
from aha.kernels.masks import KeyPadding, key_start


def triton_reasons(q: Tensor, padding: KeyPadding | None) -> list[str]:
    """Why the Triton kernels cannot run on these inputs (empty: they can)."""
    if importlib.util.find_spec("triton") is None:
        return ["Triton is not installed (pip install triton; it ships with CUDA builds of torch)"]
    reasons = []
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        reasons.append(f"runs on CUDA tensors (or under TRITON_INTERPRET=1), not {q.device.type}")
    head_dim = q.shape[-1]
    if not (head_dim >= 16 and head_dim & (head_dim - 1) == 0):
        reasons.append(f"needs a power-of-two head_dim >= 16, got {head_dim}")
    if padding is not None and padding.start is None:
        reasons.append("takes left and/or right key padding only; this key_padding_mask has holes (impl='flex' takes it)")
    return reasons


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    padding: KeyPadding | None = None,
    sink: int = 0,
    *,
    decode_step: bool = False,
) -> Tensor:
    """AHA attention with the Triton kernels; the shared implementation signature (q ``[B, Hq, Sq, D]``,
    k/v ``[B, Hkv, Skv, D]``, route ``[B, Hq, Sq]`` bool or float gate, 1 = global). ``decode_step``
    (one query, a bool route, no gradient) runs the split-KV decode kernel instead of the prefill ones."""
    first_key = key_start(padding, q.shape[0], q.device)
    if decode_step:
        from aha.kernels.triton.decode import triton_decode

        return triton_decode(q, k, v, route, window, scale, first_key, sink)
    from aha.kernels.triton.prefill import triton_prefill

    return apply_route_with_kernel(
        route, window >= k.shape[2], lambda hard, sink: triton_prefill(q, k, v, hard, window, scale, first_key, sink), sink
    )
