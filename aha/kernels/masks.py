"""Which keys a query reads: positions, key padding and sink keys, shared by every implementation.

A query at absolute position ``p`` reads keys ``0..p`` when routed global and
``max(0, p - window + 1)..p`` when local, plus, when local, the ``sink`` keys ``s..s + sink - 1``
that are ``<= p`` (``s`` = the first real key, 0 without padding). Padded keys are never read.

:class:`KeyPadding` holds a key padding mask together with its layout (first real key per row,
whether each row's real keys are one contiguous run), computed once: a model builds one per
forward pass and every layer reuses it, as FlexAttention shares one block mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class KeyPadding:
    """A key padding mask and its layout.

    Attributes:
        mask: ``[batch, seq_kv]`` bool, True = a real (attendable) key.
        first_key: ``[batch]`` int64, the first real key of each row (where the sink keys start;
            0 for a row without real keys).
        start: ``[batch]`` int32 first real key when every row's real keys are one contiguous run
            (``False* True* False*``: left and/or right padding, what the fused kernels take), else None.
    """

    mask: Tensor
    first_key: Tensor
    start: Tensor | None

    @classmethod
    def of(cls, mask: Tensor | KeyPadding | None) -> KeyPadding | None:
        """The layout of ``mask`` (``[batch, seq_kv]`` bool); a :class:`KeyPadding` is returned as it is.

        Reads the mask's values once (one host sync on an accelerator)."""
        if mask is None or isinstance(mask, KeyPadding):
            return mask
        first = first_real_key(mask)
        positions = torch.arange(mask.shape[1], device=mask.device)
        run = (positions >= first[:, None]) & (positions < (first + mask.sum(1))[:, None])
        return cls(mask, first, first.to(torch.int32) if torch.equal(run, mask) else None)

    def prefix(self, keys: int) -> KeyPadding:
        """The layout of the first ``keys`` keys (a prefix of a contiguous run is one too)."""
        return KeyPadding(self.mask[:, :keys], self.first_key, self.start)


def first_real_key(mask: Tensor) -> Tensor:
    """``[batch]`` int64 index of the first True of each row of a ``[batch, seq_kv]`` bool mask (0 if none)."""
    return mask.to(torch.uint8).argmax(1)


def padding_mask(padding: Tensor | KeyPadding | None) -> Tensor | None:
    """The ``[batch, seq_kv]`` bool mask of ``padding`` (a mask, its layout, or None)."""
    return padding.mask if isinstance(padding, KeyPadding) else padding


def key_positions(seq_q: int, seq_kv: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Absolute positions of the queries ``[seq_q]`` (the last ``seq_q`` keys) and keys ``[seq_kv]``."""
    kpos = torch.arange(seq_kv, device=device)
    return kpos[seq_kv - seq_q :], kpos


def first_key(padding: KeyPadding | None, batch: int, device: torch.device) -> Tensor:
    """First real key per batch row ``[batch]`` (int64; 0 without padding): where the sink keys start."""
    if padding is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return padding.first_key


def key_start(padding: KeyPadding | None, batch: int, device: torch.device) -> Tensor | None:
    """First real key per row ``[batch]`` int32 for the fused kernels, or None when a row's real
    keys are not one contiguous run."""
    if padding is None:
        if torch.compiler.is_compiling():
            return torch.zeros(batch, dtype=torch.int32, device=device)
        return _zero_starts(batch, device)
    return padding.start


@functools.lru_cache(maxsize=32)
def _zero_starts(batch: int, device: torch.device) -> Tensor:
    """``[batch]`` int32 zeros, made once per (batch, device): a decode step of every layer asks for them
    (the kernels only read them). Made outside inference mode, so that a training step may save them."""
    with torch.inference_mode(False):
        return torch.zeros(batch, dtype=torch.int32, device=device)


def sink_key_mask(seq_kv: int, sink: int, padding: KeyPadding | None, batch: int, device: torch.device) -> Tensor:
    """``[batch, seq_kv]`` bool, True at the sink keys: the ``sink`` positions from the first real key on
    (padding among them stays unattended through the padding mask)."""
    offset = torch.arange(seq_kv, device=device)[None, :] - first_key(padding, batch, device)[:, None]
    return (offset >= 0) & (offset < sink)


def sink_keys(k: Tensor, v: Tensor, sink: int, padding: KeyPadding | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sink keys of each batch row: ``k``, ``v`` at ``[B, Hkv, sink, D]``, their positions
    ``[B, sink]`` and whether each is a real key ``[B, sink]`` (False past the end or on padding)."""
    batch, kv_heads, seq_kv, dim = k.shape
    positions = first_key(padding, batch, k.device)[:, None] + torch.arange(sink, device=k.device)
    inside = positions.clamp(max=seq_kv - 1)
    real = positions < seq_kv
    if padding is not None:
        real = real & padding.mask.gather(1, inside)
    index = inside[:, None, :, None].expand(batch, kv_heads, sink, dim)
    return k.gather(2, index), v.gather(2, index), positions, real
