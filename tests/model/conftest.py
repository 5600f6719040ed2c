"""Model tests: tiny random-weight Qwen2-VL backbones (never downloaded), one CPU thread (the test
machine is shared; tiny matmuls only lose to thread start-up)."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def tiny():
    import model_helpers

    return model_helpers
