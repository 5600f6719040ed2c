"""`latteflow prepare` end to end on CPU with a toy DC-AE and image folder; the ADM crop on known images."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import toy_data
from latteflow.apps.cli import main
from latteflow.core.files import weights_sha256
from latteflow.data.image_folder import adm_center_crop, load_image, scan_image_folder, to_model_pixels, to_rgb
from latteflow.data.prepare import ORDER_SEED, prepare
from latteflow.data.shards import LatentShards, load_manifest
from latteflow.data.vae import DCAutoencoder

RES = 16


def _expected_latents(images, dcae, flip=True):
    """The latents prepare should write, computed one image at a time in prepare's documented order."""
    _, files, _ = scan_image_folder(images)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(ORDER_SEED)).tolist()
    ae = DCAutoencoder.from_pretrained(dcae)
    lats, labels = [], []
    for i in order:
        rel, label = files[i]
        if rel == toy_data.TOY_UNREADABLE:
            continue
        x = to_model_pixels(adm_center_crop(load_image(os.path.join(images, rel)), RES))[None]
        with torch.no_grad():
            lats.append(ae.encode(x))
            labels.append(label)
            if flip:
                lats.append(ae.encode(x.flip(-1)))
                labels.append(label)
    return torch.cat(lats), labels


def test_prepare_writes_the_manifest_and_the_latents_of_every_readable_image(toy_image_folder, toy_dcae_folder, tmp_path):
    out = tmp_path / "latents"
    m = prepare(toy_image_folder, toy_dcae_folder, out, resolution=RES, batch_size=3, device="cpu", progress=False,
                images_per_shard=3)
    assert m == load_manifest(out)
    assert m["classes"] == sorted(toy_data.TOY_CLASSES) and m["prompts"] == m["classes"]
    assert m["counts"] == [6, 4, 4] and m["num_latents"] == 2 * toy_data.TOY_READABLE  # mirrors included
    assert m["resolution"] == RES and m["latent_shape"] == [4, RES // 4, RES // 4] and m["flip"] is True
    assert m["scaling_factor"] == 0.5 and m["dtype"] == "float32"
    assert m["vae"] == {"folder": os.path.abspath(toy_dcae_folder), "sha256": weights_sha256(toy_dcae_folder)["sha256"]}
    assert [s["file"] for s in m["shards"]] == ["shard_00000.safetensors", "shard_00001.safetensors",
                                                 "shard_00002.safetensors"]
    assert [p for p, _ in m["skipped"]] == [os.path.join(toy_image_folder, toy_data.TOY_UNREADABLE)]
    ds = LatentShards(out, verify=True)
    got = torch.stack([ds[i][0] for i in range(len(ds))])
    want, labels = _expected_latents(toy_image_folder, toy_dcae_folder)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert [ds[i][1] for i in range(len(ds))] == labels
    assert not torch.allclose(got[0::2], got[1::2])  # the mirror is encoded, not copied


def test_prepare_without_flip_and_with_class_names(toy_image_folder, toy_dcae_folder, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"n01440764": "tench", "n01484850": "great white shark", "n09999999": "unused"}))
    m = prepare(toy_image_folder, toy_dcae_folder, tmp_path / "out", resolution=RES, class_names=str(names),
                flip=False, progress=False)
    assert m["counts"] == [3, 2, 2] and m["num_latents"] == 7 and m["flip"] is False
    assert m["prompts"] == ["tench", "n01443537", "great white shark"]  # a class without an entry keeps its name
    assert len(m["shards"]) == 1 and m["shards"][0]["count"] == 7


def test_prepare_resumes_keeping_finished_shards(toy_image_folder, toy_dcae_folder, tmp_path):
    out = tmp_path / "out"
    kw = dict(resolution=RES, batch_size=4, progress=False, images_per_shard=3)
    first = prepare(toy_image_folder, toy_dcae_folder, out, **kw)
    shard = [out / s["file"] for s in first["shards"]]
    stamps = [p.stat().st_mtime_ns for p in shard]
    os.unlink(shard[1])  # as if the first run had died while encoding shard 1
    os.unlink(out / "manifest.json")
    again = prepare(toy_image_folder, toy_dcae_folder, out, **kw)
    assert again == first  # the re-encoded shard is the same bytes (same SHA-256)
    assert shard[0].stat().st_mtime_ns == stamps[0] and shard[2].stat().st_mtime_ns == stamps[2]
    # other settings: every shard is encoded again
    other = prepare(toy_image_folder, toy_dcae_folder, out, **dict(kw, images_per_shard=4))
    assert len(other["shards"]) == 2 and sorted(os.listdir(out)) == ["manifest.json", "shard_00000.safetensors",
                                                                      "shard_00001.safetensors"]
    assert other["counts"] == first["counts"]


def test_a_shard_of_only_unreadable_files_is_empty_and_leftover_temporaries_go(toy_dcae_folder, tmp_path):
    images = tmp_path / "images"
    (images / "good").mkdir(parents=True)
    (images / "bad").mkdir()
    toy_data.draw_image("RGB", (20, 20), 1).save(images / "good" / "a.png")
    for k in range(3):
        (images / "bad" / f"{k}.png").write_bytes(b"not a png")
    (images / "notes.txt").write_text("outside any class")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".shard_00000.safetensors.abc123.tmp").write_bytes(b"half a shard")  # a killed run's leftover
    m = prepare(images, toy_dcae_folder, out, resolution=RES, flip=False, progress=False, images_per_shard=1)
    assert m["classes"] == ["bad", "good"] and m["counts"] == [0, 1] and m["num_latents"] == 1
    assert sorted(s["count"] for s in m["shards"]) == [0, 0, 0, 1]
    assert len(m["skipped"]) == 4 and [str(images / "notes.txt"), "not inside a class folder"] in m["skipped"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    ds = LatentShards(out)
    assert len(ds) == 1 and ds[0][1] == 1
    for k in range(3):  # nothing readable at all: an error, not an empty data set
        (images / "good" / "a.png").write_bytes(b"broken too")
    with pytest.raises(ValueError, match="--images .* not one readable image"):
        prepare(images, toy_dcae_folder, out, resolution=RES, progress=False)


def test_the_cli_prepares_and_lists_skipped_files(toy_image_folder, toy_dcae_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["prepare", "--images", toy_image_folder, "--vae", toy_dcae_folder, "--out", str(out),
               "--resolution", str(RES), "--no-flip", "--batch-size", "2", "--device", "cpu", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "7 latents 4x4x4 (no mirrors) of 3 classes in 1 shards" in text
    assert "skipped 1 file:" in text and "broken.JPEG" in text
    assert LatentShards(out).manifest["counts"] == [3, 2, 2]


def test_errors_name_the_argument(toy_image_folder, toy_dcae_folder, tmp_path, capsys):
    kw = dict(resolution=RES, progress=False)
    with pytest.raises(ValueError, match="--images .* is not a folder"):
        prepare(tmp_path / "nowhere", toy_dcae_folder, tmp_path / "o", **kw)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="--images .* has no class folders"):
        prepare(tmp_path / "flat", toy_dcae_folder, tmp_path / "o", **kw)
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(ValueError, match="class folder .*empty_class.* holds no files"):
        prepare(tmp_path / "flat", toy_dcae_folder, tmp_path / "o", **kw)
    bad = tmp_path / "bad.json"
    for text, message in (("{oops", "not JSON"), ('["tench"]', "must be a JSON object"), ('{"a": ""}', "empty prompt")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"--class-names .*{message}"):
            prepare(toy_image_folder, toy_dcae_folder, tmp_path / "o", class_names=str(bad), **kw)
    with pytest.raises(ValueError, match="--class-names .* no such file"):
        prepare(toy_image_folder, toy_dcae_folder, tmp_path / "o", class_names=str(tmp_path / "none.json"), **kw)
    with pytest.raises(ValueError, match="--vae .* is not a folder"):
        prepare(toy_image_folder, tmp_path / "novae", tmp_path / "o", **kw)
    with pytest.raises(ValueError, match="--resolution must be a multiple of the VAE's downsampling factor 4"):
        prepare(toy_image_folder, toy_dcae_folder, tmp_path / "o", resolution=18, progress=False)
    with pytest.raises(ValueError, match="--out .* lies inside --images"):
        prepare(toy_image_folder, toy_dcae_folder, os.path.join(toy_image_folder, "latents"), **kw)
    with pytest.raises(ValueError, match="--batch-size"):
        prepare(toy_image_folder, toy_dcae_folder, tmp_path / "o", batch_size=0, progress=False)
    with pytest.raises(ValueError, match="--device"):
        prepare(toy_image_folder, toy_dcae_folder, tmp_path / "o", device="warp-drive", **kw)
    assert main(["prepare", "--images", str(tmp_path / "nowhere"), "--vae", toy_dcae_folder, "--out",
                 str(tmp_path / "o")]) == 2
    assert "latteflow: error: --images" in capsys.readouterr().err


@pytest.mark.gpu
def test_prepare_on_cuda_matches_cpu(toy_image_folder, toy_dcae_folder, tmp_path):
    kw = dict(resolution=RES, progress=False, images_per_shard=4)
    torch.backends.cudnn.allow_tf32 = False
    cpu = prepare(toy_image_folder, toy_dcae_folder, tmp_path / "cpu", device="cpu", **kw)
    gpu = prepare(toy_image_folder, toy_dcae_folder, tmp_path / "gpu", device="cuda", **kw)
    assert gpu["counts"] == cpu["counts"] and gpu["skipped"] == cpu["skipped"]
    a, b = LatentShards(tmp_path / "cpu"), LatentShards(tmp_path / "gpu")
    torch.testing.assert_close(torch.stack([b[i][0] for i in range(len(b))]),
                               torch.stack([a[i][0] for i in range(len(a))]), rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# the ADM crop and the RGB conversion on images whose answer is known
def _stripes(size, colours, axis):
    """An RGB image cut into equal stripes of ``colours`` along ``axis`` (0: top to bottom, 1: left to right)."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    n = len(colours)
    for k, c in enumerate(colours):
        if axis == 0:
            a[k * h // n:(k + 1) * h // n] = c
        else:
            a[:, k * w // n:(k + 1) * w // n] = c
    return Image.fromarray(a)


def test_adm_crop_keeps_the_centre_of_a_tall_or_wide_image():
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    tall = adm_center_crop(_stripes((16, 48), [red, green, blue], axis=0), 16)  # no resize: short side is 16
    assert tall.size == (16, 16) and (np.asarray(tall) == green).all()
    wide = adm_center_crop(_stripes((48, 16), [red, green, blue], axis=1), 16)
    assert wide.size == (16, 16) and (np.asarray(wide) == green).all()
    same = _stripes((16, 16), [red, blue], axis=1)
    assert np.array_equal(np.asarray(adm_center_crop(same, 16)), np.asarray(same))


def test_adm_crop_box_halves_then_resizes_to_the_short_side():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    out = np.asarray(adm_center_crop(Image.fromarray(a), 16)).astype(int)  # 64 -> 32 -> 16 by 2x2 box means
    means = a.astype(float).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
    assert np.abs(out - means).max() <= 2  # Pillow rounds (fixed point) after each halving
    direct = np.asarray(Image.fromarray(a).resize((16, 16), resample=Image.BICUBIC)).astype(int)
    assert np.abs(direct - means).max() > 8  # what skipping the halvings would give: not the same
    # 100x40 at 16: halved once (50x20, short side 20 < 32), bicubic to 40x16, centre 16 columns
    flat = Image.new("RGB", (100, 40), (10, 200, 30))
    got = adm_center_crop(flat, 16)
    assert got.size == (16, 16) and (np.asarray(got) == (10, 200, 30)).all()
    small = adm_center_crop(Image.new("RGB", (5, 9), (1, 2, 3)), 16)  # upsampled: short side 5 -> 16
    assert small.size == (16, 16) and (np.asarray(small) == (1, 2, 3)).all()
    with pytest.raises(ValueError, match="resolution"):
        adm_center_crop(flat, 0)


def test_every_pillow_mode_becomes_rgb():
    grey = Image.new("L", (4, 3), 77)
    assert to_rgb(grey).mode == "RGB" and (np.asarray(to_rgb(grey)) == 77).all()
    rgba = Image.new("RGBA", (4, 3), (9, 8, 7, 0))
    assert (np.asarray(to_rgb(rgba)) == (9, 8, 7)).all()
    pal = Image.new("RGB", (4, 3), (200, 100, 50)).quantize(colors=4)
    assert pal.mode == "P" and (np.asarray(to_rgb(pal)) == (200, 100, 50)).all()
    deep = Image.fromarray(np.full((3, 4), 65535, np.uint16))
    assert deep.mode.startswith("I;16") and (np.asarray(to_rgb(deep)) == 255).all()
    cmyk = Image.new("CMYK", (4, 3), (0, 0, 0, 0))
    assert (np.asarray(to_rgb(cmyk)) == 255).all()
    x = to_model_pixels(Image.new("RGB", (2, 2), (0, 255, 0)))
    assert x.shape == (3, 2, 2) and x[0].eq(-1).all() and x[1].eq(1).all()
