"""Preprocessing and augmentation of a batch, split where it is cheapest: the host decides, the device does.

Everything here is deterministic given its inputs: the randomness of an
augmented example is a pure function of (seed, stream position), the position
of the example in the training stream (`example_uniforms`, a counter-based hash
computed for the whole batch at once). The same example at the same point of
training is therefore augmented identically however many processes or devices
share the batch, and after a resume.

A batch is prepared in two stages:

* the host stage (`Preprocess.host_train` / `host_eval`, NumPy, in grain's
  threads or workers) reads and decodes the examples and brings images of
  varying size to the model's size (shorter side and center crop, or, with
  `random_resized_crop`, an Inception-style random crop): uint8 images of one
  size. It also turns each example's uniforms into its augmentation draws
  (`Augment.draw`: rotation, crop row and column, flip), a few bytes per example;
* the device stage (`Preprocess.finish`, written once for NumPy and jax.numpy)
  resizes fixed-size images to the model's input size, applies the draws
  (small random rotation, random crop from a zero-padded image, horizontal
  flip), then normalizes with the dataset's per-channel mean and standard
  deviation into float32. The train and eval steps run it on the devices, so the
  host ships uint8 and the draws; a split placed on the devices
  (`cnnjax.data.resident`) ships only the example indices and draws.

Evaluation batches are only resized and normalized. The full NumPy path
(`train_batch`, `eval_batch`: both stages on the host) gives the same batches
within float tolerance; tests hold the two together.

The task decides what a batch is made of:

* classification: images as above, one label per example;
* segmentation: masks are resized (nearest) and augmented with the very same
  draws as their images (nearest-neighbour rotation; padding and corners take
  the background class), so labels stay aligned with pixels;
* text: token ids pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from cnnjax.data.decode import EncodedImage, decode_window
from cnnjax.imageops import crop_batch, flip_batch, rotate_batch

PIXEL_MAX = 255.0
TASKS = ("classification", "segmentation", "text")
# Augment draws per example: rotation, crop row, crop column, flip; their columns in uniforms and in draws.
AUGMENT_DRAWS = 4
ROTATION, CROP_OFFSETS, FLIP = 0, slice(1, 3), 3
# A flip draw is 0 or 1; the uniform below it, and the draw above it, mean flipped.
FLIP_THRESHOLD = 0.5
# Random resized crops: tries per example (area and aspect each), then the fallback to the center.
CROP_ATTEMPTS = 10
CROP_DRAWS = 4 * CROP_ATTEMPTS  # area, aspect, top, left per try
# Constants of the splitmix64 finalizer (Steele et al. 2014), a well-mixed 64-bit hash.
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_MANTISSA_BITS = 53


def _splitmix64(x: np.ndarray) -> np.ndarray:
  z = x + _GOLDEN_GAMMA
  z = (z ^ (z >> np.uint64(30))) * _MIX_1
  z = (z ^ (z >> np.uint64(27))) * _MIX_2
  return z ^ (z >> np.uint64(31))


def example_uniforms(seed: int, positions: np.ndarray, count: int, stream: int = 0) -> np.ndarray:
  """Uniform numbers in [0, 1) of shape (len(positions), count), each a pure function of
  (seed, stream, position, column): the same example draws the same numbers wherever it is read.
  """
  with np.errstate(over="ignore"):
    key = _splitmix64(np.uint64(seed) * _GOLDEN_GAMMA + np.uint64(stream))
    rows = _splitmix64(key ^ _splitmix64(np.asarray(positions, np.uint64)))
    values = _splitmix64(rows[:, None] + np.arange(count, dtype=np.uint64)[None, :] * _GOLDEN_GAMMA)
  return (values >> np.uint64(64 - _MANTISSA_BITS)).astype(np.float64) / float(2 ** _MANTISSA_BITS)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The (out_size, in_size) linear map of bilinear resizing, antialiased when shrinking.

  Pixel centers are aligned (half-pixel convention); when shrinking, the triangle
  filter is widened by the scale factor so that every input pixel contributes.
  """
  scale = in_size / out_size
  support = max(scale, 1.0)
  centers = (np.arange(out_size) + 0.5) * scale - 0.5
  distance = np.abs(centers[:, None] - np.arange(in_size)[None, :]) / support
  weights = np.maximum(0.0, 1.0 - distance)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_batch(images: Any, size: int, *, xp: Any = np) -> Any:
  """Resizes a float batch (B, H, W, C) to (B, size, size, C) by separable bilinear maps.

  Two batched matrix products (rows, then columns) on (B, C, H, W): an order of
  magnitude faster than one einsum over the four axes.
  """
  batch, height, width, channels = images.shape
  if height == size and width == size:
    return images
  rows, cols = xp.asarray(resize_matrix(height, size)), xp.asarray(resize_matrix(width, size).T)
  planes = images.transpose(0, 3, 1, 2).reshape(batch * channels, height, width)
  resized = xp.matmul(xp.matmul(rows, planes), cols)
  return resized.reshape(batch, channels, size, size).transpose(0, 2, 3, 1)


def shorter_side_window(height: int, width: int, size: int) -> tuple[float, float, float, float]:
  """(top, left, height, width) in the image of the square that resizing the shorter side to `size` and
  cropping the center keeps."""
  scale = size / min(height, width)
  new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
  return (new_h - size) // 2 / scale, (new_w - size) // 2 / scale, size / scale, size / scale


def resize_shorter_and_center_crop(image: np.ndarray | EncodedImage, size: int, *, nearest: bool = False
                                   ) -> np.ndarray:
  """Resizes a uint8 image (H, W, C) of any shape, or an encoded one, to (size, size, C): shorter side,
  then center crop.

  `nearest` copies pixels instead of blending them (class masks).
  """
  if isinstance(image, EncodedImage):
    return decode_window(image, example_window(*image.size, size, None), size, size)
  height, width = image.shape[:2]
  scale = size / min(height, width)
  new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
  resized = _pil_resize(image, new_h, new_w, Image.NEAREST if nearest else Image.BILINEAR)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized[top:top + size, left:left + size]


def crop_window(height: int, width: int, uniforms: np.ndarray, area_range: tuple[float, float] = (0.08, 1.0),
                aspect_range: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int] | None:
  """An Inception-style crop (top, left, height, width): a random area fraction and aspect ratio from
  `uniforms` (CROP_DRAWS numbers in [0, 1)); None when none of CROP_ATTEMPTS tries fits."""
  for area_u, aspect_u, top_u, left_u in uniforms.reshape(CROP_ATTEMPTS, 4):
    area = height * width * (area_range[0] + area_u * (area_range[1] - area_range[0]))
    log_low, log_high = np.log(aspect_range[0]), np.log(aspect_range[1])
    aspect = np.exp(log_low + aspect_u * (log_high - log_low))
    crop_h, crop_w = round(np.sqrt(area / aspect)), round(np.sqrt(area * aspect))
    if 0 < crop_h <= height and 0 < crop_w <= width:
      return int(top_u * (height - crop_h + 1)), int(left_u * (width - crop_w + 1)), crop_h, crop_w
  return None


def example_window(height: int, width: int, size: int, crop_uniforms: np.ndarray | None
                   ) -> tuple[float, float, float, float]:
  """The window (top, left, height, width) of an image that becomes a (size, size) example: the random
  resized crop of `crop_uniforms` (`crop_window`), else (no uniforms, or no try fits) the central square of
  `shorter_side_window`. The host decoder and the GPU decoder (`cnnjax.data.gpu_decode`) both crop this."""
  window = None if crop_uniforms is None else crop_window(height, width, crop_uniforms)
  return shorter_side_window(height, width, size) if window is None else window


def random_resized_crop(image: np.ndarray | EncodedImage, size: int, uniforms: np.ndarray) -> np.ndarray:
  """Inception-style crop (`crop_window`) resized to (size, size); the central square when no try fits.
  An encoded image is decoded only as far as the crop needs (`cnnjax.data.decode`)."""
  if isinstance(image, EncodedImage):
    return decode_window(image, example_window(*image.size, size, uniforms), size, size)
  window = crop_window(*image.shape[:2], uniforms)
  if window is None:
    return resize_shorter_and_center_crop(image, size)
  top, left, crop_h, crop_w = window
  return _pil_resize(image[top:top + crop_h, left:left + crop_w], size, size)


def _pil_resize(image: np.ndarray, height: int, width: int, resample: int = Image.BILINEAR) -> np.ndarray:
  squeezed = image[..., 0] if image.shape[-1] == 1 else image
  resized = np.asarray(Image.fromarray(squeezed).resize((width, height), resample))
  return resized[..., None] if resized.ndim == 2 else resized


# How the device stage maps a per-example function over a batch: NumPy calls it on the whole batch; on
# the devices it is jax.vmap, so that every gather indexes within one example and a batch sharded over
# devices stays where it is.
BatchMap = Callable[[Callable[..., Any]], Callable[..., Any]]


def whole_batch(fn: Callable[..., Any]) -> Callable[..., Any]:
  return fn


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training-time augmentation: random crop with zero padding, flip, small rotation."""

  crop_padding: int = 0
  flip: bool = False
  rotation_degrees: float = 0.0

  @property
  def enabled(self) -> bool:
    return bool(self.crop_padding or self.flip or self.rotation_degrees)

  def draw(self, uniforms: np.ndarray) -> np.ndarray:
    """Per-example draws (B, 4) float32 from uniforms (B, AUGMENT_DRAWS) in [0, 1): rotation in
    [-1, 1], crop row and column offsets in [0, 2p], flip in {0, 1} (small integers, exact in float32)."""
    offsets = np.floor(uniforms[:, CROP_OFFSETS] * (2 * self.crop_padding + 1))
    return np.stack([2.0 * uniforms[:, ROTATION] - 1.0, offsets[:, 0], offsets[:, 1],
                     (uniforms[:, FLIP] < FLIP_THRESHOLD).astype(np.float64)], axis=1).astype(np.float32)

  def apply(self, images: Any, draws: Any, *, order: str = "bilinear", fill: float = 0.0,
            xp: Any = np) -> Any:
    """Applies `draws` to a batch (B, H, W, ...): images bilinear with zeros, masks nearest with their background."""
    if self.rotation_degrees:
      images = rotate_batch(images, draws[:, ROTATION] * np.float32(self.rotation_degrees), order=order, fill=fill,
                            xp=xp)
    if self.crop_padding:
      images = crop_batch(images, self.crop_padding, draws[:, CROP_OFFSETS].astype(xp.int32), fill=fill, xp=xp)
    if self.flip:
      images = flip_batch(images, draws[:, FLIP] > FLIP_THRESHOLD, xp=xp)
    return images

  def __call__(self, images: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Augments a float batch (B, H, W, C) with its examples' uniforms (B, AUGMENT_DRAWS)."""
    return self.apply(images, self.draw(uniforms))


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Turns decoded images into normalized float32 model inputs: the host stage, then the device stage."""

  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: Augment = Augment()
  random_resized_crop: bool = False  # training only; needs image_size
  seed: int = 0
  task: str = "classification"  # classification / segmentation / text (see the module docstring)
  mask_fill: int = 0  # segmentation: the class that augmentation pads masks with (the background)

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")

  # -- the host stage: decoded records -> one-size uint8 images, labels and draws ------------------------

  def _one_size(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    if isinstance(images, np.ndarray):
      return images
    if not isinstance(images[0], EncodedImage) and len({np.shape(image) for image in images}) == 1:
      return np.stack(images)
    # Variable-size datasets (ImageNet, read encoded): each to the model's size on its own.
    return np.stack([resize_shorter_and_center_crop(image, self.image_size) for image in images])

  def host_train(self, columns: dict[str, Any], positions: np.ndarray) -> dict[str, np.ndarray]:
    """The host stage of a training batch read as columns (`read_columns`): {'input', 'label'} and,
    when augmenting, 'draws' (B, 4) float32; `positions` seed each example's randomness."""
    if self.task == "text":
      return {"input": _tokens(columns), "label": _labels(columns)}
    if self.task == "segmentation":
      batch = self._host_segmentation(columns)
    elif self.random_resized_crop:
      crops = self.crop_uniforms(positions)
      batch = {"input": np.stack([random_resized_crop(image, self.image_size, draws)
                                  for image, draws in zip(columns["image"], crops)]), "label": _labels(columns)}
    else:
      batch = {"input": self._one_size(columns["image"]), "label": _labels(columns)}
    if self.augment.enabled:
      batch["draws"] = self.draws(positions)
    return batch

  def host_eval(self, columns: dict[str, Any]) -> dict[str, np.ndarray]:
    """The host stage of an evaluation batch: {'input', 'label'}, never augmented."""
    if self.task == "text":
      return {"input": _tokens(columns), "label": _labels(columns)}
    if self.task == "segmentation":
      return self._host_segmentation(columns)
    return {"input": self._one_size(columns["image"]), "label": _labels(columns)}

  def crop_uniforms(self, positions: np.ndarray) -> np.ndarray:
    """The random resized crops' uniforms (B, CROP_DRAWS) of the examples at these stream positions."""
    return example_uniforms(self.seed, positions, CROP_DRAWS, stream=1)

  def draws(self, positions: np.ndarray) -> np.ndarray:
    """The augmentation draws (B, 4) float32 of the examples at these stream positions."""
    return self.augment.draw(example_uniforms(self.seed, positions, AUGMENT_DRAWS))

  def _host_segmentation(self, columns: dict[str, Any]) -> dict[str, np.ndarray]:
    images, masks = columns["image"], columns["mask"]
    if self.image_size:
      images = [resize_shorter_and_center_crop(image, self.image_size) for image in images]
      masks = [resize_shorter_and_center_crop(mask[..., None], self.image_size, nearest=True)[..., 0]
               for mask in masks]
    return {"input": np.stack(images), "label": np.stack(masks).astype(np.int32)}

  # -- the device stage: written once for NumPy and jax.numpy --------------------------------------------

  def finish(self, batch: dict[str, Any], *, xp: Any = np, per_example: BatchMap = whole_batch
             ) -> tuple[Any, Any]:
    """Model inputs and labels from a host-stage batch: resize, augment with its 'draws' (if present),
    normalize. `xp` is numpy or jax.numpy; `per_example` maps the augmentation over the batch."""
    inputs, labels = batch["input"], batch["label"]
    if self.task == "text":
      return inputs.astype(xp.int32), labels.astype(xp.int32)
    images = inputs.astype(xp.float32)
    if self.image_size and self.task == "classification":
      images = resize_batch(images, self.image_size, xp=xp)
    draws = batch.get("draws")
    if draws is not None:
      augment = lambda x, d, **kw: self.augment.apply(x, d, xp=xp, **kw)  # noqa: E731
      images = per_example(augment)(images, draws)
      if self.task == "segmentation":
        labels = per_example(lambda x, d: augment(x, d, order="nearest", fill=self.mask_fill))(labels, draws)
    mean = np.asarray(self.mean, np.float32) * np.float32(PIXEL_MAX)
    # A product by the reciprocal, computed here once: XLA turns a division by a constant into that product,
    # and NumPy and the devices then agree to the bit.
    scale = np.float32(1.0) / (np.asarray(self.std, np.float32) * np.float32(PIXEL_MAX))
    return ((images - xp.asarray(mean)) * xp.asarray(scale)).astype(xp.float32), labels.astype(xp.int32)

  # -- both stages on the host (NumPy): the reference the device stage is tested against ------------------

  def train_batch(self, columns: dict[str, Any], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and labels of a training batch, both stages in NumPy."""
    return self.finish(self.host_train(columns, positions))

  def eval_batch(self, columns: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and labels of an evaluation batch, both stages in NumPy."""
    return self.finish(self.host_eval(columns))

  def train(self, images: np.ndarray | Sequence[np.ndarray], positions: np.ndarray) -> np.ndarray:
    """Normalized model inputs of training images (an array (B, H, W, C) or a list of varying sizes)."""
    return self.train_batch({"image": images, "label": np.zeros(len(images), np.int32)}, positions)[0]

  def eval(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Normalized model inputs of evaluation images: resized and normalized, never augmented."""
    return self.eval_batch({"image": images, "label": np.zeros(len(images), np.int32)})[0]


def _labels(columns: dict[str, Any]) -> np.ndarray:
  return np.asarray(columns["label"], np.int32)


def _tokens(columns: dict[str, Any]) -> np.ndarray:
  return np.asarray(columns["tokens"], np.int32)
