"""The training objective's terms against their textbook definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from aha.data import IGNORE_INDEX
from aha.train.objective import DISTILLATION_ROW_BLOCK, distillation_sum


def textbook_distillation(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` summed over positions with a next-token target."""
    keep = labels[:, 1:].reshape(-1) != IGNORE_INDEX
    vocab = student.shape[-1]
    s = student[:, :-1].reshape(-1, vocab)[keep].double() / temperature
    t = teacher[:, :-1].reshape(-1, vocab)[keep].double() / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") * temperature**2


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    seq=st.integers(2, 3 * DISTILLATION_ROW_BLOCK + 5),
    vocab=st.integers(2, 40),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    ignored_share=st.sampled_from([0.0, 0.3, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_distillation_equals_the_textbook_kl_and_its_gradient(batch, seq, vocab, temperature, ignored_share, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(batch, seq, vocab, generator=generator)).to(dtype).requires_grad_(True)
    teacher = (3 * torch.randn(batch, seq, vocab, generator=generator)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < ignored_share] = IGNORE_INDEX
    labels[:, 1 : 1 + DISTILLATION_ROW_BLOCK] = IGNORE_INDEX  # a whole block without targets is skipped
    got = distillation_sum(student, teacher, labels, temperature)
    (grad,) = torch.autograd.grad(got, student)
    expected_student = student.detach().double().requires_grad_(True)
    expected = textbook_distillation(expected_student, teacher, labels, temperature)
    (expected_grad,) = torch.autograd.grad(expected, expected_student)
    assert got.dtype == torch.float32 and grad.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad.double(), expected_grad.to(dtype).double(), rtol=tolerance, atol=tolerance)


def test_distillation_gradient_scales_with_the_outer_gradient_and_refuses_a_bad_temperature():
    student = torch.randn(1, 9, 7, requires_grad=True)
    teacher, labels = torch.randn(1, 9, 7), torch.zeros(1, 9, dtype=torch.long)
    (once,) = torch.autograd.grad(distillation_sum(student, teacher, labels), student)
    (thrice,) = torch.autograd.grad(3 * distillation_sum(student, teacher, labels), student)
    torch.testing.assert_close(thrice, 3 * once)
    assert float(distillation_sum(teacher.clone(), teacher, labels)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_sum(student, teacher, labels, 0.0)
