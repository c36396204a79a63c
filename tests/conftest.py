"""Test setup: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any kernel module is imported, which is why
it is set here rather than in the tests.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is as fast, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def packed_calls(monkeypatch) -> list:
    """Counts the drop-in's calls that ran bertfast's encoder (not a fallback to transformers' forward)."""
    from bertfast import dropin

    calls: list = []
    packed = dropin._packed_forward
    monkeypatch.setattr(dropin, "_packed_forward", lambda *a: calls.append(1) or packed(*a))
    return calls
