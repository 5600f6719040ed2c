"""Prompts through a pretrained backbone's own tokenizer (SPEC 3.2): chat turn, null prompt, padding."""
import pytest
import torch

from latteflow.text.prompts import ChatPromptTokenizer


def test_null_prompt_yields_tokens_through_the_chat_template(toy_qwen2vl_folder):
    tok = ChatPromptTokenizer.from_pretrained(toy_qwen2vl_folder)
    assert tok.uses_chat_template
    raw = tok.tokenizer("", add_special_tokens=True)["input_ids"]
    assert raw == []  # no BOS: a bare empty prompt is nothing
    ids, mask = tok.encode([""])
    assert mask.sum() > 0
    text = tok.decode(ids[0][mask[0].bool()], skip_special_tokens=False)
    assert text == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"


def test_encode_right_pads_and_keeps_each_prompt_intact(toy_qwen2vl_folder):
    tok = ChatPromptTokenizer.from_pretrained(toy_qwen2vl_folder)
    ids, mask = tok.encode(["tench", "a photo of a great white shark", ""])
    assert ids.dtype == torch.long and ids.shape == mask.shape and ids.shape[0] == 3
    for b, p in enumerate(["tench", "a photo of a great white shark", ""]):
        n = int(mask[b].sum())
        assert mask[b, :n].all() and not mask[b, n:].any()
        assert ids[b, :n].tolist() == tok.encode_one(p)
        assert (ids[b, n:] == tok.pad_token_id).all()
    assert "great white shark" in tok.decode(ids[1])
    left, lmask = tok.encode(["tench", "a photo of a dog"], padding_side="left")
    assert lmask[0, -1] == 1 and lmask[0, 0] == 0


def test_build_context_accepts_the_null_prompt(toy_qwen2vl_folder):
    import toy_backbone
    from latteflow import LatteFlowConfig, LatteFlowModel

    tok = ChatPromptTokenizer.from_pretrained(toy_qwen2vl_folder)
    model = LatteFlowModel(toy_backbone.load_toy(toy_qwen2vl_folder),
                           LatteFlowConfig(variant="couple", num_groups=2, latent_channels=4, grid_hw=(2, 2),
                                           backend="reference", timestep_dim=32))
    ctx = model.build_context(*tok.encode(["", "tench"]))
    assert ctx.ctx_lens.tolist() == tok.encode(["", "tench"])[1].sum(1).tolist()


def test_bad_input_is_refused(toy_qwen2vl_folder, tmp_path):
    tok = ChatPromptTokenizer.from_pretrained(toy_qwen2vl_folder)
    with pytest.raises(TypeError, match="texts\\[1\\]"):
        tok.encode(["a", 3])
    with pytest.raises(ValueError, match="at least one"):
        tok.encode([])
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode(["a"], padding_side="middle")
    with pytest.raises(ValueError, match=str(tmp_path)):
        ChatPromptTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        ChatPromptTokenizer.from_pretrained(tmp_path / "missing")
