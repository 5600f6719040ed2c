"""Checkpoints: round trips per variant, what is stored, atomic replacement."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from latteflow.core.checkpoint import (CONFIG_NAME, TRAINER_NAME, WEIGHTS_NAME, clean_temporaries, load_checkpoint,
                                  load_state, load_trainer_state, read_config, record_checksums, save_checkpoint,
                                  verify_checkpoint)


def _velocity(model, tiny):
    ids, mask = tiny.prompts([4, 2])
    ctx = model.build_context(ids, mask)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.cat([model.velocity(x, torch.tensor([s, s]), ctx) for s in (0.9, 0.1)])


def test_couple_round_trip_stores_only_the_generation_path(tiny, tmp_path):
    model = tiny.make_model(num_groups=2, num_layers=2)
    path = save_checkpoint(model, str(tmp_path / "ck"), metadata={"note": "x"})
    names = set(load_file(os.path.join(path, WEIGHTS_NAME)))
    assert names and not any(n.startswith("backbone.") for n in names)
    assert names == {n for n in model.state_dict() if not n.startswith("backbone.")}  # groups + time_embed
    config = read_config(path)
    assert config["latteflow"] == json.loads(json.dumps(model.cfg.to_dict()))
    assert config["metadata"] == {"note": "x"} and not config["includes_backbone"]
    # into a model with the same (frozen) backbone and fresh zero heads
    loaded = load_checkpoint(path, tiny.make_backbone(num_layers=2))
    torch.testing.assert_close(_velocity(loaded, tiny), _velocity(model, tiny), atol=0, rtol=0)
    with pytest.raises(ValueError, match="backbone"):
        load_checkpoint(path)  # the backbone is not in it


def test_blend_round_trip_rebuilds_from_the_checkpoint_alone(tiny, tmp_path):
    model = tiny.make_model("blend", num_groups=2, num_layers=2)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.01)  # differs from the seeded backbone: must come from the file
    path = save_checkpoint(model, str(tmp_path / "ck"))
    names = set(load_file(os.path.join(path, WEIGHTS_NAME)))
    assert not any(".self_attn." in n for n in names if n.startswith("groups."))  # shared tensors stored once
    loaded = load_checkpoint(path)
    torch.testing.assert_close(_velocity(loaded, tiny), _velocity(model, tiny), atol=1e-6, rtol=1e-6)
    q = loaded.backbone.model.language_model.layers[1].self_attn.q_proj.weight
    assert loaded.groups[1].layers[0].self_attn.q_proj.weight is q  # still shared after loading


def test_include_backbone_and_overrides(tiny, tmp_path):
    model = tiny.make_model(num_groups=1, num_layers=2)
    path = save_checkpoint(model, str(tmp_path / "ck"), include_backbone=True)
    loaded = load_checkpoint(path, backend="fused")
    assert loaded.cfg.backend == "fused"
    torch.testing.assert_close(_velocity(loaded, tiny), _velocity(model, tiny), atol=1e-6, rtol=1e-6)


def test_save_replaces_atomically_and_leaves_no_temporaries(tiny, tmp_path, monkeypatch):
    model = tiny.make_model(num_groups=1, num_layers=1)
    target = str(tmp_path / "ck")
    save_checkpoint(model, target)
    with torch.no_grad():
        model.groups[0].proj_out.weight.add_(1)
    save_checkpoint(model, target)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert sorted(os.listdir(target)) == [CONFIG_NAME, WEIGHTS_NAME]
    w = load_file(os.path.join(target, WEIGHTS_NAME))["groups.0.proj_out.weight"]
    torch.testing.assert_close(w, model.groups[0].proj_out.weight)

    class Boom(Exception):
        pass

    import latteflow.core.checkpoint as ck

    def fail(*a, **k):
        raise Boom

    monkeypatch.setattr(ck.json, "dump", fail)
    with pytest.raises(Boom):
        save_checkpoint(model, target)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # the old checkpoint survives, the temporary is gone
    read_config(target)


def test_load_state_rejects_a_mismatched_model(tiny, tmp_path):
    path = save_checkpoint(tiny.make_model(num_groups=2, num_layers=2), str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="num_groups"):
        load_state(tiny.make_model(num_groups=1, num_layers=2), path)
    with pytest.raises(FileNotFoundError):
        read_config(str(tmp_path / "nothing"))


# ------------------------------------------------------------------------------------------------
# integrity: every file's SHA-256 in config.json, checked as it is read
def _saved(tiny, tmp_path, **kw):
    model = tiny.make_model(num_groups=1, num_layers=1)
    return model, save_checkpoint(model, str(tmp_path / "ck"), **kw)


def test_config_records_the_sha256_of_every_file(tiny, tmp_path):
    import hashlib

    _, path = _saved(tiny, tmp_path, trainer_state={"step": 3}, files={"tokenizer.json": b"{}"})
    files = read_config(path)["files"]
    assert sorted(files) == sorted([TRAINER_NAME, "tokenizer.json", WEIGHTS_NAME])
    for name, entry in files.items():
        data = open(os.path.join(path, name), "rb").read()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert verify_checkpoint(path)["files"] == files
    assert load_trainer_state(path) == {"step": 3}


def _flip_middle(f):
    data = bytearray(open(f, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    open(f, "wb").write(bytes(data))


def _truncate(f):
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 3])


def _grow(f):
    open(f, "ab").write(b"\0" * 8)


@pytest.mark.parametrize("corrupt, words", [(_flip_middle, ["SHA-256", "does not match"]), (_truncate, ["truncated"]),
                                            (_grow, ["bytes", "records"])])
@pytest.mark.parametrize("name", [WEIGHTS_NAME, TRAINER_NAME])
def test_a_corrupt_file_is_one_valueerror_naming_it(tiny, tmp_path, corrupt, words, name):
    model, path = _saved(tiny, tmp_path, trainer_state={"step": 1})
    corrupt(os.path.join(path, name))
    load = (lambda: load_state(model, path)) if name == WEIGHTS_NAME else (lambda: load_trainer_state(path))
    with pytest.raises(ValueError) as e:
        load()
    assert os.path.join(path, name) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_missing_or_unrecorded_weights(tiny, tmp_path):
    model, path = _saved(tiny, tmp_path)
    weights = os.path.join(path, WEIGHTS_NAME)
    config = read_config(path)
    del config["files"]  # as written before checksums were recorded
    open(os.path.join(path, CONFIG_NAME), "w").write(json.dumps(config))
    with pytest.raises(ValueError, match="records no SHA-256") as e:
        load_state(model, path)
    assert weights in str(e.value) and "record_checksums" in str(e.value)
    assert sorted(record_checksums(path)) == [WEIGHTS_NAME]  # vouches for the files as they are
    load_state(model, path)
    os.unlink(weights)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_state(model, path)


@pytest.mark.parametrize("text, words", [
    ("[1, 2, 3]", ["JSON object", "list"]),
    ("{not json", ["not a JSON"]),
    ("", ["not a JSON"]),
    ('"a string"', ["JSON object", "string"]),
    ("\udcff", ["not a JSON"]),
    ('{"format": 7}', ["format 7"]),
    ('{"format": 1, "latteflow": [], "files": {}}', ["latteflow"]),
    ('{"format": 1, "latteflow": {"variant": "nope"}}', ["latteflow", "variant"]),
])
def test_a_malformed_config_is_one_valueerror_naming_it(tiny, tmp_path, text, words):
    model, path = _saved(tiny, tmp_path)
    with open(os.path.join(path, CONFIG_NAME), "w", errors="surrogateescape") as f:
        f.write(text)
    for call in (lambda: read_config(path), lambda: load_state(model, path), lambda: load_checkpoint(path)):
        with pytest.raises(ValueError) as e:
            call()
        assert os.path.join(path, CONFIG_NAME) in str(e.value)
        for w in words:
            assert w in str(e.value)


@pytest.mark.parametrize("edit", [
    lambda c: c["files"].update({WEIGHTS_NAME: {"sha256": "xyz", "bytes": 3}}),
    lambda c: c["files"].update({WEIGHTS_NAME: "abc"}),
    lambda c: c["files"].update({"../escape": c["files"][WEIGHTS_NAME]}),
    lambda c: c.update(files=[]),
    lambda c: c.update(metadata=3),
    lambda c: c.update(includes_backbone="yes"),
])
def test_malformed_entries_of_a_config_are_refused(tiny, tmp_path, edit):
    _, path = _saved(tiny, tmp_path)
    config = read_config(path)
    edit(config)
    open(os.path.join(path, CONFIG_NAME), "w").write(json.dumps(config))
    with pytest.raises(ValueError, match=CONFIG_NAME):
        read_config(path)


def test_a_killed_save_is_cleaned_and_an_interrupted_replace_restored(tiny, tmp_path):
    _, path = _saved(tiny, tmp_path)
    parent = tmp_path
    os.makedirs(parent / ".step_00000004.tmp-ab12_xyz")  # a save killed mid-write
    (parent / ".step_00000004.tmp-ab12_xyz" / WEIGHTS_NAME).write_bytes(b"half")
    (parent / ".latest.k3j_9a2b.tmp").write_text("step_0000")  # an atomic_write killed mid-write
    os.makedirs(parent / ".ck.old-zz9")  # a replacing save killed between its two renames
    os.replace(path, parent / ".ck.old-zz9" / "ckpt")
    (parent / "notes.tmp").write_text("mine")  # not a temporary of ours: kept
    (parent / ".hidden").write_text("mine")
    removed = clean_temporaries(str(parent))
    assert sorted(removed) == [".ck.old-zz9", ".latest.k3j_9a2b.tmp", ".step_00000004.tmp-ab12_xyz"]
    assert sorted(os.listdir(parent)) == [".hidden", "ck", "notes.tmp"]
    verify_checkpoint(path)  # the old checkpoint is back, intact
