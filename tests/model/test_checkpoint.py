"""Checkpoints: round trips per variant, what is stored, atomic replacement."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from latteflow.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint, load_state, read_config, save_checkpoint


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

    import latteflow.checkpoint as ck

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
