"""Shared test setup.

Triton kernels run under the interpreter on this CPU-only machine: the variable must be
set before triton is imported anywhere, hence here. Threads are capped at the 2 cores
CI has so timings and memory are like CI's.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
