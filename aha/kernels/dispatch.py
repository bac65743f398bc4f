"""The kernel registry: every implementation declares what it serves; ``auto`` walks one priority list.

The pattern of xformers' ``ops/fmha/dispatch.py``. Each :class:`Implementation` names the devices
and dtypes it runs, whether it has a backward there, and :meth:`~Implementation.not_supported_reasons`
for anything else about the inputs it cannot take (a key padding mask with holes, a head size, a
kernel that failed to build). ``impl="auto"`` takes the first implementation of the priority list
of the inputs' device and shape class (:data:`PRIORITY`; on CPU the measured crossover of
:mod:`aha.kernels.cpu_tuning` can move ``split`` ahead of ``cpp``) that has no reason against the
inputs; an explicit ``impl=`` that cannot serve them raises :class:`AhaInputError` with every reason.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor

from aha.kernels._checks import AhaInputError
from aha.kernels._cpp_build import cpp_kernel_error
from aha.kernels.cpp import KERNEL_DTYPES, cpp_attention, cpp_available
from aha.kernels.cpu_tuning import (
    MICROKERNELS,
    kernel_choice,
    microkernel_name,
    microkernel_problem,
    usable_microkernel,
)
from aha.kernels.decode import decode_attention
from aha.kernels.masks import KeyPadding
from aha.kernels.reference import reference_attention
from aha.kernels.split import split_attention


@dataclass(frozen=True, eq=False)
class Inputs:
    """One validated call of the operator (see :func:`aha.aha_attention` for the arguments).

    Attributes:
        q, k, v: ``[batch, heads, seq, head_dim]``.
        route: ``[batch, q_heads, seq_q]``, bool (True = global) or a float gate (1 = global).
        window, scale, sink: as in :func:`aha.aha_attention` (window and sink clamped to ``seq_kv``).
        padding: the key padding layout, or None.
        needs_grad: whether autograd will ask for gradients of this call.
        binary: whether the route's values are all 0 or 1 (always for bool routes); None where
            that is unknown (inside a compiled graph, where values cannot be read).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    route: Tensor
    window: int
    scale: float
    padding: KeyPadding | None
    sink: int
    needs_grad: bool
    binary: bool | None

    @property
    def device(self) -> str:
        return self.q.device.type

    @property
    def decode_step(self) -> bool:
        """One query per head with a hard route and no gradient: a generation step."""
        return self.q.shape[2] == 1 and not self.needs_grad and self.binary is True

    @property
    def hard_route(self) -> Tensor:
        """The route as bool (True = global): a float gate thresholded at 0.5 (its own values where it is binary)."""
        return self.route if self.route.dtype == torch.bool else self.route > 0.5

    def global_fraction(self) -> float:
        """Share of (token, head) pairs whose routed work is full attention (reads the route: a sync);
        soft gates and gates that need a gradient count as 1 (their dense full branch runs everywhere)."""
        if self.route.dtype != torch.bool and (self.route.requires_grad or not self.binary):
            return 1.0
        return float(self.hard_route.float().mean())


class Implementation:
    """One implementation of the operator.

    Attributes:
        name: the ``impl=`` name.
        devices: device types it runs on (None: any).
        dtypes: dtypes it runs (None: any floating dtype).
        grad_devices: device types where it has a backward (None: wherever it runs).
    """

    name: str = ""
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    grad_devices: tuple[str, ...] | None = None

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        """Why these inputs cannot run here (empty: they can)."""
        reasons = []
        if self.devices is not None and inputs.device not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)} tensors, not {inputs.device}")
        if self.dtypes is not None and inputs.q.dtype not in self.dtypes:
            names = ", ".join(str(dtype).removeprefix("torch.") for dtype in self.dtypes)
            reasons.append(f"runs {names}, not {str(inputs.q.dtype).removeprefix('torch.')}")
        if inputs.needs_grad and self.grad_devices is not None and inputs.device not in self.grad_devices:
            reasons.append(f"has no backward on {inputs.device}; run under torch.no_grad() or pick another impl")
        return reasons + self.input_reasons(inputs)

    def input_reasons(self, inputs: Inputs) -> list[str]:
        """Reasons beyond device, dtype and backward (overridden by implementations that have some)."""
        return []

    def __call__(self, inputs: Inputs) -> Tensor:
        """The output ``[batch, q_heads, seq_q, head_dim]`` (rows of padded queries are zeroed by the caller)."""
        raise NotImplementedError


class Reference(Implementation):
    """Dense masked attention, the ground truth (``O(seq_q * seq_kv)`` memory)."""

    name = "reference"

    def __call__(self, inputs: Inputs) -> Tensor:
        return reference_attention(*_arguments(inputs))


class Split(Implementation):
    """Pure PyTorch: SDPA for the majority branch, packed queries for the minority one; differentiable."""

    name = "split"

    def __call__(self, inputs: Inputs) -> Tensor:
        return split_attention(*_arguments(inputs), binary=inputs.binary)


class Cpp(Implementation):
    """The C++ CPU kernel (:mod:`aha.kernels.cpp`); ``microkernel`` forces one of its GEMM back ends."""

    devices = ("cpu",)
    dtypes = KERNEL_DTYPES

    def __init__(self, microkernel: str | None = None) -> None:
        self.microkernel = microkernel
        self.name = "cpp" if microkernel is None else f"cpp:{microkernel}"

    def input_reasons(self, inputs: Inputs) -> list[str]:
        if not cpp_available():
            return [f"the C++ kernel is unavailable: {cpp_kernel_error()}"]
        reasons = []
        if inputs.padding is not None and inputs.padding.start is None:
            reasons.append("takes left and/or right key padding only; this key_padding_mask has holes")
        dtype = inputs.q.dtype
        if self.microkernel is not None and microkernel_name(dtype, self.microkernel) is None:
            reasons.append(f"the {self.microkernel} microkernel cannot run {dtype} here: {microkernel_problem(dtype, self.microkernel)}")
        if self.microkernel is None and usable_microkernel(dtype, "vector") is None:
            reasons.append(f"none of its microkernels runs {dtype} here (the log says why)")
        return reasons

    def __call__(self, inputs: Inputs) -> Tensor:
        return cpp_attention(*_arguments(inputs), microkernel=self.microkernel, binary=inputs.binary)


class Decode(Implementation):
    """One query per head with SDPA: local heads read a slice of the window, global ones the cache."""

    name = "decode"
    grad_devices = ()

    def input_reasons(self, inputs: Inputs) -> list[str]:
        reasons = []
        if inputs.q.shape[2] != 1:
            reasons.append(f"takes one query per head (seq_q == 1), got {inputs.q.shape[2]}")
        if inputs.binary is not True:
            reasons.append("needs a hard route (bool, or a float gate of exact 0/1 values)")
        return reasons

    def __call__(self, inputs: Inputs) -> Tensor:
        q, k, v, _, *rest = _arguments(inputs)
        return decode_attention(q, k, v, inputs.hard_route, *rest)


class Flex(Implementation):
    """FlexAttention over queries sorted by route (:mod:`aha.kernels.flex`); CUDA, CPU forward only."""

    name = "flex"
    devices = ("cuda", "cpu")
    grad_devices = ("cuda",)

    def input_reasons(self, inputs: Inputs) -> list[str]:
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return [f"this torch ({torch.__version__}) has no FlexAttention"]
        return []

    def __call__(self, inputs: Inputs) -> Tensor:
        from aha.kernels.flex import flex_attention_aha

        return flex_attention_aha(*_arguments(inputs))


class Triton(Implementation):
    """The Triton kernels (:mod:`aha.kernels.triton`): prefill forward and backward, and decode steps."""

    name = "triton"

    def input_reasons(self, inputs: Inputs) -> list[str]:
        from aha.kernels.triton import triton_reasons

        return triton_reasons(inputs.q, inputs.padding)

    def __call__(self, inputs: Inputs) -> Tensor:
        from aha.kernels.triton import triton_attention

        q, k, v, route, *rest = _arguments(inputs)
        if inputs.decode_step:
            return triton_attention(q, k, v, inputs.hard_route, *rest, decode_step=True)
        return triton_attention(q, k, v, route, *rest)


def _arguments(inputs: Inputs) -> tuple:
    """The shared implementation signature: ``(q, k, v, route, window, scale, padding, sink)``."""
    return inputs.q, inputs.k, inputs.v, inputs.route, inputs.window, inputs.scale, inputs.padding, inputs.sink


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl for impl in (Reference(), Cpp(), Split(), Decode(), Flex(), Triton())
}
IMPLEMENTATIONS.update({f"cpp:{name}": Cpp(name) for name in MICROKERNELS if name != "default"})

#: ``auto``'s order of preference per (device type, shape class); other devices use ``"other"``.
#: ``triton`` prefill is opt-in until it has been timed on a GPU against ``flex``.
PRIORITY: dict[tuple[str, str], tuple[str, ...]] = {
    ("cpu", "prefill"): ("cpp", "split"),
    ("cpu", "decode"): ("cpp", "decode", "split"),
    ("cuda", "prefill"): ("flex", "split"),
    ("cuda", "decode"): ("triton", "decode", "split"),
    ("other", "prefill"): ("split",),
    ("other", "decode"): ("decode", "split"),
}


def priority(inputs: Inputs) -> tuple[str, ...]:
    """The implementations ``auto`` tries for these inputs, best first.

    On CPU the measured cost model moves ``split`` (whose dense branch is SDPA's kernel) ahead of
    ``cpp`` above the crossover global fraction where it was faster on this machine; on the CPUs
    measured so far (AMD Zen 4, Intel Xeon with AMX) the C++ kernel won even at fraction 1.
    Inside a compiled graph the route cannot be read, so the list is used as it is.
    """
    device = inputs.device if (inputs.device, "prefill") in PRIORITY else "other"
    order = PRIORITY[device, "decode" if inputs.decode_step else "prefill"]
    if device == "cpu" and not inputs.decode_step and not torch.compiler.is_compiling() and inputs.q.dtype in KERNEL_DTYPES:
        crossover = kernel_choice(inputs.q.dtype).crossover(inputs.k.shape[2], training=inputs.needs_grad)
        if crossover < 1.0 and inputs.global_fraction() > crossover:
            order = ("split", *(name for name in order if name != "split"))
    return order


def implementation(name: str) -> Implementation:
    """The implementation registered as ``name``.

    Raises:
        AhaInputError: no implementation has that name.
    """
    if name not in IMPLEMENTATIONS:
        raise AhaInputError(f"unknown impl {name!r}; choose 'auto' or one of {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[name]


def select(inputs: Inputs, impl: str = "auto") -> Implementation:
    """The implementation that runs these inputs: ``impl`` itself, or for ``"auto"`` the first of
    :func:`priority` that supports them.

    Raises:
        AhaInputError: ``impl`` is unknown or cannot serve the inputs (every reason listed), or no
            implementation can (``auto``).
    """
    memo_key = _decode_step_key(inputs, impl)
    if memo_key is not None and memo_key in _decode_step_choices:
        return _decode_step_choices[memo_key]
    chosen = _select(inputs, impl)
    if memo_key is not None:
        _decode_step_choices[memo_key] = chosen
    return chosen


#: :func:`select`'s answers for decode steps, by :func:`_decode_step_key` (every layer of every
#: generated token asks the same question).
_decode_step_choices: dict[tuple, Implementation] = {}


def _decode_step_key(inputs: Inputs, impl: str) -> tuple | None:
    """What the choice for a decode step depends on (device, dtype, head size, padding layout), or
    None where it may depend on more (prefill, where the CPU crossover reads the route) or cannot
    be memoized (inside a compiled graph)."""
    if not inputs.decode_step or torch.compiler.is_compiling():
        return None
    padding = "none" if inputs.padding is None else "holes" if inputs.padding.start is None else "runs"
    return impl, inputs.q.device.type, inputs.q.dtype, inputs.q.shape[-1], padding


def _select(inputs: Inputs, impl: str) -> Implementation:
    """:func:`select` without the memo."""
    if impl != "auto":
        chosen = implementation(impl)
        reasons = chosen.not_supported_reasons(inputs)
        if reasons:
            raise AhaInputError(f"impl={impl!r} cannot run these inputs: " + "; ".join(reasons) + ". Use impl='auto'")
        return chosen
    refused = {}
    for name in priority(inputs):
        reasons = IMPLEMENTATIONS[name].not_supported_reasons(inputs)
        if not reasons:
            return IMPLEMENTATIONS[name]
        refused[name] = reasons
    raise AhaInputError(
        "no implementation runs these inputs: " + "; ".join(f"{name}: {', '.join(why)}" for name, why in refused.items())
    )

