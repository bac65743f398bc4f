import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# No timing inside tests: the C++ kernel runs its built-in microkernel rule at every global fraction
# (tests/test_cpu_tuning.py checks the measured choice with fake timings; kernel tests run every
# microkernel explicitly through tests/kernel_support.py).
os.environ.setdefault("AHA_CPU_TUNING", "off")
if not torch.cuda.is_available():
    # Triton's interpreter runs the Triton kernels on CPU tensors (tests/test_triton.py). It is
    # chosen when a kernel is decorated, so it must be set before aha is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def copy_data():
    """The toy copy task of the training tests (tests/train_support.py): 400 documents of 25 tokens."""
    from train_support import copy_task

    return copy_task(400, block=12)
