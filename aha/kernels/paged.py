"""One decode step of many sequences whose keys and values sit in a paged cache, one block each.

Serving engines (the vLLM plugin, :mod:`aha.integrations.vllm`) hold each running sequence's keys
and values in a block of a shared cache and decode every sequence by one token per step. Calling
:func:`aha.aha_attention` once per sequence costs a Python dispatch and a kernel launch each;
:func:`paged_decode_attention` runs the whole step in one call:

* ``cpp`` -- the C++ kernel's decode path (``aha::decode_paged``): the same split-KV dot products
  as a one-query :func:`aha.aha_attention` call, every sequence and head in one parallel region,
  reading each sequence's keys in place;
* ``loop`` -- :func:`aha.aha_attention` per sequence (any device, any head_dim).

``auto`` takes ``cpp`` where it serves the call, else ``loop``. Both follow the operator's NaN
contract (:mod:`aha.kernels.nonfinite`): a step whose output is not finite is redone by ``loop``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from aha.kernels._checks import AhaInputError
from aha.kernels.cpp import KERNEL_DTYPES, cpp_available

PagedImpl = Literal["auto", "cpp", "loop"]


def paged_decode_attention(
    q: Tensor,
    kv_cache: Tensor,
    blocks: Tensor,
    lengths: Tensor,
    route: Tensor,
    window: int,
    *,
    scale: float | None = None,
    sink: int = 0,
    impl: PagedImpl = "auto",
) -> Tensor:
    """AHA attention of one new query per sequence and query head, against a paged KV cache.

    Args:
        q: ``[requests, q_heads, head_dim]``, each sequence's query at its last position.
        kv_cache: ``[blocks, kv_heads, block_size, 2 * head_dim]``: keys, then values, along the
            last dim (which must be contiguous; other strides are free). GQA as in
            :func:`aha.aha_attention`.
        blocks: ``[requests]`` int64, the block holding each sequence.
        lengths: ``[requests]`` int64, the keys each sequence holds (its query's own included), in
            ``[1, block_size]``.
        route: ``[requests, q_heads]`` bool, True = global (every key of the sequence), False = local
            (its last ``window`` keys, plus the first ``sink``).
        window, scale, sink: as in :func:`aha.aha_attention`.
        impl: ``"auto"``, ``"cpp"`` or ``"loop"`` (see the module docstring).

    Returns:
        ``[requests, q_heads, head_dim]`` in ``q.dtype``.

    Raises:
        AhaInputError: malformed shapes, dtypes, window, lengths or blocks, or an ``impl`` that
            cannot serve the call (the message names the fix).
    """
    _check(q, kv_cache, blocks, lengths, route, window, sink)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    window, sink = min(window, kv_cache.shape[2]), min(sink, kv_cache.shape[2])
    reasons = _cpp_reasons(q, kv_cache)
    if impl == "cpp" and reasons:
        raise AhaInputError("impl='cpp' cannot serve this call: " + "; ".join(reasons))
    if impl in ("auto", "cpp") and not reasons:
        out, finite = torch.ops.aha.decode_paged(q, kv_cache, blocks, lengths, route, window, sink, scale)
        if bool(finite):
            return out
    return _loop(q, kv_cache, blocks, lengths, route, window, scale, sink)


def _cpp_reasons(q: Tensor, kv_cache: Tensor) -> list[str]:
    reasons = []
    if q.device.type != "cpu":
        reasons.append(f"the C++ kernel runs on CPU tensors, got {q.device}")
    if q.dtype not in KERNEL_DTYPES:
        reasons.append(f"the C++ kernel takes {KERNEL_DTYPES}, got {q.dtype}")
    if q.shape[-1] % 16:
        reasons.append(f"its paged decode takes a head_dim that is a multiple of 16, got {q.shape[-1]}")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        reasons.append("the last dims of q and kv_cache must be contiguous")
    if not reasons and not cpp_available():
        reasons.append("the C++ kernel is unavailable (see aha.kernels._cpp_build.cpp_kernel_error())")
    return reasons


def _loop(
    q: Tensor, kv_cache: Tensor, blocks: Tensor, lengths: Tensor, route: Tensor, window: int, scale: float, sink: int
) -> Tensor:
    from aha.kernels import aha_attention

    dim = q.shape[-1]
    out = torch.empty_like(q)
    for r, (block, length) in enumerate(zip(blocks.tolist(), lengths.tolist())):
        cached = kv_cache[block, :, :length].unsqueeze(0)
        out[r] = aha_attention(
            q[r, :, None].unsqueeze(0), cached[..., :dim], cached[..., dim:], route[r, :, None].unsqueeze(0),
            window, scale=scale, sink=sink,
        )[0, :, 0]  # fmt: skip
    return out


def _check(q: Tensor, kv_cache: Tensor, blocks: Tensor, lengths: Tensor, route: Tensor, window: int, sink: int) -> None:
    if q.dim() != 3 or kv_cache.dim() != 4:
        raise AhaInputError(
            f"q must be [requests, q_heads, head_dim] and kv_cache [blocks, kv_heads, block_size, 2 * head_dim], "
            f"got {tuple(q.shape)} and {tuple(kv_cache.shape)}"
        )
    requests, q_heads, dim = q.shape
    kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    if kv_cache.shape[3] != 2 * dim:
        raise AhaInputError(f"kv_cache's last dim must be 2 * head_dim = {2 * dim} (keys, then values), got {kv_cache.shape[3]}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise AhaInputError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if q.dtype != kv_cache.dtype or q.device != kv_cache.device:
        raise AhaInputError(f"q and kv_cache must share dtype and device, got {q.dtype}/{q.device} and {kv_cache.dtype}/{kv_cache.device}")
    for name, t in (("blocks", blocks), ("lengths", lengths)):
        if t.dtype != torch.int64 or tuple(t.shape) != (requests,):
            raise AhaInputError(f"{name} must be int64 [requests] = [{requests}], got {t.dtype} {tuple(t.shape)}")
    if route.dtype != torch.bool or tuple(route.shape) != (requests, q_heads):
        raise AhaInputError(f"route must be bool [requests, q_heads] = {[requests, q_heads]}, got {route.dtype} {tuple(route.shape)}")
    if not isinstance(window, int) or window < 1:
        raise AhaInputError(f"window must be an int >= 1 (a local query always sees its own key), got {window!r}")
    if not isinstance(sink, int) or sink < 0:
        raise AhaInputError(f"sink must be an int >= 0, got {sink!r}")
    if requests and (int(lengths.min()) < 1 or int(lengths.max()) > block_size):
        raise AhaInputError(f"lengths must be in [1, block_size = {block_size}], got {lengths.tolist()}")
    if requests and (int(blocks.min()) < 0 or int(blocks.max()) >= kv_cache.shape[0]):
        raise AhaInputError(f"blocks must be in [0, {kv_cache.shape[0]}), got {blocks.tolist()}")
