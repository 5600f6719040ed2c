"""build_context: the backbone's KV cache, padding re-packed to the left, Context batching helpers."""
import pytest
import torch

import latte_kernels as lk
from latteflow import Context
from latteflow.core.context import build_context, text_model


def _assert_ctx_close(a, b, atol=1e-5):
    torch.testing.assert_close(a.ctx_lens, b.ctx_lens)
    assert a.max_len == b.max_len
    for ka, kb, va, vb in zip(a.keys, b.keys, a.values, b.values):
        for b_, n in enumerate(a.ctx_lens.tolist()):  # only valid keys are defined
            torch.testing.assert_close(ka[b_, :n], kb[b_, :n], atol=atol, rtol=atol)
            torch.testing.assert_close(va[b_, :n], vb[b_, :n], atol=atol, rtol=atol)


def test_left_and_right_padding_give_the_same_context_as_unpadded_rows(tiny):
    backbone = tiny.make_backbone(num_layers=2)
    lengths = [5, 9, 2]
    right = build_context(backbone, *tiny.prompts(lengths, pad="right"))
    left = build_context(backbone, *tiny.prompts(lengths, pad="left"))
    assert right.ctx_lens.dtype == torch.int32 and right.ctx_lens.tolist() == lengths
    assert right.max_len == 9 and right.num_layers == 2
    assert right.keys[0].shape == (3, 9, 2, 16)
    _assert_ctx_close(left, right, atol=0)  # same packed input: identical
    ids, mask = tiny.prompts(lengths, pad="left")
    for b, n in enumerate(lengths):  # each row alone, no padding at all
        alone = build_context(backbone, ids[b:b + 1, mask[b].bool()])
        for l in range(2):
            torch.testing.assert_close(right.keys[l][b, :n], alone.keys[l][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(right.values[l][b, :n], alone.values[l][0], atol=1e-5, rtol=1e-5)


def test_keys_are_the_m_rope_rotated_projections(tiny):
    """The cache holds k_proj(norm(embeddings)) rotated by M-RoPE, exactly what lk.mrope computes."""
    backbone = tiny.make_backbone(num_layers=1)
    ids, _ = tiny.prompts([6])
    ctx = build_context(backbone, ids)
    tm = text_model(backbone)
    layer = tm.layers[0]
    with torch.no_grad():
        h = layer.input_layernorm(tm.embed_tokens(ids))
        k = layer.self_attn.k_proj(h).view(1, 6, 2, 16)
        v = layer.self_attn.v_proj(h).view(1, 6, 2, 16)
    pos = torch.arange(6).view(1, 1, 6).expand(3, 1, 6)
    torch.testing.assert_close(ctx.keys[0], lk.mrope(k, pos, mrope_section=(2, 3, 3), theta=1e6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ctx.values[0], v, atol=1e-6, rtol=1e-6)


def test_context_with_an_image_through_the_vision_tower(tiny):
    backbone = tiny.make_backbone(num_layers=2)
    # 4x4 patches, merged 2x2 -> 4 image tokens; pixel rows = patches, C*T*p*p = 3*2*2*2 = 24
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, 24)
    row = [5, tiny.VISION_START] + [tiny.IMAGE_TOKEN] * 4 + [tiny.VISION_END, 7, 8]
    n = len(row)
    ids_r = torch.zeros(1, n + 3, dtype=torch.long)
    ids_r[0, :n] = torch.tensor(row)
    mask_r = torch.zeros_like(ids_r)
    mask_r[0, :n] = 1
    ids_l, mask_l = ids_r.roll(3, dims=1), mask_r.roll(3, dims=1)
    right = build_context(backbone, ids_r, mask_r, pixel_values=pixels, image_grid_thw=grid)
    left = build_context(backbone, ids_l, mask_l, pixel_values=pixels, image_grid_thw=grid)
    plain = build_context(backbone, torch.tensor([row]), pixel_values=pixels, image_grid_thw=grid)
    text_only = build_context(backbone, torch.tensor([row]))
    assert right.ctx_lens.tolist() == [n]
    _assert_ctx_close(left, right, atol=0)
    _assert_ctx_close(plain, right)
    assert not torch.allclose(plain.keys[1], text_only.keys[1])  # the image did reach the context
    # the model's own forward (its own M-RoPE positions for the image) caches the same keys
    ids = torch.tensor([row])
    kw = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, use_cache=True)
    with torch.no_grad():
        try:
            cache = backbone.model(**kw, mm_token_type_ids=(ids == tiny.IMAGE_TOKEN).int()).past_key_values
        except TypeError:  # transformers without mm_token_type_ids
            cache = backbone.model(**kw).past_key_values
    from latteflow.core.context import _cache_kv
    for l in range(2):
        torch.testing.assert_close(plain.keys[l], _cache_kv(cache, l)[0].transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_build_context_rejects_bad_input(tiny):
    backbone = tiny.make_backbone(num_layers=1)
    ids, mask = tiny.prompts([3, 4])
    with pytest.raises(ValueError, match="attention_mask"):
        build_context(backbone, ids, mask[:, :2])
    mask[0] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        build_context(backbone, ids, mask)
    with pytest.raises(TypeError, match="input_ids"):
        build_context(backbone, ids.float())
    with pytest.raises(ValueError, match="pixel_values"):
        build_context(backbone, ids, pixel_values=torch.randn(16, 24))


def _ctx(lengths, nc, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ks = tuple(torch.randn(len(lengths), nc, 2, 8, generator=g) for _ in range(layers))
    vs = tuple(torch.randn(len(lengths), nc, 2, 8, generator=g) for _ in range(layers))
    return Context(ks, vs, torch.tensor(lengths, dtype=torch.int32))


def test_cat_pads_to_the_longest_and_keeps_rows():
    a, b = _ctx([3, 5], 5), _ctx([7], 7, seed=1)
    c = Context.cat([a, b])
    assert c.batch_size == 3 and c.max_len == 7 and c.ctx_lens.tolist() == [3, 5, 7]
    torch.testing.assert_close(c.keys[1][:2, :5], a.keys[1])
    assert torch.count_nonzero(c.keys[1][:2, 5:]) == 0
    torch.testing.assert_close(c.values[0][2], b.values[0][0])


def test_repeat_expand_where_and_select():
    a = _ctx([3, 5], 5)
    r = a.repeat(3)
    assert r.ctx_lens.tolist() == [3, 3, 3, 5, 5, 5]
    torch.testing.assert_close(r.keys[0][4], a.keys[0][1])
    null = _ctx([2], 2, seed=2)
    assert null.expand_to(4).batch_size == 4
    with pytest.raises(ValueError, match="rows"):
        a.expand_to(3)
    mixed = a.where(torch.tensor([True, False]), null)
    assert mixed.ctx_lens.tolist() == [2, 5]
    torch.testing.assert_close(mixed.keys[1][0, :2], null.keys[1][0])
    torch.testing.assert_close(mixed.keys[1][1], a.keys[1][1])
    s = a.index_select(torch.tensor([1]))
    assert s.ctx_lens.tolist() == [5]
    with pytest.raises(ValueError, match="ctx_lens"):
        Context(a.keys, a.values, a.ctx_lens.long())


def test_build_context_reads_the_cache_without_deprecation_warnings(tiny, monkeypatch):
    """transformers 5.2x renamed the output's ``past_key_values`` to ``cache`` (warning on the old name);
    5.17 only has ``past_key_values``: build_context reads whichever the output has, silently."""
    import logging

    said = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, *a, **k: said.append(a), raising=False)
    real_warning = logging.Logger.warning
    monkeypatch.setattr(logging.Logger, "warning", lambda self, *a, **k: (said.append(a), real_warning(self, *a, **k)))
    backbone = tiny.make_backbone(num_layers=2)
    ids, mask = tiny.prompts([3, 5])
    ctx = build_context(backbone, ids, mask)
    assert ctx.num_layers == 2 and said == []
