"""Backbone configs and seeded random-weight Qwen2-VL backbones working on the tokenizer's ids."""
import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from latteflow.text.backbones import (build_backbone, paper_qwen2vl_config, rope_settings, text_config,
                                 text_position_ids, tiny_qwen2vl_config)
from latteflow.text.tokenizer import CharTokenizer


def test_tiny_config_shapes_follow_the_tokenizer():
    tok = CharTokenizer()
    cfg = tiny_qwen2vl_config(tok)
    tc = text_config(cfg)
    assert tc.vocab_size == tok.vocab_size
    assert (tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.intermediate_size) == (128, 4, 2, 256)
    assert tc.num_hidden_layers in (4, 8) and tc.hidden_size // tc.num_attention_heads == 32
    assert tc.rms_norm_eps == 1e-6
    assert rope_settings(cfg) == (1e6, (4, 6, 6))
    assert (tc.bos_token_id, tc.eos_token_id, tc.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert cfg.image_token_id == tok.image_token_id < tok.vocab_size
    small = tiny_qwen2vl_config(tok, num_hidden_layers=4, hidden_size=64, num_attention_heads=2,
                                num_key_value_heads=1, mrope_section=[4, 6, 6])
    assert text_config(small).num_hidden_layers == 4 and text_config(small).hidden_size == 64


def test_paper_config_has_qwen2vl_2b_text_shapes():
    cfg = paper_qwen2vl_config()
    tc = text_config(cfg)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads,
            tc.intermediate_size, tc.vocab_size) == (1536, 28, 12, 2, 8960, 151936)
    assert tc.hidden_size // tc.num_attention_heads == 128 and tc.rms_norm_eps == 1e-6
    assert rope_settings(cfg) == (1e6, (16, 24, 24))
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2VLForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.model.language_model.parameters())
    assert 1.50e9 < n < 1.56e9  # Qwen2-VL-2B's language model: ~1.54B parameters
    attn = model.model.language_model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None


def test_config_arguments_are_checked():
    with pytest.raises(ValueError, match="mrope_section"):
        tiny_qwen2vl_config(mrope_section=[8, 8, 8])
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_qwen2vl_config(num_key_value_heads=3)
    with pytest.raises(TypeError, match="hidden_sise"):
        tiny_qwen2vl_config(hidden_sise=64)
    with pytest.raises(TypeError, match="tokenizer"):
        tiny_qwen2vl_config("chars")
    with pytest.raises(TypeError, match="config"):
        build_backbone({"hidden_size": 128})


def test_same_seed_same_weights():
    cfg = tiny_qwen2vl_config(num_hidden_layers=4)
    state = torch.get_rng_state()
    a, b, c = build_backbone(cfg, seed=0), build_backbone(cfg, seed=0), build_backbone(cfg, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training
    assert build_backbone(cfg, seed=0, dtype=torch.float16).model.language_model.embed_tokens.weight.dtype == torch.float16


@pytest.mark.parametrize("side", ["right", "left"])
def test_forward_on_tokenizer_output_is_independent_of_the_batch(side):
    tok = CharTokenizer(padding_side=side)
    model = build_backbone(tiny_qwen2vl_config(tok, num_hidden_layers=4), seed=0)
    prompts = ["digit 3", "", "digit 7, please"]
    ids, mask = tok.encode(prompts)
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=text_position_ids(mask), use_cache=True)
        assert out.last_hidden_state.shape == (3, ids.shape[1], 128)
        assert torch.isfinite(out.last_hidden_state).all()
        assert out.past_key_values.get_seq_length() == ids.shape[1]
        for b, p in enumerate(prompts):
            one_ids, one_mask = tok.encode([p])
            one = model.model(input_ids=one_ids, attention_mask=one_mask, use_cache=True)
            valid = mask[b].bool()
            torch.testing.assert_close(out.last_hidden_state[b][valid], one.last_hidden_state[0], atol=1e-5, rtol=1e-5)
            # the cached context keys (M-RoPE applied) are what image tokens attend to: they must not
            # depend on the batch either (cache layout (B, Hkv, L, D) as of transformers 5)
            k_batch = out.past_key_values.layers[0].keys[b][:, valid]
            torch.testing.assert_close(k_batch, one.past_key_values.layers[0].keys[0], atol=1e-5, rtol=1e-5)
        if side == "left":  # without text_position_ids, left padding shifts the rotated keys
            plain = model.model(input_ids=ids, attention_mask=mask, use_cache=True)
            k_plain = plain.past_key_values.layers[0].keys[1][:, mask[1].bool()]
            assert not torch.allclose(k_plain, out.past_key_values.layers[0].keys[1][:, mask[1].bool()], atol=1e-3)


def test_text_position_ids():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    pos = text_position_ids(mask)
    assert pos.shape == (3, 2, 4)
    assert pos[0].tolist() == [[0, 1, 2, 0], [0, 0, 0, 1]] and torch.equal(pos[0], pos[2])
