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


@pytest.fixture
def one_thread():
    """Tiny models on one OpenMP thread: on the shared 2-core box the spin-waits of 2 threads cost
    far more than they gain (one trainer test: 37 s vs 0.6 s under load; the suite 2 min vs 15 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
