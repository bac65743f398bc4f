"""GPU decode path: a Triton split-KV kernel in which local heads never read out-of-window keys.

One program per (batch, query head, cache chunk of :data:`CHUNK` keys). A program first computes
where its head's keys start (the first real key for a global head, ``max(first real key,
seq_kv - window)`` for a local one) and which sink keys a local head reads before that (the
``sink`` keys from the first real key on), and does nothing but write an empty partial when its
chunk holds neither, so a local head touches at most ``window / CHUNK + 2`` chunks of the cache
and a global head all of them. Each live program writes its chunk's unnormalised output, running max and sum
(flash-decoding); a second kernel merges the chunks with their log-sum-exp weights.

Only imported where Triton is installed; :func:`aha.kernels.triton.triton_reasons` says whether
it can run on given inputs (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, Triton's
interpreter, handy for debugging the kernel without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK = 1024  # keys per program: enough programs to fill a GPU at long caches, few partials to merge
BLOCK_N = 64  # keys per inner iteration
MERGE_BLOCK = 64  # partials per iteration of the merge


@triton.jit
def _attend_keys(
    q, k_base, v_base, stride_kn, stride_vn, key_lo, key_hi, acc, running_max, running_sum,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Online-softmax accumulation of keys ``[key_lo, key_hi)`` (nothing when the range is empty)."""
    dims = tl.arange(0, HEAD_DIM)
    for key0 in range(key_lo, key_hi, BLOCK):
        keys = key0 + tl.arange(0, BLOCK)
        valid = keys < key_hi
        k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))  # log2 units
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        p = tl.exp2(scores - new_max)
        correction = tl.exp2(running_max - new_max)
        v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
        running_sum = running_sum * correction + tl.sum(p, axis=0)
        running_max = new_max
    return acc, running_max, running_sum


@triton.jit
def _decode_chunks(
    q_ptr, k_ptr, v_ptr, route_ptr, first_key_ptr, acc_ptr, max_ptr, sum_ptr,
    seq_kv, window, sink, scale_log2e, q_heads, group, num_chunks,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    HEAD_DIM: tl.constexpr, CHUNK_SIZE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # batch * q_heads + head; int64: cache offsets pass 2**31 elements
    chunk = tl.program_id(1)
    batch = row // q_heads
    head = row % q_heads
    kv_head = head // group
    first_key = tl.load(first_key_ptr + batch)
    is_global = tl.load(route_ptr + row) != 0
    start = tl.where(is_global, first_key, tl.maximum(first_key, seq_kv - window))
    sink_end = tl.minimum(first_key + sink, start)  # sink keys the window misses: [first_key, sink_end)
    chunk_lo = chunk * CHUNK_SIZE
    chunk_hi = tl.minimum(chunk_lo + CHUNK_SIZE, seq_kv)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + dims).to(tl.float32) * scale_log2e
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    running_max = float("-inf")
    running_sum = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    # empty ranges (a chunk wholly outside the sink keys or the window) add nothing
    acc, running_max, running_sum = _attend_keys(
        q, k_base, v_base, stride_kn, stride_vn, tl.maximum(chunk_lo, first_key), tl.minimum(chunk_hi, sink_end),
        acc, running_max, running_sum, HEAD_DIM, BLOCK,
    )  # fmt: skip
    acc, running_max, running_sum = _attend_keys(
        q, k_base, v_base, stride_kn, stride_vn, tl.maximum(chunk_lo, start), chunk_hi,
        acc, running_max, running_sum, HEAD_DIM, BLOCK,
    )  # fmt: skip
    out_index = row * num_chunks + chunk
    tl.store(max_ptr + out_index, running_max)
    tl.store(sum_ptr + out_index, running_sum)
    tl.store(acc_ptr + out_index * HEAD_DIM + dims, acc)


@triton.jit
def _merge_chunks(acc_ptr, max_ptr, sum_ptr, out_ptr, num_chunks, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    dims = tl.arange(0, HEAD_DIM)
    running_max = float("-inf")
    running_sum = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for chunk0 in range(0, num_chunks, BLOCK):
        chunks = row * num_chunks + chunk0 + tl.arange(0, BLOCK)
        valid = chunk0 + tl.arange(0, BLOCK) < num_chunks
        chunk_max = tl.load(max_ptr + chunks, mask=valid, other=float("-inf"))
        new_max = tl.maximum(running_max, tl.max(chunk_max, axis=0))
        pivot = tl.where(new_max == float("-inf"), 0.0, new_max)  # all empty so far: weights 0, not NaN
        weight = tl.exp2(chunk_max - pivot)
        correction = tl.exp2(running_max - pivot)
        chunk_sum = tl.load(sum_ptr + chunks, mask=valid, other=0.0)
        chunk_acc = tl.load(acc_ptr + chunks[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0)
        running_sum = running_sum * correction + tl.sum(weight * chunk_sum, axis=0)
        acc = acc * correction + tl.sum(weight[:, None] * chunk_acc, axis=0)
        running_max = new_max
    tl.store(out_ptr + row * HEAD_DIM + dims, (acc / running_sum).to(out_ptr.dtype.element_ty))


@torch.library.custom_op("aha::triton_decode", mutates_args=())
def _decode_op(q: Tensor, k: Tensor, v: Tensor, route: Tensor, first_key: Tensor, window: int, sink: int, scale: float) -> Tensor:
    """Three launches (partials buffer, chunk kernel, merge kernel), so a step stays cheap on the host."""
    batch, q_heads, _, head_dim = q.shape
    seq_kv = k.shape[2]
    q, route = q.contiguous(), route.contiguous()
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    num_chunks = triton.cdiv(seq_kv, CHUNK)
    rows = batch * q_heads
    partials = torch.empty(rows * num_chunks * (head_dim + 2), dtype=torch.float32, device=q.device)
    acc, chunk_max, chunk_sum = partials.split([rows * num_chunks * head_dim, rows * num_chunks, rows * num_chunks])
    _decode_chunks[(rows, num_chunks)](
        q, k, v, route.view(torch.uint8), first_key, acc, chunk_max, chunk_sum,
        seq_kv, window, sink, scale * 1.4426950408889634, q_heads, q_heads // k.shape[1], num_chunks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        HEAD_DIM=head_dim, CHUNK_SIZE=CHUNK, BLOCK=BLOCK_N,
    )  # fmt: skip
    out = torch.empty_like(q)
    _merge_chunks[(rows,)](acc, chunk_max, chunk_sum, out, num_chunks, HEAD_DIM=head_dim, BLOCK=MERGE_BLOCK)
    return out


@_decode_op.register_fake
def _decode_fake(q, k, v, route, first_key, window, sink, scale):
    return torch.empty_like(q)


def triton_decode(
    q: Tensor, k: Tensor, v: Tensor, route: Tensor, window: int, scale: float, first_key: Tensor, sink: int = 0
) -> Tensor:
    """AHA decode step: q ``[B, Hq, 1, D]``, k/v ``[B, Hkv, Skv, D]``, route ``[B, Hq, 1]`` bool
    (True = global), ``first_key`` ``[B]`` int32 (first real key per row), ``sink`` keys local
    heads also see -> ``[B, Hq, 1, D]`` (``torch.ops.aha.triton_decode``)."""
    return _decode_op(q, k, v, route, first_key, window, sink, float(scale))
