"""The digits data: shapes, range, a deterministic stratified split, prompts, the batch iterator."""
import pytest
import torch

from latteflow.data.digits import (DIGIT_PROMPTS, GRID_HW, IMAGE_SHAPE, iterate_batches, label_from_prompt,
                            load_digits_split, prompts_for)


def test_shapes_range_and_split():
    s = load_digits_split(0)
    n_train, n_test = len(s.train_labels), len(s.test_labels)
    assert n_train + n_test == 1797 and n_test == 360
    assert s.train_images.shape == (n_train, *IMAGE_SHAPE) and s.test_images.shape == (n_test, *IMAGE_SHAPE)
    assert s.train_images.dtype == torch.float32 and s.train_labels.dtype == torch.int64
    for x in (s.train_images, s.test_images):
        assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert GRID_HW[0] * GRID_HW[1] == 64
    # stratified: every class holds about a fifth of its images out
    for d in range(10):
        frac = (s.test_labels == d).sum().item() / ((s.test_labels == d).sum() + (s.train_labels == d).sum()).item()
        assert 0.17 < frac < 0.23
    # disjoint: no held-out image is a training image (the dataset has no exact duplicates across the split)
    train_set = {tuple(r.tolist()) for r in s.train_images.flatten(1)}
    assert sum(tuple(r.tolist()) in train_set for r in s.test_images.flatten(1)) == 0


def test_split_is_deterministic_and_seeded():
    a, b, c = load_digits_split(0), load_digits_split(0), load_digits_split(1)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.test_images, c.test_images)
    a.train_images.zero_()  # copies: mutating one split leaves the next call untouched
    assert load_digits_split(0).train_images.abs().sum() > 0


def test_prompts():
    assert DIGIT_PROMPTS[3] == "digit 3" and len(DIGIT_PROMPTS) == 10
    assert prompts_for(torch.tensor([0, 9])) == ["digit 0", "digit 9"]
    assert [label_from_prompt(p) for p in DIGIT_PROMPTS] == list(range(10))
    with pytest.raises(ValueError, match="labels"):
        prompts_for([3, 10])
    with pytest.raises(ValueError, match="prompt"):
        label_from_prompt("digit 12")


def test_batches_are_endless_shuffled_epochs():
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
    y = torch.arange(10)
    it = iterate_batches(x, y, 4, generator=torch.Generator().manual_seed(3))
    batches = [next(it) for _ in range(5)]  # 20 rows = exactly two epochs
    rows = torch.cat([b[1] for b in batches])
    assert all(b[0].shape == (4, 1, 1, 1) for b in batches)
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert rows[:10].tolist() != rows[10:].tolist()  # reshuffled each epoch
    assert all(torch.equal(b[0].view(-1).long(), b[1]) for b in batches)  # images stay with their labels
    again = iterate_batches(x, y, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([next(again)[1] for _ in range(5)]), rows)
    other = iterate_batches(x, y, 4, seed=4)
    assert not torch.equal(torch.cat([next(other)[1] for _ in range(5)]), rows)
    big = next(iterate_batches(x, y, 25))
    assert big[1].shape == (25,)


def test_batch_arguments():
    x, y = torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(x, y, 0)
    with pytest.raises(ValueError, match="labels"):
        iterate_batches(x, y[:4], 2)
    with pytest.raises(TypeError, match="generator"):
        iterate_batches(x, y, 2, generator=3)
    with pytest.raises(ValueError, match="seed"):
        load_digits_split(-1)
