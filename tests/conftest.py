"""Test setup: seeding and the ``gpu`` marker. Helpers tests import live in ``helpers.py``."""
import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped cleanly without one")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield




@pytest.fixture
def poison():
    """``poison(t)`` fills an output buffer with NaN (or an integer sentinel) before a kernel writes it."""
    from helpers import poison_

    return poison_
