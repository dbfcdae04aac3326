"""Tests for the batched augmentation transforms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatminima.data import Augmentation, cutout, horizontal_flip, normalize, random_crop, to_float


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(b: int = 64, c: int = 3, h: int = 8, w: int = 10) -> torch.Tensor:
    """Strictly positive, all-distinct values, so zero padding and shifts are recognisable."""
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).reshape(b, c, h, w)


def _shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Content moved down by dy and right by dx, zero fill (what a crop at offset (p - dy, p - dx) gives)."""
    h, w = image.shape[-2:]
    p = max(abs(dy), abs(dx))
    padded = F.pad(image, (p, p, p, p))
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


# ---------------------------------------------------------------- random crop


@pytest.mark.parametrize("padding", [1, 2, 4])
def test_random_crop_is_a_shift_by_at_most_padding(padding):
    x = _batch()
    out = random_crop(x, padding, _gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = []
    for i in range(x.shape[0]):  # brute-force the shift of each image (test only; the transform is vectorised)
        found = [
            (dy, dx)
            for dy in range(-padding, padding + 1)
            for dx in range(-padding, padding + 1)
            if torch.equal(out[i], _shift(x[i], dy, dx))
        ]
        assert len(found) == 1, f"image {i} is not a zero-filled shift of at most {padding}"
        shifts.append(found[0])
    # offsets differ per image and cover the whole range
    assert {dy for dy, _ in shifts} == set(range(-padding, padding + 1))
    assert {dx for _, dx in shifts} == set(range(-padding, padding + 1))


def test_random_crop_zero_offset_preserves_image_and_centre_always_kept():
    x = _batch(b=300, h=6, w=6)
    p = 1
    out = random_crop(x, p, _gen(2))
    unchanged = (out == x).flatten(1).all(dim=1)
    assert int(unchanged.sum()) > 10  # offset (p, p) has probability 1/9: those images come back untouched
    # whatever the offset, the centre (rows/cols p..H-p-1) of the input is still visible somewhere in the output
    centre = x[:, :, p:-p, p:-p]
    for i in range(0, 300, 7):
        windows = out[i].unfold(1, 4, 1).unfold(2, 4, 1)  # all 4x4 windows [C, 3, 3, 4, 4]
        assert (windows == centre[i][:, None, None]).flatten(3).all(dim=3).all(dim=0).any()


def test_random_crop_zero_padding_identity_and_reproducible():
    x = _batch(b=8)
    assert torch.equal(random_crop(x, 0, _gen()), x)
    a, b = random_crop(x, 3, _gen(5)), random_crop(x, 3, _gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, random_crop(x, 3, _gen(6)))
    with pytest.raises(ValueError, match="padding"):
        random_crop(x, -1, _gen())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_crop(x[0], 1, _gen())


def test_random_crop_works_on_uint8():
    x = (_batch(b=4) % 250 + 1).to(torch.uint8)
    out = random_crop(x, 2, _gen(3))
    assert out.dtype == torch.uint8
    # exact: the crop is a gather (zero fill included) and to_float divides each element on its own, so they commute
    assert torch.equal(to_float(out), random_crop(to_float(x), 2, _gen(3)))


# ---------------------------------------------------------------- horizontal flip


def test_flip_twice_is_identity_and_p_extremes():
    x = _batch(b=16)
    assert torch.equal(horizontal_flip(horizontal_flip(x, _gen(), p=1.0), _gen(), p=1.0), x)
    # the same seed flips the same images, so applying it twice undoes it
    assert torch.equal(horizontal_flip(horizontal_flip(x, _gen(4)), _gen(4)), x)
    assert torch.equal(horizontal_flip(x, _gen(), p=1.0), x.flip(-1))
    assert torch.equal(horizontal_flip(x, _gen(), p=0.0), x)


def test_flip_per_image_and_reproducible():
    x = _batch(b=200, h=2, w=3)
    out = horizontal_flip(x, _gen(2))
    flipped = (out == x.flip(-1)).flatten(1).all(dim=1)
    kept = (out == x).flatten(1).all(dim=1)
    assert (flipped ^ kept).all()
    assert 60 < int(flipped.sum()) < 140
    assert torch.equal(out, horizontal_flip(x, _gen(2)))
    with pytest.raises(ValueError, match="p must"):
        horizontal_flip(x, _gen(), p=1.5)


# ---------------------------------------------------------------- cutout


@pytest.mark.parametrize("size", [3, 4])
def test_cutout_zeroes_a_clipped_square(size):
    x = torch.ones(300, 2, 12, 12)
    out = cutout(x, size, _gen(7))
    interior = 0
    for i in range(x.shape[0]):
        zero = out[i] == 0
        assert torch.equal(zero[0], zero[1])  # the same square on every channel
        rows = torch.nonzero(zero[0].any(dim=1)).flatten()
        cols = torch.nonzero(zero[0].any(dim=0)).flatten()
        assert len(rows) > 0 and len(cols) > 0  # the centre is always inside, so something is erased
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(zero[0].sum()) == h * w and h <= size and w <= size  # a solid (clipped) rectangle
        touches = rows[0] == 0 or rows[-1] == 11 or cols[0] == 0 or cols[-1] == 11
        if not touches:
            interior += 1
            assert int(zero[0].sum()) == size * size  # away from the borders: exactly size x size
        assert (out[i][~zero] == 1).all()
    assert interior > 100


def test_cutout_reproducible_and_size_zero():
    x = _batch(b=10)
    assert torch.equal(cutout(x, 4, _gen(1)), cutout(x, 4, _gen(1)))
    assert not torch.equal(cutout(x, 4, _gen(1)), cutout(x, 4, _gen(2)))
    assert torch.equal(cutout(x, 0, _gen()), x)
    with pytest.raises(ValueError, match="size"):
        cutout(x, -2, _gen())


# ---------------------------------------------------------------- normalize


def test_normalize_per_channel_and_broadcast():
    x = torch.rand(5, 3, 4, 4, generator=_gen())
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = normalize(x, mean, std)
    for c in range(3):
        assert torch.allclose(out[:, c], (x[:, c] - mean[c]) / std[c])
    patches = torch.randn(4, 2, 7, generator=_gen())
    assert torch.equal(normalize(patches, (0.0,), (1.0,)), patches)  # (x - 0) / 1 is x exactly
    with pytest.raises(ValueError, match="entries"):
        normalize(x, (0.1, 0.2), (1.0, 1.0))
    with pytest.raises(ValueError, match="to_float"):
        normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), mean, std)
    with pytest.raises(ValueError, match="std"):
        normalize(x, mean, (1.0, 0.0, 1.0))


# ---------------------------------------------------------------- Augmentation


def test_augmentation_composes_in_order_and_is_reproducible():
    x = _batch(b=12)
    aug = Augmentation(crop_padding=2, flip=True, cutout=3)
    g = _gen(9)
    manual = cutout(horizontal_flip(random_crop(x, 2, g), g), 3, g)
    assert torch.equal(aug(x, _gen(9)), manual)
    assert torch.equal(aug(x, _gen(9)), aug(x, _gen(9)))
    assert torch.equal(Augmentation()(x, _gen()), x)
    with pytest.raises(ValueError, match="crop_padding"):
        Augmentation(crop_padding=-1)
