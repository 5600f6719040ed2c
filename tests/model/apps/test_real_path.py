"""The issue-15 path end to end, as a user runs it, on CPU at toy size: ``latteflow prepare`` an
ImageNet-layout folder with a save_pretrained DC-AE -> ``latteflow train --data ... --backbone ...`` a
few steps -> ``--resume`` -> ``latteflow sample`` / ``load_pipeline``: same seed, same images."""
import json

import numpy as np
import pytest

pytest.importorskip("diffusers")


def test_prepare_train_resume_sample(toy_image_folder, toy_dcae_folder, toy_qwen2vl_folder, tmp_path):
    import toy_data
    from PIL import Image

    from latteflow import load_pipeline
    from latteflow.apps.cli import main

    names = tmp_path / "names.json"
    names.write_text(json.dumps(toy_data.TOY_NAMES))
    data = tmp_path / "latents"
    assert main(["prepare", "--images", str(toy_image_folder), "--vae", str(toy_dcae_folder), "--out", str(data),
                 "--resolution", "16", "--class-names", str(names), "--batch-size", "4", "--device", "cpu",
                 "--no-progress"]) == 0
    run = tmp_path / "run"
    train = ["train", "--data", str(data), "--backbone", toy_qwen2vl_folder, "--out", str(run), "--batch-size", "4",
             "--micro-batch-size", "2", "--groups", "2", "--checkpoint-every", "1", "--device", "cpu",
             "--no-progress"]
    assert main(train + ["--steps", "2"]) == 0
    assert main(train + ["--steps", "3", "--resume"]) == 0
    pngs = []
    for i in range(2):
        out = tmp_path / f"grid{i}.png"
        assert main(["sample", "--checkpoint", str(run), "--prompt", "goldfish", "--num", "2", "--steps", "2",
                     "--seed", "5", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
        pngs.append(np.asarray(Image.open(out)))
    np.testing.assert_array_equal(pngs[0], pngs[1])
    pipe = load_pipeline(str(run), device="cpu")
    assert pipe.prompts == ["tench", "goldfish", "great white shark"]
    images = pipe(["tench", "great white shark"], steps=2, seed=5)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(images, pipe(["tench", "great white shark"], steps=2, seed=5))
