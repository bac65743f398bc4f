"""Gate-gradient estimators: the straight-through gate's ``d out / d g`` without dense attention everywhere.

With the STE gate ``g`` (exactly 0 or 1 in the forward pass) the operator's output is
``routed(hard) + (g - g.detach()) * gap`` with ``gap = full - local`` per (token, head): the forward
value and the q/k/v gradients are the routed pass's, and ``gap`` is the gate's whole gradient.
Computing it exactly needs full attention for every query (:func:`aha.kernels.gating.apply_route`).
An estimator decides how ``gap`` is computed; nothing else changes:

* ``"ste"`` (default): exact, a full and a local pass over every query without gradients.
* ``"sampled"``: unbiased. Exact at global pairs (their other branch is a window pass) and at a
  Bernoulli(``sample_fraction``) sample of the local pairs, rescaled there by
  ``1 / sample_fraction``; 0 at the other local pairs. One extra routed pass of the implementation,
  on the route flipped at the pairs that need it: global fraction about ``f + p (1 - f)`` instead of
  a full pass plus a local pass. ``sample_fraction=1`` is the exact gap at that cost.
* ``"compressed"``: approximate, deterministic. The keys a local query does not read (before its
  window and sink keys) are split at block boundaries of ``block`` keys: the complete blocks are
  replaced by their mean key and mean value (NSA's compression branch, without learned weights;
  each block's log-mass is ``log(keys) + q . mean key``), the partial block next to the window is
  read exactly. Then ``full - local = sum_x exp(lse_x - lse_all) * (out_x - local)`` over the near
  keys and the blocks, with ``lse_all`` the log-mass of local, near and blocks together. One
  PyTorch pass in chunks of 256 queries: each query scores about ``256 + window + block`` keys
  and ``seq / block`` block means, instead of a full pass plus a local pass.
  Exact when every block is one key or its keys (and values) are equal. In general, per element of
  ``full - local``: ``|error| <= (exp(2 eta) - 1) * dv + (exp(eta) - 1 - eta) * max|v|``, where
  ``eta = scale * max|q| * max|k - block mean|`` and ``dv = max|v - block mean|`` over the blocks (a
  block's mass is underestimated by a factor in ``[1, exp(eta) - eta]``, Jensen's gap; its value is
  off by at most ``(exp(2 eta) - 1) * dv``): second order in how far keys stray from their block's
  mean. Tested in ``tests/test_gate_estimators.py``. A pretrained LM's keys are far from that
  regime (RoPE turns them within a block; far attention peaks on single keys a block mean dilutes),
  so there the estimate is biased: measure it against ``"ste"`` before relying on it.
* ``"none"``: no gradient reaches the gate (routes frozen: the routed pass alone, as for bool routes).

Models and training select an estimator with the :func:`gate_gradient` context (``aha train
--gate-gradient``); the dispatcher (:func:`aha.aha_attention`) reads it for every float gate that
needs a gradient. It is read at trace time under ``torch.compile`` (like window and sink), and a
``generator`` cannot be traced there: compiled training samples from torch's global generator
(``generator=None``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

from aha.kernels._checks import AhaInputError
from aha.kernels.gating import with_gate_gradient
from aha.kernels.masks import KeyPadding, sink_key_mask, sink_keys

if TYPE_CHECKING:
    from aha.kernels.dispatch import Inputs

GateGradientName = Literal["ste", "sampled", "compressed", "none"]
GATE_GRADIENTS: tuple[str, ...] = get_args(GateGradientName)

#: Queries per chunk of the compressed estimator's PyTorch pass (bounds its memory: ``chunk x keys`` scores per head).
COMPRESSED_QUERY_CHUNK = 256


@dataclass(frozen=True, eq=False)
class GateGradient:
    """How the gate's gradient is computed (see the module docstring).

    Attributes:
        name: ``"ste"``, ``"sampled"``, ``"compressed"`` or ``"none"``.
        sample_fraction: ``"sampled"``: share of local (token, head) pairs whose ``full - local`` is
            computed, in (0, 1].
        block: ``"compressed"``: keys per compressed block, >= 1 (1 is exact).
        generator: ``"sampled"``: the source of the sample (None: torch's global generator). A
            trainer seeds one per step, so a resumed run draws the same samples.
    """

    name: GateGradientName = "ste"
    sample_fraction: float = 0.1
    block: int = 32
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.name not in GATE_GRADIENTS:
            raise AhaInputError(f"unknown gate gradient {self.name!r}; choose one of {', '.join(GATE_GRADIENTS)}")
        if not 0 < self.sample_fraction <= 1:
            raise AhaInputError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise AhaInputError(f"block must be an integer >= 1, got {self.block!r}")


_current = GateGradient()


def current_gate_gradient() -> GateGradient:
    """The estimator in effect (the innermost :func:`gate_gradient` context; ``"ste"`` outside any)."""
    return _current


@contextlib.contextmanager
def gate_gradient(estimator: GateGradient | GateGradientName) -> Iterator[GateGradient]:
    """Compute gate gradients with ``estimator`` (a :class:`GateGradient` or a name with its defaults) inside the block.

    Only the gate's gradient changes: outputs and q/k/v gradients are the same under every estimator.
    Calls that are not in training (bool routes, no gradient) are unaffected.
    """
    global _current
    chosen = estimator if isinstance(estimator, GateGradient) else GateGradient(estimator)
    previous, _current = _current, chosen
    try:
        yield chosen
    finally:
        _current = previous


def estimate(inputs: Inputs, run: Callable[[Inputs], Tensor]) -> Tensor | None:
    """The operator's output for ``inputs`` with the current estimator's gate gradient, its passes
    computed by ``run`` (the operator on inputs with a bool route); None where the implementation's
    own gate handling applies (the ``"ste"`` estimator, bool routes, soft gates, calls without a gate
    gradient, windows that cover every key).

    Output ``[B, Hq, Sq, D]``: ``run`` on the hard route (identical values and q/k/v gradients to
    the STE's routed pass), whose gate gets the estimated ``full - local`` as its gradient.
    """
    estimator = _current
    route = inputs.route
    if (
        estimator.name == "ste"
        or route.dtype == torch.bool
        or not (route.requires_grad and torch.is_grad_enabled())
        or inputs.binary is not True
        or inputs.window >= inputs.k.shape[2]
    ):
        return None
    hard = route.detach() > 0.5
    out = run(dataclasses.replace(inputs, route=hard))
    if estimator.name == "none":
        return out
    with torch.no_grad():
        if estimator.name == "sampled":
            difference, weight = _sampled_gap(inputs, run, hard, out, estimator)
        else:
            difference, weight = _compressed_gap(inputs, hard, out, estimator.block), None
    return with_gate_gradient(out, route, difference, weight)


def _sampled_gap(
    inputs: Inputs, run: Callable[[Inputs], Tensor], hard: Tensor, out: Tensor, estimator: GateGradient
) -> tuple[Tensor, Tensor]:
    """``full - local`` at global pairs and sampled local pairs (rescaled), 0 elsewhere, as a
    difference ``[B, Hq, Sq, D]`` (the other branch minus the routed output) and its per-pair weight
    ``[B, Hq, Sq]``: -1 at global pairs, ``1 / sample_fraction`` at sampled local pairs, 0 elsewhere."""
    fraction = estimator.sample_fraction
    if estimator.generator is not None and torch.compiler.is_compiling():
        raise AhaInputError(
            "gate gradient 'sampled' with a torch.Generator cannot be traced by torch.compile: pass generator=None "
            "(torch's global generator) or train eagerly"
        )
    if fraction == 1:
        sampled = ~hard
    else:
        draw = torch.rand(hard.shape, generator=estimator.generator, device=hard.device)
        sampled = (draw < fraction) & ~hard
    # the other branch where it is needed: local at global pairs (a window pass), global at sampled local pairs
    other = run(dataclasses.replace(inputs, route=sampled, needs_grad=False))
    weight = torch.where(hard, -1.0, sampled.to(torch.float32) / fraction)
    return other - out, weight


def _compressed_gap(inputs: Inputs, hard: Tensor, out: Tensor, block: int) -> Tensor:
    """``full - local`` with the complete key blocks before each local query's window compressed to
    their means (see the module docstring); exact local branch at global pairs. ``[B, Hq, Sq, D]``."""
    q, k, v = inputs.q, inputs.k, inputs.v
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_kv = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    window, sink, scale, padding = inputs.window, inputs.sink, inputs.scale, inputs.padding
    device = q.device
    qf = q.float().reshape(batch, kv_heads, group, seq_q, dim)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]  # [B, Hkv, 1, Skv, D]
    real = padding.mask if padding is not None else torch.ones(batch, seq_kv, dtype=torch.bool, device=device)
    is_sink = sink_key_mask(seq_kv, sink, padding, batch, device) if sink else torch.zeros_like(real)
    blocks = _key_blocks(kf, vf, real & ~is_sink, block)
    sink_parts = _sink_parts(k, v, sink, padding) if sink else None

    routed_global = hard.reshape(batch, kv_heads, group, seq_q, 1)
    routed_out = out.float().reshape(batch, kv_heads, group, seq_q, dim)
    gaps = []
    for start in range(0, seq_q, COMPRESSED_QUERY_CHUNK):
        stop = min(seq_q, start + COMPRESSED_QUERY_CHUNK)
        local, approx_full = _chunk_branches(
            qf[:, :, :, start:stop], kf, vf, seq_kv - seq_q + start, real, is_sink, blocks, sink_parts, window, block, scale
        )
        at_global = routed_global[:, :, :, start:stop]
        gaps.append(torch.where(at_global, routed_out[:, :, :, start:stop] - local, approx_full - local))
    return torch.cat(gaps, dim=3).reshape(batch, q_heads, seq_q, dim).to(out.dtype)


def _key_blocks(kf: Tensor, vf: Tensor, counted: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean key and value of each complete block of ``block`` keys over its ``counted`` keys (real, not
    sink), and ``log(count)`` (-inf for a block without such keys): ``[B, Hkv, 1, nb, D]`` twice and
    ``[B, 1, 1, 1, nb]``."""
    batch, kv_heads, _, seq_kv, dim = kf.shape
    nb = seq_kv // block
    weight = counted[:, : nb * block].float().reshape(batch, 1, 1, nb, block, 1)
    count = weight.sum(-2)  # [B, 1, 1, nb, 1]

    def mean(t: Tensor) -> Tensor:
        summed = (t[:, :, :, : nb * block].reshape(batch, kv_heads, 1, nb, block, dim) * weight).sum(-2)
        return summed / count.clamp(min=1)

    return mean(kf), mean(vf), count.log().transpose(-1, -2)


def _sink_parts(k: Tensor, v: Tensor, sink: int, padding: KeyPadding | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sink keys and values ``[B, Hkv, 1, sink, D]`` (fp32), their positions and realness ``[B, sink]``."""
    ks, vs, positions, real = sink_keys(k, v, sink, padding)
    return ks.float()[:, :, None], vs.float()[:, :, None], positions, real


def _softmax_part(scores: Tensor, mask: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the keys ``mask`` selects: output ``[..., D]`` (0 without keys) and log-mass ``[...]`` (-inf without keys)."""
    masked = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros((), device=lse.device))
    return torch.exp(masked - finite[..., None]) @ values, lse


def _chunk_branches(
    qc: Tensor,
    kf: Tensor,
    vf: Tensor,
    first: int,
    real: Tensor,
    is_sink: Tensor,
    blocks: tuple[Tensor, Tensor, Tensor],
    sink_parts: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    window: int,
    block: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Exact local output and the compressed full output of queries ``qc [B, Hkv, G, C, D]`` at positions ``first, first + 1, ...``."""
    positions = torch.arange(first, first + qc.shape[3], device=qc.device)
    window_start = positions - window + 1  # first key of each query's window
    near_start = (window_start // block).clamp(min=0) * block  # keys [near_start, window_start) are read exactly
    lo, hi = max(0, first - window + 1) // block * block, first + len(positions)  # the keys the chunk reads exactly
    keys = torch.arange(lo, hi, device=positions.device)
    p, j = positions[:, None], keys[None, :]
    real_j, sink_j = real[:, None, None, None, lo:hi], is_sink[:, None, None, None, lo:hi]  # [B, 1, 1, 1, L]
    own = j == p  # a padded query still reads its own key, so its softmax stays finite (its row is zeroed later)
    local_mask = ((j <= p) & (j >= window_start[:, None]) & real_j) | own
    near_mask = (j >= near_start[:, None]) & (j < window_start[:, None]) & real_j & ~sink_j
    scores = qc @ kf[:, :, :, lo:hi].transpose(-1, -2) * scale  # [B, Hkv, G, C, L]
    values = vf[:, :, :, lo:hi]
    if sink_parts is not None:  # sink keys before the window are local; inside it they are window keys already
        ks, vs, sink_positions, sink_real = sink_parts
        before = sink_real[:, None, None, None, :] & (sink_positions[:, None, None, None, :] < window_start[:, None])
        scores = torch.cat([scores, qc @ ks.transpose(-1, -2) * scale], dim=-1)
        values = torch.cat([values, vs], dim=-2)
        local_mask = torch.cat([local_mask, before], dim=-1)
        near_mask = torch.cat([near_mask, torch.zeros_like(before)], dim=-1)
    local, lse_local = _softmax_part(scores, local_mask, values)
    near, lse_near = _softmax_part(scores, near_mask, values)
    mean_k, mean_v, log_count = blocks
    block_end = (torch.arange(mean_k.shape[3], device=positions.device) + 1) * block
    far_mask = (block_end[None, :] <= near_start[:, None]) & torch.isfinite(log_count)
    far, lse_far = _softmax_part(qc @ mean_k.transpose(-1, -2) * scale + log_count, far_mask, mean_v)
    lse = torch.stack([lse_local, lse_near, lse_far])
    weights = torch.softmax(lse, dim=0)[..., None]  # shares of local, near and far in full attention (local's is > 0)
    return local, weights[0] * local + weights[1] * near + weights[2] * far


__all__ = ["GATE_GRADIENTS", "GateGradient", "GateGradientName", "current_gate_gradient", "estimate", "gate_gradient"]
