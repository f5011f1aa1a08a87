"""Shared test setup: CPU by default, GPU tests behind the `requires_cuda` marker."""
import os

# The Triton kernels must be imported before anything imports Triton (see
# kernels/__init__.py): do it first, so a test that builds an optimiser or
# imports open_clip at collection time cannot switch the interpreter off.
import kernels  # noqa: F401

import pytest

# Keep the 2-core machine responsive and the numbers reproducible across runs.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_generate_tests(metafunc):
    # The grader proofs (tests/grader_proofs.py): one test per bug planted in that file.
    if "planted_name" in metafunc.fixturenames:
        metafunc.parametrize("planted_name", sorted(metafunc.module.PLANTED))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="requires_cuda: no CUDA GPU on this machine")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A NumPy Generator seeded from the test's name: fresh per test, repeatable per run."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, restored after: the book's tiny models only wait on a
    second thread, and a module-level set_num_threads would leak into every later test file."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
