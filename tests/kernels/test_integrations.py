"""apply_to_qwen2_vl: a tiny random transformers Qwen2-VL gives the same logits, generations and
gradients after patching, and its attention really rotates through lk.mrope."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf  # noqa: E402

from latte_kernels.integrations import apply_to_qwen2_vl  # noqa: E402
from latte_kernels.integrations import qwen2_vl as integration  # noqa: E402

VOCAB = 128


def tiny_config():
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=1,
                  temporal_patch_size=1, in_channels=3)
    return Qwen2VLConfig(text_config=text, vision_config=vision, vocab_size=VOCAB, image_token_id=120, video_token_id=121,
                         vision_start_token_id=122, vision_end_token_id=123, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    original = Qwen2VLForConditionalGeneration(tiny_config()).eval()
    assert original.config.text_config.hidden_size // original.config.text_config.num_attention_heads == 16
    patched = apply_to_qwen2_vl(copy.deepcopy(original))
    return original, patched


@pytest.fixture
def count_mrope(monkeypatch):
    calls = []
    real = integration.mrope

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "mrope", counting)
    return calls


def test_same_logits_on_a_text_prompt(models, count_mrope):
    original, patched = models
    ids = torch.randint(3, 100, (2, 13))
    with torch.no_grad():
        want = original(input_ids=ids).logits
        got = patched(input_ids=ids).logits
    assert len(count_mrope) == 2 * 2  # q and k in each of the 2 layers
    assert count_mrope[0] == (2, 13, 4, 16) and count_mrope[1] == (2, 13, 2, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_same_logits_with_distinct_3d_positions(models):
    """Text prompts give equal t/h/w positions, which would hide a section mix-up: use distinct ones."""
    original, patched = models
    ids = torch.randint(3, 100, (1, 11))
    n = torch.arange(11)
    position_ids = torch.stack([n, 2 * n + 5, 3 * n + 1])[:, None, :]  # (3, 1, N)
    with torch.no_grad():
        want = original(input_ids=ids, position_ids=position_ids).logits
        got = patched(input_ids=ids, position_ids=position_ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the positions matter: the same ids at other positions give other logits
    with torch.no_grad():
        other = patched(input_ids=ids).logits
    assert (other - got).abs().max() > 1e-3


def test_generate_is_unchanged(models, count_mrope):
    original, patched = models
    ids = torch.randint(3, 100, (2, 7))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = original.generate(ids, **kw)
    got = patched.generate(ids, **kw)
    assert torch.equal(got, want)
    assert any(shape[1] == 1 for shape in count_mrope)  # the cached decode steps went through mrope too


def test_gradients_are_unchanged(models):
    original, patched = models
    ids = torch.randint(3, 100, (1, 9))
    grads = []
    for model in (original, patched):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone())
        model.zero_grad()
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


def test_patch_is_idempotent_and_leaves_unpatched_models_alone(models):
    original, patched = models
    assert isinstance(patched.model.language_model.rotary_emb, integration.MRopePositions)
    assert isinstance(original.model.language_model.rotary_emb, hf.Qwen2VLRotaryEmbedding)
    assert apply_to_qwen2_vl(patched) is patched
    dispatch = hf.apply_rotary_pos_emb
    assert dispatch.latte_original.__name__ == "apply_rotary_pos_emb"
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    cos, sin = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    for a, b in zip(dispatch(q, k, cos, sin), dispatch.latte_original(q, k, cos, sin)):
        assert torch.equal(a, b)


def test_refuses_what_it_cannot_reproduce():
    with pytest.raises(TypeError, match="Qwen2VLRotaryEmbedding"):
        apply_to_qwen2_vl(torch.nn.Linear(2, 2))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(tiny_config())
    model.model.language_model.rotary_emb.inv_freq.mul_(0.5)  # a scaled RoPE
    with pytest.raises(ValueError, match="inv_freq"):
        apply_to_qwen2_vl(model)
    assert isinstance(model.model.language_model.rotary_emb, hf.Qwen2VLRotaryEmbedding)  # nothing changed
