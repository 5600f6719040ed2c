"""LatteFlowConfig: defaults, the time partition, serialisation and every class of bad input."""
import json

import pytest

from latteflow import LatteFlowConfig, LatteFlowModel
from latteflow.core.sampler import group_step_counts


def test_defaults_follow_the_paper():
    cfg = LatteFlowConfig()
    assert cfg.variant == "couple" and cfg.num_groups == 4 and cfg.latent_channels == 32
    assert cfg.grid_hw == (8, 8) and cfg.latent_hw == (8, 8) and cfg.patch_size == 1
    assert cfg.boundaries == [1000.0, 700.0, 450.0, 200.0, 0.0]
    assert cfg.train_overlap == 100 and cfg.residual_attention and cfg.backend == "fused"
    assert cfg.cfg_dropout == 0.1 and cfg.timestep_dim == 256


def test_boundaries_uniform_custom_and_default_for_other_k():
    assert LatteFlowConfig(boundaries="uniform").boundaries == [1000, 750, 500, 250, 0]
    assert LatteFlowConfig(num_groups=2).boundaries == [1000, 500, 0]
    assert LatteFlowConfig(num_groups=3, boundaries=[1000, 900, 100, 0]).boundaries == [1000, 900, 100, 0]


def test_strict_partition_and_widened_training_intervals():
    cfg = LatteFlowConfig()
    owners = {1000: 0, 700.01: 0, 700: 1, 450.5: 1, 450: 2, 200: 3, 25: 3, 0: 3}
    for s, k in owners.items():
        assert cfg.group_of(s) == k, s
    # a float32 sigma on a boundary goes where the exact value goes
    import torch
    assert cfg.group_of(float(torch.tensor(0.7, dtype=torch.float32)) * 1000) == 1  # 699.99998 -> as 700
    assert cfg.group_of(float(torch.tensor(0.45, dtype=torch.float32)) * 1000) == 2
    assert [cfg.train_interval(k) for k in range(4)] == [(650, 1000), (400, 750), (150, 500), (0, 250)]
    assert LatteFlowConfig(train_overlap=0).train_interval(1) == (450, 700)
    with pytest.raises(ValueError, match="1000"):
        cfg.group_of(1000.5)


def test_strict_partition_gives_12_10_10_8_steps_at_t40():
    assert group_step_counts(LatteFlowConfig(), 40) == [12, 10, 10, 8]
    assert group_step_counts(LatteFlowConfig(boundaries="uniform"), 40) == [10, 10, 10, 10]
    assert sum(group_step_counts(LatteFlowConfig(), 7)) == 7


def test_json_round_trip():
    cfg = LatteFlowConfig(variant="blend", num_groups=2, latent_channels=4, grid_hw=(4, 2), patch_size=2,
                          boundaries=[1000, 600, 0], backend="reference", extra={"prompts": ["a"]})
    back = LatteFlowConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert back.latent_hw == (8, 4)
    with pytest.raises(ValueError, match="unknown"):
        LatteFlowConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_vanilla_variants_force_one_group_without_residual():
    for v in ("vanilla_couple", "vanilla_blend"):
        cfg = LatteFlowConfig(variant=v, num_groups=4, residual_attention=True)
        assert cfg.num_groups == 1 and not cfg.residual_attention and cfg.boundaries == [1000, 0]
        assert LatteFlowConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs,field", [
    (dict(variant="mixture"), "variant"),
    (dict(backend="cuda"), "backend"),
    (dict(boundaries=[1000, 500, 0]), "boundaries"),          # wrong length for K = 4
    (dict(boundaries=[1000, 700, 800, 200, 0]), "boundaries"),  # not decreasing
    (dict(boundaries=[1000, 700, 700, 200, 0]), "boundaries"),  # not strictly
    (dict(boundaries=[900, 700, 450, 200, 0]), "boundaries"),   # not from 1000
    (dict(boundaries=[1000, 700, 450, 200, 10]), "boundaries"),  # not to 0
    (dict(boundaries="log"), "boundaries"),
    (dict(grid_hw=(8, 8), latent_hw=(16, 16)), "grid_hw"),
    (dict(grid_hw=(4, 4), patch_size=2, latent_hw=(4, 4)), "grid_hw"),
    (dict(grid_hw=(0, 8)), "grid_hw"),
    (dict(num_groups=0), "num_groups"),
    (dict(num_groups=3, num_layers=28), "num_groups"),
    (dict(cfg_dropout=1.5), "cfg_dropout"),
    (dict(train_overlap=-1), "train_overlap"),
    (dict(latent_channels=0), "latent_channels"),
    (dict(timestep_dim=255), "timestep_dim"),
])
def test_bad_configs_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LatteFlowConfig(**kwargs)


def test_type_errors():
    with pytest.raises(TypeError, match="grid_hw"):
        LatteFlowConfig(grid_hw="8x8")
    with pytest.raises(TypeError, match="boundaries"):
        LatteFlowConfig(boundaries=[1000, "a", None, 1, 0])


def test_model_rejects_layers_not_divisible_by_groups(tiny):
    backbone = tiny.make_backbone(num_layers=3)
    with pytest.raises(ValueError, match="num_groups"):
        LatteFlowModel(backbone, LatteFlowConfig(num_groups=2, latent_channels=4, grid_hw=(4, 4)))
    with pytest.raises(ValueError, match="num_layers"):
        LatteFlowModel(backbone, LatteFlowConfig(num_groups=1, num_layers=4, latent_channels=4, grid_hw=(4, 4)))
    with pytest.raises(TypeError, match="cfg"):
        LatteFlowModel(backbone, {"variant": "couple"})
