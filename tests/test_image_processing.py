"""Image preprocessing equals PIL bicubic squash-resize + ToTensor + CLIP Normalize."""

import numpy as np
import pytest
from PIL import Image

from cogvlm_jax.image_processing import (CLIP_MEAN, CLIP_STD, load_image, normalize_image,
                                         preprocess_image, resize_image)


def _photo(h=37, w=53, seed=0):
  """A non-square random RGB image (squash resize must not keep the aspect ratio)."""
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def test_resize_is_pil_bicubic_squash():
  img = _photo()
  out = resize_image(img, 24)
  assert out.shape == (24, 24, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.asarray(img.resize((24, 24), Image.BICUBIC)))


def test_preprocess_by_hand():
  img = _photo()
  want = np.asarray(img.resize((16, 16), Image.BICUBIC)).astype(np.float32) / 255.0
  want = (want - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
  got = preprocess_image(img, 16)
  assert got.shape == (16, 16, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_white_and_black_pixels():
  white = normalize_image(np.full((1, 1, 3), 255, np.uint8))[0, 0]
  np.testing.assert_allclose(white, (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), atol=1e-6)
  black = normalize_image(np.zeros((2, 3), np.uint8)[..., None].repeat(3, -1))
  np.testing.assert_allclose(black[0, 0], -np.array(CLIP_MEAN) / np.array(CLIP_STD), atol=1e-6)


def test_normalize_batched_float_and_jax():
  x = np.random.default_rng(1).integers(0, 256, (2, 5, 4, 3), np.uint8)
  ref = normalize_image(x)
  assert ref.shape == x.shape and ref.dtype == np.float32
  np.testing.assert_array_equal(normalize_image(x.astype(np.float32)), ref)
  import jax.numpy as jnp
  got = normalize_image(jnp.asarray(x))
  assert not isinstance(got, np.ndarray) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-6)


def test_normalize_rejects_channels_first():
  with pytest.raises(ValueError, match="channels-last"):
    normalize_image(np.zeros((3, 4, 4), np.uint8))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16"])
def test_modes_convert_like_pil(mode):
  src = _photo(12, 10).convert(mode) if mode != "I;16" else Image.new("I;16", (10, 12), 300)
  got = load_image(src)
  assert got.mode == "RGB" and got.size == (10, 12)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(src.convert("RGB")))
  np.testing.assert_array_equal(preprocess_image(src, 8),
                                preprocess_image(src.convert("RGB"), 8))


def test_load_from_path_and_array(tmp_path):
  img = _photo(9, 11).convert("P")
  p = tmp_path / "img.png"
  img.save(p)
  got = load_image(str(p))
  assert got.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(got), np.asarray(img.convert("RGB")))
  arr = np.asarray(_photo(6, 7))
  np.testing.assert_array_equal(np.asarray(load_image(arr)), arr)
  np.testing.assert_array_equal(np.asarray(load_image(arr[..., 0])), np.asarray(
      Image.fromarray(arr[..., 0]).convert("RGB")))
  with pytest.raises(FileNotFoundError):
    load_image(str(tmp_path / "missing.png"))


def test_matches_torch_totensor_normalize():
  """The reference transform with ToTensor/Normalize written in plain torch (no torchvision)."""
  import torch
  img = _photo(41, 29, seed=3).convert("RGBA")
  S = 16
  pil = img.convert("RGB").resize((S, S), Image.BICUBIC)  # torchvision Resize on a PIL image
  # ToTensor: HWC uint8 -> CHW float32 / 255.
  t = torch.from_numpy(np.array(pil, copy=True)).permute(2, 0, 1).contiguous()
  t = t.to(torch.float32).div(255)
  # Normalize: (t - mean[:, None, None]) / std[:, None, None].
  mean = torch.as_tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
  std = torch.as_tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
  t = t.sub(mean).div(std)
  want = t.permute(1, 2, 0).numpy()  # back to channels-last
  got = preprocess_image(img, S)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
