"""Autoencoders: the pixel identity (with patchify) and the DC-AE wrapper on a tiny random config."""
import pytest
import torch

from latteflow.data.vae import DC_AE_F32C32_SCALE, DCAutoencoder, PixelAutoencoder


def test_pixel_autoencoder_round_trip_and_patchify():
    x = torch.rand(2, 3, 8, 6)
    ae = PixelAutoencoder(in_channels=3, patch_size=2, scaling_factor=0.5, shift_factor=0.25)
    z = ae.encode(x)
    assert z.shape == (2, 12, 4, 3) and ae.latent_channels == 12 and ae.downsample == 2
    torch.testing.assert_close(z[:, :, 0, 0].reshape(2, 3, 2, 2), (x[:, :, :2, :2] - 0.25) * 0.5)
    torch.testing.assert_close(ae.decode(z), x)
    plain = PixelAutoencoder(in_channels=1)
    img = torch.rand(4, 1, 8, 8)
    assert torch.equal(plain.encode(img), img)
    with pytest.raises(ValueError, match="images"):
        ae.encode(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="patch_size"):
        ae.encode(torch.rand(2, 3, 7, 8))
    with pytest.raises(ValueError, match="patch_size"):
        PixelAutoencoder(patch_size=0)


TINY_DC = dict(in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=("ResBlock", "ResBlock"),
               decoder_block_types=("ResBlock", "ResBlock"), encoder_block_out_channels=(8, 16),
               decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
               encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()))


def test_dc_autoencoder_scales_latents_and_loads_from_a_local_path(tmp_path):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ae = DCAutoencoder.from_config(TINY_DC)
    assert ae.scaling_factor == DC_AE_F32C32_SCALE == 0.3189
    assert ae.latent_channels == 4 and ae.downsample == 2
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (2, 4, 4, 4)
        torch.testing.assert_close(z, ae.vae.encode(x).latent * 0.3189)
        y = ae.decode(z)
        assert y.shape == x.shape
        torch.testing.assert_close(y, ae.vae.decode(z / 0.3189).sample)
        ae.vae.save_pretrained(str(tmp_path / "dcae"))
        again = DCAutoencoder.from_pretrained(str(tmp_path / "dcae"), scaling_factor=0.3189)
        torch.testing.assert_close(again.encode(x), z)
        torch.testing.assert_close(again.decode(z), y)
    with pytest.raises(ValueError, match="latents"):
        ae.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="multiples"):
        ae.encode(torch.randn(1, 3, 7, 8))


def test_dc_autoencoder_takes_the_scaling_factor_of_its_config(tmp_path):
    pytest.importorskip("diffusers")
    import json

    from diffusers import AutoencoderDC

    folder = tmp_path / "dcae"
    AutoencoderDC(**TINY_DC, scaling_factor=0.75).save_pretrained(str(folder))
    assert DCAutoencoder.from_pretrained(str(folder)).scaling_factor == 0.75
    config = json.loads((folder / "config.json").read_text())
    del config["scaling_factor"]  # the original dc-ae-f32c32-in-1.0 config has none
    (folder / "config.json").write_text(json.dumps(config))
    assert DCAutoencoder.from_pretrained(str(folder)).scaling_factor == DC_AE_F32C32_SCALE
    assert DCAutoencoder.from_pretrained(str(folder), scaling_factor=2.0).scaling_factor == 2.0
    config["scaling_factor"] = -1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: scaling_factor"):
        DCAutoencoder.from_pretrained(str(folder))
