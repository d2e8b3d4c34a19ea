"""Encoded images (JPEG, PNG) decoded on the host only as far as their crop needs.

Datasets of images of varying size (ImageNet, image folders) are read as their
encoded bytes (`EncodedImage`). Their size comes from the header, before any
pixel is decoded, so the crop window of an example (`crop_window`, from its
draws) is known first. A JPEG is then decoded at the coarsest DCT scale (1/2,
1/4, 1/8, PIL's `draft`) that still gives the window at least the output's
pixels, and the window is resampled straight to the output size, without an
intermediate crop. Other formats decode whole. The windows are those of the
decoded-array path; the pixels differ from it only where a coarser DCT scale
was taken, and by rounding. An example's header is parsed once, for its window
and its decode.

PIL is kept over the other reduced-scale JPEG decoders (OpenCV's
`IMREAD_REDUCED_*`, simplejpeg's `min_height`/`min_width`), which scale the
DCT the same way through libjpeg-turbo: either is another large dependency,
and OpenCV decodes a truncated file with a warning instead of refusing it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math

import numpy as np
from PIL import Image

from cnnjax.errors import DataError

# PIL's modes for the channel counts of images.
MODES = {1: "L", 3: "RGB"}


def undecodable(reason: object) -> DataError:
  """The error of an image that cannot be decoded, whichever decoder found it (host or GPU)."""
  return DataError(f"an image of the dataset cannot be decoded ({' '.join(str(reason).split())[:120]}); prepare the "
                   "dataset again from good files")


@dataclasses.dataclass(frozen=True)
class EncodedImage:
  """An image's encoded bytes and the channels it is decoded to."""

  data: bytes
  channels: int

  def open(self) -> Image.Image:
    """The image with its header read and no pixel decoded."""
    try:
      return Image.open(io.BytesIO(self.data))
    except (OSError, ValueError) as e:
      raise undecodable(e) from None

  @functools.cached_property
  def _header(self) -> Image.Image:
    return self.open()

  def __getstate__(self) -> dict:
    # A copy or a pickle carries the bytes only: an opened header is one decode's, and holds its pixels.
    return {key: value for key, value in self.__dict__.items() if key != "_header"}

  def take_opened(self) -> Image.Image:
    """The image opened to read its size, handed to one decode (decoding consumes it), else opened anew:
    an example's crop window and its decode parse the header once between them."""
    opened = self.__dict__.pop("_header", None)
    return opened if opened is not None else self.open()

  @property
  def size(self) -> tuple[int, int]:
    """(height, width) from the header."""
    width, height = self._header.size
    return height, width


def decode_window(image: EncodedImage, window: tuple[int, int, int, int], out_height: int,
                  out_width: int) -> np.ndarray:
  """The pixels of `window` (top, left, height, width) of the image, bilinearly resampled to
  (out_height, out_width, channels) uint8, decoding no finer than that needs."""
  top, left, height, width = window
  opened = image.take_opened()
  full_width, full_height = opened.size
  mode = MODES[image.channels]
  # At least the output's pixels across the window: the whole image at the scale that gives them.
  opened.draft(mode, (math.ceil(full_width * out_width / width), math.ceil(full_height * out_height / height)))
  scale_x, scale_y = opened.size[0] / full_width, opened.size[1] / full_height
  try:
    opened.load()
    converted = opened if opened.mode == mode else opened.convert(mode)  # convert copies even to its own mode
  except (OSError, ValueError) as e:
    raise undecodable(e) from None
  box = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
  pixels = np.asarray(converted.resize((out_width, out_height), Image.BILINEAR, box=box))
  return pixels[..., None] if pixels.ndim == 2 else pixels
