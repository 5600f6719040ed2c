"""The character tokenizer: ids, padding sides, errors, and its JSON file."""
import json

import pytest
import torch

from latteflow.text.tokenizer import DEFAULT_ALPHABET, SPECIAL_TOKENS, CharTokenizer


def test_vocab_covers_the_alphabet_after_the_special_ids():
    tok = CharTokenizer()
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(DEFAULT_ALPHABET) == len(tok)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?'-":
        assert ch in DEFAULT_ALPHABET
    ids = tok.encode_one(DEFAULT_ALPHABET)
    body = ids[1:-1]
    assert body == list(range(len(SPECIAL_TOKENS), tok.vocab_size))
    special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.vision_start_token_id,
               tok.vision_end_token_id, tok.image_token_id, tok.video_token_id}
    assert special == set(range(len(SPECIAL_TOKENS)))


@pytest.mark.parametrize("text", ["digit 3", "a cat, on a mat!", "", "0123456789", "(x) - 'y'/\"z\""])
def test_round_trip(text):
    tok = CharTokenizer()
    ids, mask = tok.encode([text])
    assert ids[0, 0].item() == tok.bos_token_id and ids[0, -1].item() == tok.eos_token_id
    assert tok.decode(ids[0]) == text
    assert tok.batch_decode(ids) == [text]


def test_null_prompt_is_short_but_not_empty():
    ids, mask = CharTokenizer().encode([""])
    assert ids.tolist() == [[1, 2]] and mask.tolist() == [[1, 1]]
    ids, mask = CharTokenizer(add_eos=False).encode("")
    assert ids.tolist() == [[1]] and mask.tolist() == [[1]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_sides(side):
    tok = CharTokenizer(padding_side=side)
    texts = ["digit 7", "", "digit 10"]
    ids, mask = tok.encode(texts)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    lengths = [len(t) + 2 for t in texts]
    assert ids.shape == mask.shape == (3, max(lengths))
    assert mask.sum(1).tolist() == lengths
    for b, n in enumerate(lengths):
        valid = slice(0, n) if side == "right" else slice(ids.shape[1] - n, ids.shape[1])
        assert mask[b, valid].all()
        assert ids[b, valid].tolist() == tok.encode_one(texts[b])
        assert (ids[b][mask[b] == 0] == tok.pad_token_id).all()
    # the per-call argument overrides the tokenizer's default
    other = "left" if side == "right" else "right"
    ids2, mask2 = tok.encode(texts, padding_side=other)
    assert not torch.equal(mask, mask2) and mask2.sum(1).tolist() == lengths


def test_single_string_is_a_batch_of_one():
    tok = CharTokenizer()
    a, _ = tok.encode("digit 1")
    b, _ = tok(["digit 1"])
    assert a.shape == (1, 9) and torch.equal(a, b)


def test_unknown_character_names_it_and_the_prompt():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"'D'.*'Digit 3'"):
        tok.encode(["digit 1", "Digit 3"])
    with pytest.raises(ValueError, match="'é'"):
        tok.encode("café")


def test_bad_arguments():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="texts"):
        tok.encode([])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.encode(["a", 3])
    with pytest.raises(TypeError, match="texts"):
        tok.encode(5)
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode("a", padding_side="middle")
    with pytest.raises(ValueError, match="padding_side"):
        CharTokenizer(padding_side="up")
    with pytest.raises(ValueError, match="alphabet"):
        CharTokenizer("abca")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([tok.vocab_size])


def test_save_load(tmp_path):
    tok = CharTokenizer("xyz 0123", padding_side="left", add_eos=False)
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    assert json.loads(path.read_text())["alphabet"] == "xyz 0123"
    loaded = CharTokenizer.load(tmp_path)
    assert loaded == tok and loaded != CharTokenizer()
    assert torch.equal(loaded.encode(["x 1", "zz"])[0], tok.encode(["x 1", "zz"])[0])
    assert CharTokenizer.load(tok.save(tmp_path / "sub" / "tok.json")) == tok
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="format"):
        CharTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="path"):
        CharTokenizer.load(tmp_path / "missing.json")
