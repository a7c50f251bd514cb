"""Shared test setup."""

import sys
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # test modules import shared helpers as tests.<name> (spawned ranks import them so too)
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tests use tiny tensors: one thread (torch, BLAS, OpenMP) avoids waking a thread team per op, which on a
    busy 2-core machine costs more than the op, and keeps results independent of the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_encoder():
    """A tiny timm ResNet (random init, no download) that runs on 8x8..32x32 input in milliseconds."""
    from reprlab.models.encoders import create_encoder

    torch.manual_seed(0)
    return create_encoder("timm:test_resnet")
