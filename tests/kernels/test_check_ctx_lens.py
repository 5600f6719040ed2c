"""``latte_kernels.check_ctx_lens``: the public check of the valid-key counts the context ops take."""
import pytest
import torch

import latte_kernels as lk


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_valid_lengths_pass_and_come_back(dtype):
    lens = torch.tensor([0, 3, 5], dtype=dtype)
    assert lk.check_ctx_lens(lens, 5) is lens


@pytest.mark.parametrize("lens, num_keys, error, words", [
    (torch.tensor([1, 6], dtype=torch.int32), 5, ValueError, ["ctx_lens", "[0, Nc=5]", "max 6"]),
    (torch.tensor([-1, 2], dtype=torch.int32), 5, ValueError, ["ctx_lens", "min -1"]),
    (torch.tensor([[1, 2]], dtype=torch.int32), 5, ValueError, ["ctx_lens", "1 dimensions"]),
    (torch.tensor([1.0, 2.0]), 5, TypeError, ["ctx_lens", "dtype"]),
    ([1, 2], 5, TypeError, ["ctx_lens", "torch.Tensor"]),
    (torch.tensor([1, 2], dtype=torch.int32), 2.0, TypeError, ["num_keys"]),
    (torch.tensor([0, 0], dtype=torch.int32), -1, ValueError, ["num_keys"]),
])
def test_bad_lengths_name_the_argument(lens, num_keys, error, words):
    with pytest.raises(error) as e:
        lk.check_ctx_lens(lens, num_keys)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_meta_tensors_are_checked_for_shape_only():
    lens = torch.empty(2, dtype=torch.int32, device="meta")  # no values to read
    assert lk.check_ctx_lens(lens, 4) is lens
    with pytest.raises(ValueError, match="ctx_lens"):
        lk.check_ctx_lens(torch.empty(2, 1, dtype=torch.int32, device="meta"), 4)
