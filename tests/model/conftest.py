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


@pytest.fixture(scope="session")
def toy_qwen2vl_folder(tmp_path_factory):
    """A Qwen2-VL folder as a user has one: ``save_pretrained`` weights (random, tiny) and a byte-level
    BPE tokenizer with Qwen's special tokens, no BOS and a chat template (``toy_backbone``)."""
    import toy_backbone

    return toy_backbone.write_toy_qwen2vl(tmp_path_factory.mktemp("toy_qwen2vl"))


@pytest.fixture(scope="session")
def toy_prepared(tmp_path_factory):
    """``(prepare folder, DC-AE folder)``: a toy DC-AE (``save_pretrained``) and latents of 3 classes in two
    shards with their manifest, written with ``latteflow.data.shards`` (``toy_backbone``)."""
    import toy_backbone

    vae = toy_backbone.write_toy_dcae(tmp_path_factory.mktemp("toy_dcae"))
    return toy_backbone.write_toy_prepared(tmp_path_factory.mktemp("toy_prepared"), vae), vae
