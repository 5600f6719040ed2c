"""LatteFlowModel: group ownership, backends, variants, velocity and the training loss."""
import pytest
import torch

from latteflow import LatteFlowConfig, LatteFlowModel
from latteflow.core.context import build_context, text_model


def _setup(tiny, variant="couple", num_groups=2, num_layers=4, **kw):
    model = tiny.make_model(variant, num_groups=num_groups, num_layers=num_layers, **kw)
    ids, mask = tiny.prompts([5, 3], pad="left")
    ctx = model.build_context(ids, mask)
    null = model.build_context(torch.tensor([[1, 2]]))
    return model, ctx, null


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_structure_of_couple(tiny):
    model, _, _ = _setup(tiny, num_groups=2, num_layers=4)
    backbone_layers = text_model(model.backbone).layers
    assert isinstance(model.groups, torch.nn.ModuleList) and len(model.groups) == 2
    assert [g.layer_offset for g in model.groups] == [0, 2]
    for k, group in enumerate(model.groups):
        assert len(group.layers) == 2
        assert group.layers[0].gate is None and group.layers[1].gate is not None
        assert group.layers[1].gate.weight.shape == (4, 64) and group.layers[1].gate.bias is None
        for j, layer in enumerate(group.layers):
            src = backbone_layers[2 * k + j]
            assert layer.self_attn is not src.self_attn and layer.mlp is not src.mlp
            torch.testing.assert_close(layer.self_attn.q_proj.weight, src.self_attn.q_proj.weight)  # a copy
            torch.testing.assert_close(layer.mlp.down_proj.weight, src.mlp.down_proj.weight)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.groups.parameters())
    model.train()
    assert model.groups.training and not model.backbone.training


def test_fresh_model_has_zero_heads_and_gates(tiny):
    model = tiny.make_model(randomize=False)
    ids, _ = tiny.prompts([4])
    ctx = model.build_context(ids)
    x = torch.randn(1, 4, 4, 4)
    assert torch.count_nonzero(model.velocity(x, torch.tensor([0.3]), ctx)) == 0
    for group in model.groups:
        assert all(torch.count_nonzero(l.gate.weight) == 0 for l in group.layers if l.gate is not None)


@pytest.mark.parametrize("variant", ["couple", "blend"])
def test_a_group_depends_only_on_its_own_parameters(tiny, variant):
    model, ctx, _ = _setup(tiny, variant, num_groups=2, num_layers=4)
    x = torch.randn(2, 4, 4, 4)
    sig = {0: torch.tensor([0.9, 0.6]), 1: torch.tensor([0.3, 0.1])}
    with torch.no_grad():
        before = {k: model.velocity(x, s, ctx) for k, s in sig.items()}
        _perturb(model.groups[1], seed=1)
        after = {k: model.velocity(x, s, ctx) for k, s in sig.items()}
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)
    assert not torch.allclose(after[1], before[1], atol=1e-3)
    with torch.no_grad():
        _perturb(model.groups[0], seed=2)
        again = model.velocity(x, sig[1], ctx)
    torch.testing.assert_close(again, after[1], atol=0, rtol=0)


def test_residual_gate_and_context_reach_the_velocity(tiny):
    model, ctx, null = _setup(tiny, num_groups=1, num_layers=2)
    x, s = torch.randn(2, 4, 4, 4), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        for layer in model.groups[0].layers:  # random init logits are ~0.03: make attention matter
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
        v = model.velocity(x, s, ctx)
        v_null = model.velocity(x, s, null)
        model.groups[0].layers[1].gate.weight.zero_()
        v_nogate = model.velocity(x, s, ctx)
    assert not torch.allclose(v, v_null, atol=1e-4)
    assert not torch.allclose(v, v_nogate, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_and_reference_backends_agree(tiny, device):
    """float32: the fused ops (Triton/CUDA on GPU, their CPU path here) against the plain references."""
    ref, ctx, _ = _setup(tiny, backend="reference")
    fused_cfg = LatteFlowConfig.from_dict({**ref.cfg.to_dict(), "backend": "fused"})
    fused = LatteFlowModel(tiny.make_backbone(num_layers=4), fused_cfg)
    assert fused.groups[0].layers[0].backend == "fused" and ref.groups[0].layers[0].backend == "reference"
    fused.load_state_dict(ref.state_dict())
    ref, fused, ctx = ref.to(device), fused.to(device), ctx.to(device)
    x = torch.randn(2, 4, 4, 4, device=device)
    for s in ([0.95, 0.8], [0.2, 0.05]):
        s = torch.tensor(s, device=device)
        with torch.no_grad():
            torch.testing.assert_close(fused.velocity(x, s, ctx), ref.velocity(x, s, ctx), atol=1e-5, rtol=1e-5)


def test_velocity_splits_a_batch_across_groups(tiny):
    model, ctx, _ = _setup(tiny)
    x = torch.randn(2, 4, 4, 4)
    s = torch.tensor([0.9, 0.2])  # row 0 -> group 0, row 1 -> group 1
    with torch.no_grad():
        v = model.velocity(x, s, ctx)
        for b in range(2):
            alone = model.velocity(x[b:b + 1], s[b:b + 1], ctx.index_select(torch.tensor([b])))
            torch.testing.assert_close(v[b:b + 1], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[1:], model.group_velocity(1, x[1:], s[1:], ctx.index_select(torch.tensor([1]))))
        assert v.shape == x.shape


def test_velocity_rejects_bad_input(tiny):
    model, ctx, _ = _setup(tiny)
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="x"):
        model.velocity(torch.randn(2, 3, 4, 4), torch.tensor([0.5, 0.5]), ctx)
    with pytest.raises(ValueError, match="sigma"):
        model.velocity(x, torch.tensor([0.5, 1.5]), ctx)
    with pytest.raises(ValueError, match="sigma"):
        model.velocity(x, torch.tensor([0.5, 0.5, 0.5]), ctx)
    with pytest.raises(ValueError, match="ctx"):
        model.velocity(torch.randn(3, 4, 4, 4), torch.tensor([0.5] * 3), ctx)
    with pytest.raises(TypeError, match="ctx"):
        model.velocity(x, torch.tensor([0.5, 0.5]), ctx.keys)


def test_training_loss_draws_each_group_in_its_widened_interval(tiny, monkeypatch):
    model, ctx, null = _setup(tiny, num_groups=2, boundaries=[1000, 500, 0], train_overlap=200)
    seen = {0: [], 1: []}
    orig = model.group_velocity

    def spy(k, x, sigma, c):
        seen[k].append(sigma.detach() * 1000)
        return orig(k, x, sigma, c)

    monkeypatch.setattr(model, "group_velocity", spy)
    x = torch.randn(64, 4, 4, 4)
    model.training_loss(x, ctx.index_select(torch.zeros(64, dtype=torch.long)), null)
    s0, s1 = seen[0][0], seen[1][0]
    assert s0.min() >= 400 and s0.max() <= 1000 and s0.min() < 500  # (400, 1000]: widened by 100 below
    assert s1.min() >= 0 and s1.max() <= 600 and s1.max() > 500


def test_cfg_dropout_replaces_the_condition(tiny):
    model, ctx, null = _setup(tiny)
    x = torch.randn(2, 4, 4, 4)

    def loss(c, n, p):
        model.cfg.cfg_dropout = p
        return model.training_loss(x, c, n, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        always = loss(ctx, null, 1.0)
        torch.testing.assert_close(always, loss(null.expand_to(2), null, 1.0))
        never = loss(ctx, null, 1e-12)
        other = build_context(model.backbone, torch.tensor([[9, 9, 9, 9]]))
        torch.testing.assert_close(never, loss(ctx, other, 1e-12))
        assert not torch.allclose(always, never)


def test_blend_shares_attention_and_trains_everything(tiny):
    model, ctx, null = _setup(tiny, "blend", num_groups=2, num_layers=4)
    src = text_model(model.backbone).layers
    layer = model.groups[1].layers[0]
    assert layer.self_attn is src[2].self_attn
    assert layer.mlp is not src[2].mlp and layer.input_layernorm is not src[2].input_layernorm
    assert all(p.requires_grad for p in model.parameters())
    ids, mask = tiny.prompts([5, 3])
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    before_q, before_mlp = src[2].self_attn.q_proj.weight.clone(), src[2].mlp.up_proj.weight.clone()
    model.train()
    ctx = model.build_context(ids, mask)  # with autograd: the backbone trains
    assert ctx.keys[0].requires_grad
    loss = model.training_loss(torch.randn(2, 4, 4, 4), ctx, null)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(src[2].self_attn.q_proj.weight, before_q)   # shared projections train
    assert not torch.equal(src[2].mlp.up_proj.weight, before_mlp)      # understanding MLP trains via the context
    with torch.no_grad():
        v = model.velocity(torch.randn(2, 4, 4, 4), torch.tensor([0.5, 0.5]), ctx)
    assert v.shape == (2, 4, 4, 4) and torch.isfinite(v).all()


@pytest.mark.parametrize("variant", ["vanilla_couple", "vanilla_blend"])
def test_vanilla_variants_have_one_group_of_all_layers_and_no_gates(tiny, variant):
    model, ctx, _ = _setup(tiny, variant, num_groups=4, num_layers=4)
    assert len(model.groups) == 1 and len(model.groups[0].layers) == 4
    assert all(layer.gate is None for layer in model.groups[0].layers)
    shared = model.groups[0].layers[2].self_attn is text_model(model.backbone).layers[2].self_attn
    assert shared == (variant == "vanilla_blend")
    with torch.no_grad():
        v = model.velocity(torch.randn(2, 4, 4, 4), torch.tensor([0.99, 0.01]), ctx)
    assert torch.isfinite(v).all()


def test_patch_size_two(tiny):
    model = tiny.make_model(num_groups=2, latent_channels=2, grid_hw=(2, 2), patch_size=2)
    ids, _ = tiny.prompts([3])
    ctx = model.build_context(ids)
    with torch.no_grad():
        v = model.velocity(torch.randn(1, 2, 4, 4), torch.tensor([0.5]), ctx)
    assert v.shape == (1, 2, 4, 4)
    assert model.groups[0].input_proj.in_features == 8
