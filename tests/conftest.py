"""Test setup shared by every test file.

Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. ``TRITON_INTERPRET`` is read when a
``@triton.jit`` function is defined, so it is set here, before anything imports ``fused_optim.kernels``. With a
GPU, the same tests run on CUDA tensors with compiled kernels (benchmarks/gpu_verify.sh).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine by benchmarks/gpu_verify.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
