"""``load_pipeline``: the shipped digits checkpoint and saved checkpoint directories."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from latteflow import load_pipeline
from latteflow.core.checkpoint import read_config, verify_checkpoint
from latteflow.data.digits import DIGIT_PROMPTS
from latteflow.apps.digits_recipe import DigitsRecipe, build_digits_model, save_digits_model
from latteflow.pipeline import SHIPPED, resolve_checkpoint, sample_prompts

# the shipped weights, byte for byte: recording their checksum must not have changed them
SHIPPED_WEIGHTS_SHA256 = "da4cb79fcc573491302481a87c7d50117744fa3c076c9c20b6ac9609bba490c3"


@pytest.fixture(scope="module")
def digits():
    return load_pipeline("digits", device="cpu")


def test_shipped_checkpoint_is_complete():
    path = resolve_checkpoint("digits")
    assert path == SHIPPED["digits"]
    names = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "tokenizer.json", "MANIFEST.json"} <= names
    manifest = json.load(open(os.path.join(path, "MANIFEST.json")))
    for key in ("command", "commit", "seed", "steps", "wall_seconds", "eval"):
        assert manifest[key] is not None, key
    assert manifest["command"].startswith("latteflow train --data digits")
    total = sum(os.path.getsize(os.path.join(path, n)) for n in names)
    assert total < 8 * 2**20, f"shipped checkpoint is {total / 2**20:.1f} MiB"


def test_shapes_dtype_and_determinism(digits):
    a = digits(["digit 3", "digit 7"], steps=4, guidance=5.0, seed=0)
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == (2, 8, 8, 1)
    b = digits(["digit 3", "digit 7"], steps=4, guidance=5.0, seed=0)
    np.testing.assert_array_equal(a, b)
    c = digits(["digit 3", "digit 7"], steps=4, guidance=5.0, seed=1)
    assert not np.array_equal(a, c)
    one = digits("digit 3", steps=4, seed=0)
    assert one.shape == (1, 8, 8, 1)
    np.testing.assert_array_equal(one[0], a[0])  # the noise of row 0 depends on the seed only


def test_unknown_characters_are_named(digits):
    with pytest.raises(ValueError, match="'Q'.*'é'|'é'.*'Q'"):
        digits(["digit é", "Q"], steps=2)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(prompts=[]), ValueError, "prompts"),
    (dict(prompts=[3]), TypeError, "prompts"),
    (dict(prompts=["digit 1"], steps=0), ValueError, "steps"),
    (dict(prompts=["digit 1"], guidance="5"), TypeError, "guidance"),
    (dict(prompts=["digit 1"], seed=-1), ValueError, "seed"),
])
def test_bad_arguments(digits, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        digits(**kwargs)


def test_saved_checkpoint_roundtrip_and_backbone_checksum(tmp_path):
    recipe = DigitsRecipe()
    model, tok = build_digits_model(recipe, init_seed=3)
    with torch.no_grad():  # non-zero heads, so the images depend on the stored weights
        for g in model.groups:
            g.proj_out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    path = save_digits_model(model, tok, str(tmp_path / "ckpt"), recipe)
    pipe = load_pipeline(path, device="cpu")
    for name, t in model.state_dict().items():
        torch.testing.assert_close(pipe.model.state_dict()[name], t, rtol=0, atol=0)
    assert load_pipeline(str(tmp_path / "ckpt"))(["digit 1"], steps=2).shape == (1, 8, 8, 1)

    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["metadata"]["backbone_sha256"] = "0" * 64
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="SHA-256"):
        load_pipeline(str(bad))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pipeline(str(tmp_path / "nothing"))


def test_shipped_checkpoint_records_and_matches_its_checksums():
    config = verify_checkpoint(SHIPPED["digits"])
    assert sorted(config["files"]) == ["MANIFEST.json", "model.safetensors", "tokenizer.json"]
    assert config["files"]["model.safetensors"]["sha256"] == SHIPPED_WEIGHTS_SHA256


def test_prompt_set(digits):
    assert digits.prompts == list(DIGIT_PROMPTS)
    for bad in ("a cat", "digit 12", "", "seven", ["digit 1", "digit 10"]):
        with pytest.raises(ValueError, match="not among the 10 prompts.*'digit 0'.*'digit 9'"):
            digits(bad, steps=1)
    assert sample_prompts(list(DIGIT_PROMPTS)) == list(DIGIT_PROMPTS)
    assert sample_prompts([f"p{i}" for i in range(25)], 10) == [f"p{i * 25 // 10}" for i in range(10)]
    assert sample_prompts(["a", "b"], 10) == ["a", "b"]


def test_chunked_generation_and_progress(digits):
    prompts = ["digit 1", "digit 4", "digit 4", "digit 9", "digit 0"]
    whole = digits.generate(prompts, steps=3, seed=2)
    chunked = digits.generate(prompts, steps=3, seed=2, batch_size=2, progress=True)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)  # same noise rows; float32 batch rounding only
    with pytest.raises(ValueError, match="batch_size"):
        digits.generate(prompts, batch_size=0)


def _saved(tmp_path):
    recipe = DigitsRecipe()
    model, tok = build_digits_model(recipe, init_seed=3)
    return save_digits_model(model, tok, str(tmp_path / "ckpt"), recipe, manifest={"note": "x"})


def test_saved_checkpoint_records_every_file(tmp_path):
    path = _saved(tmp_path)
    assert sorted(read_config(path)["files"]) == ["MANIFEST.json", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(path)) == ["MANIFEST.json", "config.json", "model.safetensors", "tokenizer.json"]
    assert json.load(open(os.path.join(path, "MANIFEST.json"))) == {"note": "x"}


@pytest.mark.parametrize("name, corrupt, word", [
    ("model.safetensors", lambda b: b[:100] + bytes(x ^ 1 for x in b[100:164]) + b[164:], "SHA-256"),
    ("model.safetensors", lambda b: b[: len(b) // 2], "truncated"),
    ("tokenizer.json", lambda b: b.replace(b"digit", b"DIGIT") if b"digit" in b else b + b" ", "tokenizer.json"),
    ("config.json", lambda b: b"[" + b + b"]", "JSON object"),
    ("config.json", lambda b: b[:-10], "not a JSON"),
])
def test_load_pipeline_refuses_a_corrupt_file_naming_it(tmp_path, name, corrupt, word):
    path = _saved(tmp_path)
    f = os.path.join(path, name)
    data = open(f, "rb").read()
    open(f, "wb").write(corrupt(data))
    with pytest.raises(ValueError, match=word) as e:
        load_pipeline(path)
    assert f in str(e.value)


def _set(path, value):
    def edit(config):
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, word", [
    (_set(["metadata", "autoencoder"], None), "metadata.autoencoder"),
    (_set(["metadata", "autoencoder"], []), "metadata.autoencoder"),
    (_set(["metadata", "autoencoder", "patch_size"], "x"), "patch_size"),
    (_set(["metadata", "autoencoder", "type"], "dcae"), "'dcae'"),
    (_set(["latteflow", "latent_channels"], 3), "latent channels"),
    (_set(["metadata", "backbone_seed"], "zero"), "backbone_seed"),
    (_set(["backbone", "text_config", "num_hidden_layers"], 3), "'backbone'"),   # huggingface_hub's own error type
    (_set(["backbone", "text_config", "hidden_size"], 7), "'backbone'"),         # refused when the model is built
    (_set(["latteflow", "extra", "prompts"], []), "prompts"),
    (lambda c: c["files"].update({"extra.bin": c["files"]["model.safetensors"]}), "extra.bin"),  # recorded, absent
])
def test_load_pipeline_refuses_a_malformed_config_naming_it(tmp_path, edit, word):
    path = _saved(tmp_path)
    f = os.path.join(path, "config.json")
    config = json.load(open(f))
    edit(config)
    json.dump(config, open(f, "w"))
    with pytest.raises(ValueError, match=word) as e:
        load_pipeline(path)
    assert path in str(e.value)
