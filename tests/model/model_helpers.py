"""Tiny backbones, models and prompts shared by the model tests."""
import torch

from latteflow import LatteFlowConfig, LatteFlowModel

VOCAB = 64
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 60, 61, 62, 63


def make_backbone(num_layers=4, hidden=64, heads=4, kv_heads=2, vision=False, seed=0):
    """A random Qwen2VLForConditionalGeneration; head_dim = hidden / heads (16 by default)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # (2, 3, 3) for head_dim 16
    text = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vis = dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=2,
               spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    try:  # transformers >= 5: rope_parameters
        cfg = Qwen2VLConfig(text_config=dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                     "mrope_section": section}),
                            vision_config=vis, **ids)
        assert cfg.text_config.rope_parameters["mrope_section"] == section
    except (TypeError, AssertionError, KeyError, AttributeError):  # older: rope_scaling
        cfg = Qwen2VLConfig(text_config=dict(text, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": section}),
                            vision_config=vis, **ids)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def make_model(variant="couple", num_groups=2, num_layers=4, backend="reference", seed=0, randomize=True, **kw):
    """A LatteFlowModel on a tiny backbone; ``randomize`` gives the zero-initialised output heads and
    gates random values so every path influences the velocity."""
    kw.setdefault("latent_channels", 4)
    kw.setdefault("grid_hw", (4, 4))
    cfg = LatteFlowConfig(variant=variant, num_groups=num_groups, backend=backend, **kw)
    model = LatteFlowModel(make_backbone(num_layers=num_layers, seed=seed), cfg)
    if randomize:
        randomize_zero_inits(model, seed)
    return model


def randomize_zero_inits(model, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for group in model.groups:
            group.proj_out.weight.copy_(torch.randn(group.proj_out.weight.shape, generator=g) * 0.05)
            for layer in group.layers:
                if layer.gate is not None:
                    layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=g) * 0.1)


def prompts(lengths, pad="right", seed=0):
    """input_ids (B, max(lengths)) and attention_mask with each row's tokens left- or right-aligned."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        toks = torch.randint(3, 50, (length,), generator=g)
        sl = slice(0, length) if pad == "right" else slice(n - length, n)
        ids[b, sl] = toks
        mask[b, sl] = 1
    return ids, mask


def params_of(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}
