"""Decoding image bytes from the wild without ever raising: `decode_image`.

Web-scale data holds corrupt files, truncated downloads, HTML error pages saved as .jpg,
decompression bombs and every colour mode. The pipeline needs one answer per sample —
an RGB image, or a reason it has none (it then masks the image and counts the reason) —
so `decode_image` returns (image, None) or (None, error) and never raises for bad data.

Decisions (documented here because they change pixels):
* Modes: L, P, CMYK, YCbCr, LAB, I;16 ... all become RGB. 16-bit images are scaled to 8 bit
  (PIL's convert would clip them to white). CMYK uses PIL's conversion.
* Alpha (RGBA, LA, PA, P with a transparent colour) is composited on WHITE by default
  (`alpha="white"`), as img2dataset does when it re-encodes LAION images: a transparent logo
  then looks as it does on a web page, rather than showing whatever colour the transparent
  pixels happen to store (often black). `alpha="drop"` instead does what
  ``Image.convert("RGB")`` does — and what the reference CogVLM demos and
  `cogvlm_jax.image_processing.load_image` do at inference.
* EXIF orientation is NOT applied: the original CogVLM pipeline does not apply it either
  (it opens images with PIL and converts them), so training sees what inference sees.
* Animated images (GIF, WebP): the first frame.
* Size limit: images with more than `max_pixels` pixels are rejected from their header,
  before any pixel is decoded ("image too large"). PIL's own global limit
  (``Image.MAX_IMAGE_PIXELS``, a DecompressionBombError at twice it) is left as it is — it is
  process-wide, so changing it per call would race other threads — and its error is reported
  as "image too large" too.
* Truncated files are errors (PIL's LOAD_TRUNCATED_IMAGES stays off): a half-grey image
  with a full caption is a worse training sample than a masked one.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_image(image_bytes: Optional[bytes], *, max_pixels: int,
                 alpha: str = "white") -> tuple[Optional[Image.Image], Optional[str]]:
  """Bytes -> (PIL RGB image, None), or (None, a short error string). Never raises for data.

  `max_pixels`: the largest width * height accepted. `alpha`: "white" (composite on white)
  or "drop" (discard the alpha channel); see the module docstring.
  """
  if alpha not in ("white", "drop"):
    raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")  # a caller bug
  if not image_bytes:
    return None, "no image bytes"
  try:
    im = Image.open(io.BytesIO(image_bytes))  # reads the header only
  except Image.DecompressionBombError as e:
    return None, f"image too large ({e})"
  except Image.UnidentifiedImageError:
    # The first bytes tell an HTML error page or an empty placeholder from a real format.
    return None, f"cannot identify image: unknown format (starts {bytes(image_bytes[:12])!r})"
  except Exception as e:  # noqa: BLE001  (a damaged header: SyntaxError, struct.error, ...)
    return None, f"cannot identify image: {_describe(e)}"
  try:
    width, height = im.size
    if width <= 0 or height <= 0:
      return None, f"image has an empty size {width}x{height}"
    if width * height > max_pixels:
      return None, (f"image too large: {width}x{height} = {width * height} pixels > "
                    f"max_pixels={max_pixels}")
    im.load()
    return to_rgb(im, alpha), None
  except Image.DecompressionBombError as e:
    return None, f"image too large ({e})"
  except Exception as e:  # noqa: BLE001  (truncated / corrupt data: OSError, EOFError, ...)
    return None, f"cannot decode image ({im.format or 'unknown format'}): {_describe(e)}"
  finally:
    im.close()


def _describe(e: Exception) -> str:
  return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def to_rgb(im: Image.Image, alpha: str) -> Image.Image:
  """Any mode -> a new RGB image (not tied to the source file)."""
  mode = im.mode
  if mode in _SIXTEEN_BIT_MODES:
    # convert() would clip 16-bit values to 0..255 (a white image); scale them instead.
    a = np.asarray(im, dtype=np.float64)
    a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  if mode == "F":
    a = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  has_alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info) or (
      mode in ("L", "RGB") and "transparency" in im.info)
  if has_alpha and alpha == "white":
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if mode == "RGB":
    return im.copy()
  return im.convert("RGB")
