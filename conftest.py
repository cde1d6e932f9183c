"""Test setup for tests/ and benchmarks/: Triton kernels run in the interpreter on CPU tensors without a GPU."""
import os

import pytest
import torch

# Must be set before triton is first imported (the jit decorator reads it at decoration time).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="long sweep: set TD_SLOW_TESTS=1")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and os.environ.get("TD_SLOW_TESTS") != "1":
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
