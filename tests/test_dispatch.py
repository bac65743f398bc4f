"""The kernel registry: what each implementation declares, what ``auto`` picks, and the errors of an
explicit ``impl`` that cannot serve its inputs."""

import pytest
import torch

from aha import AhaInputError, aha_attention, choose_impl
from aha.kernels import cpp
from aha.kernels.dispatch import IMPLEMENTATIONS, PRIORITY, Implementation

needs_kernel = pytest.mark.skipif(not cpp.cpp_available(), reason="C++ kernel unavailable")


def test_every_priority_list_names_registered_implementations():
    for names in PRIORITY.values():
        assert names and set(names) <= set(IMPLEMENTATIONS)
    assert all(isinstance(impl, Implementation) and impl.name == name for name, impl in IMPLEMENTATIONS.items())


def test_an_explicit_impl_that_cannot_serve_the_inputs_lists_every_reason():
    q = torch.randn(1, 2, 3, 16, dtype=torch.float64, requires_grad=True)
    k = v = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    with pytest.raises(AhaInputError) as error:
        aha_attention(q, k, v, torch.ones(1, 2, 3, dtype=torch.bool), 4, impl="decode")
    message = str(error.value)
    assert "no backward on cpu" in message and "one query per head" in message and "impl='auto'" in message


def test_an_unknown_impl_names_the_registered_ones():
    q = k = v = torch.randn(1, 1, 4, 16)
    with pytest.raises(AhaInputError, match="unknown impl 'fast'.*'cpp'.*'split'"):
        aha_attention(q, k, v, torch.ones(1, 1, 4, dtype=torch.bool), 2, impl="fast")


@needs_kernel
def test_auto_takes_the_first_implementation_of_the_device_list_that_serves_the_inputs():
    q, k = torch.randn(2, 1, 2, 40, 16)
    route = torch.rand(1, 2, 40) < 0.2
    assert choose_impl(q, k, route, 8) == "cpp"
    assert choose_impl(q[:, :, -1:], k, route[:, :, -1:], 8) == "cpp"  # decode steps too
    assert choose_impl(q.double(), k.double(), route, 8) == "split"  # the kernel refuses float64
    assert choose_impl(q.double()[:, :, -1:], k.double(), route[:, :, -1:], 8) == "decode"
    holes = torch.ones(1, 40, dtype=torch.bool)
    holes[0, 5] = False
    assert choose_impl(q, k, route, 8, holes) == "split"  # the kernel refuses padding with holes
    # decode steps remember their choice per device, dtype, head size and padding layout
    assert choose_impl(q[:, :, -1:], k, route[:, :, -1:], 8, holes) == "decode"
    assert choose_impl(q[:, :, -1:], k, route[:, :, -1:], 8) == "cpp"


def test_a_soft_gate_is_not_a_decode_step():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 30, 16)
    assert choose_impl(q, k, torch.full((1, 2, 1), 0.3), 8) != "decode"
    with pytest.raises(AhaInputError, match="hard route"):
        aha_attention(q, k, k, torch.full((1, 2, 1), 0.3), 8, impl="decode")


@needs_kernel
def test_a_first_call_in_inference_mode_leaves_nothing_that_breaks_training_later():
    """Per-shape buffers the fast path keeps (the kernel's key starts) are made outside inference mode."""
    q, k = torch.randn(2, 7, 2, 12, 16)  # a batch size no other test uses: the first call makes its buffers
    route = torch.rand(7, 2, 12) < 0.5
    with torch.inference_mode():
        aha_attention(q, k, k, route, 4, impl="cpp")
    q.requires_grad_()
    aha_attention(q, k, k, route, 4, impl="cpp").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
