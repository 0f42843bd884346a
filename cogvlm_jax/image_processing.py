"""Image preprocessing identical to the original CogVLM/CogVLM2 builder.

The reference runs torchvision ``Compose([Resize((S, S), BICUBIC), ToTensor(),
Normalize(CLIP_MEAN, CLIP_STD)])`` on a PIL RGB image. On a PIL image torchvision's Resize is
PIL's own ``Image.resize`` (which antialiases), so doing that resize with PIL here gives the
same uint8 pixels; ToTensor + Normalize are then plain float32 arithmetic.

Layout differs on purpose: images here are channels-last, [S, S, 3] (NHWC when batched),
which is what the JAX patch embedding consumes; the reference is channels-first [3, S, S].

The split into `resize_image` (host, uint8) and `normalize_image` (numpy or jax) lets a data
pipeline ship uint8 images (4x smaller) and normalise on device.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image

# OpenAI CLIP statistics, as in the reference `transforms.Normalize`.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_image(image: ImageLike) -> Image.Image:
  """Returns a PIL RGB image from a path, a PIL image, or a uint8 [H, W(, C)] array.

  Any mode (L, P, RGBA, CMYK, ...) is converted with PIL's ``.convert('RGB')``, as the
  reference demos do: alpha is dropped (not composited) and no EXIF rotation is applied.
  """
  if isinstance(image, (str, os.PathLike)):
    if not os.path.exists(image):
      raise FileNotFoundError(f"image file not found: {os.fspath(image)}")
    with Image.open(image) as im:
      return im.convert("RGB")  # convert() loads the pixels, so the file can be closed
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  if not isinstance(image, Image.Image):
    raise TypeError(f"expected a path, PIL image or numpy array, got {type(image).__name__}")
  return image if image.mode == "RGB" else image.convert("RGB")


def resize_image(image: ImageLike, image_size: int) -> np.ndarray:
  """Squash-resizes to (S, S) with PIL BICUBIC; returns uint8 [S, S, 3].

  Aspect ratio is not kept and nothing is cropped — what torchvision
  ``Resize((S, S), interpolation=BICUBIC)`` does to a PIL image.
  """
  pil = load_image(image)
  resized = pil.resize((image_size, image_size), resample=Image.BICUBIC)
  return np.asarray(resized, dtype=np.uint8)


def normalize_image(pixels):
  """(pixels / 255 - mean) / std per channel, float32; [..., H, W, 3] in, same shape out.

  Works on numpy and jax arrays (returns the same kind), so it can run on device. Float
  inputs are taken to be on the 0..255 scale like uint8 ones. The operation order and float32
  constants match torch's ``ToTensor`` (``div(255)``) then ``Normalize`` (``sub(mean)
  .div(std)``), so on numpy the result is bit-identical to the reference.
  """
  if isinstance(pixels, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp  # only needed for device arrays; keeps numpy callers jax-free
  if pixels.shape[-1] != 3:
    raise ValueError(f"expected channels-last [..., H, W, 3] pixels, got shape {pixels.shape}")
  mean = xp.asarray(CLIP_MEAN, dtype=xp.float32)
  std = xp.asarray(CLIP_STD, dtype=xp.float32)
  x = pixels.astype(xp.float32) / xp.float32(255.0)
  return (x - mean) / std


def preprocess_image(image: ImageLike, image_size: int) -> np.ndarray:
  """load → resize → normalize: float32 [S, S, 3] ready for the vision tower."""
  return normalize_image(resize_image(image, image_size))
