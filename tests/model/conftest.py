"""Model tests: tiny random-weight Qwen2-VL backbones (never downloaded), one CPU thread (the test
machine is shared; tiny matmuls only lose to thread start-up)."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def toy_dcae_folder(tmp_path):
    """A DC-AE folder as a user brings it (``AutoencoderDC.save_pretrained``, 4x downsampling, random weights)."""
    pytest.importorskip("diffusers")
    import toy_data

    return toy_data.write_toy_dcae(tmp_path / "dcae")


@pytest.fixture
def toy_image_folder(tmp_path):
    """An ImageNet-layout folder: 3 classes of RGB/L/LA/RGBA/P images of varied sizes, one unreadable file."""
    import toy_data

    return toy_data.write_toy_images(tmp_path / "images")


@pytest.fixture
def tiny():
    import model_helpers

    return model_helpers
