"""Host-side preprocessing and augmentation, vectorized over a batch with NumPy.

Everything here is deterministic given its inputs: the randomness of an
augmented example comes from a generator seeded with (seed, stream position),
the position of the example in the training stream. The same example at the
same point of training is therefore augmented identically however many
processes or devices share the batch, and after a resume.

Order of operations for a training batch: resize to the model's input size
(or, with `random_resized_crop`, an Inception-style random crop), small random rotation, random crop from a zero-padded image, horizontal flip,
then normalization with the dataset's per-channel mean and standard deviation.
Evaluation batches are only resized and normalized.

The task decides what a batch is made of (`Preprocess.train_batch` /
`eval_batch` turn records into model inputs and labels):

* classification: images as above, one label per example;
* segmentation: masks are resized (nearest) and augmented with the very same
  draws as their images (nearest-neighbour rotation; padding and corners take
  the background class), so labels stay aligned with pixels;
* text: token ids pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image

from cnnjax.imageops import crop_batch, flip_batch, rotate_batch

PIXEL_MAX = 255.0
TASKS = ("classification", "segmentation", "text")


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


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
  """Resizes a float batch (B, H, W, C) to (B, size, size, C) by separable bilinear maps."""
  _, height, width, _ = images.shape
  if height == size and width == size:
    return images
  rows, cols = resize_matrix(height, size), resize_matrix(width, size)
  return np.einsum("hH,bHWc,wW->bhwc", rows, images, cols, optimize=True)


def resize_shorter_and_center_crop(image: np.ndarray, size: int, *, nearest: bool = False) -> np.ndarray:
  """Resizes a uint8 image (H, W, C) of any shape to (size, size, C): shorter side, then center crop.

  `nearest` copies pixels instead of blending them (class masks).
  """
  height, width = image.shape[:2]
  scale = size / min(height, width)
  new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
  resized = _pil_resize(image, new_h, new_w, Image.NEAREST if nearest else Image.BILINEAR)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized[top:top + size, left:left + size]


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        area_range: tuple[float, float] = (0.08, 1.0),
                        aspect_range: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> np.ndarray:
  """Inception-style crop: a random area fraction and aspect ratio, resized to (size, size).

  Falls back to the central square after `attempts` draws that do not fit.
  """
  height, width = image.shape[:2]
  for _ in range(attempts):
    area = height * width * rng.uniform(*area_range)
    aspect = np.exp(rng.uniform(np.log(aspect_range[0]), np.log(aspect_range[1])))
    crop_h, crop_w = round(np.sqrt(area / aspect)), round(np.sqrt(area * aspect))
    if 0 < crop_h <= height and 0 < crop_w <= width:
      top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
      return _pil_resize(image[top:top + crop_h, left:left + crop_w], size, size)
  return resize_shorter_and_center_crop(image, size)


def _pil_resize(image: np.ndarray, height: int, width: int, resample: int = Image.BILINEAR) -> np.ndarray:
  squeezed = image[..., 0] if image.shape[-1] == 1 else image
  resized = np.asarray(Image.fromarray(squeezed).resize((width, height), resample))
  return resized[..., None] if resized.ndim == 2 else resized


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training-time augmentation: random crop with zero padding, flip, small rotation."""

  crop_padding: int = 0
  flip: bool = False
  rotation_degrees: float = 0.0

  @property
  def enabled(self) -> bool:
    return bool(self.crop_padding or self.flip or self.rotation_degrees)

  def draw(self, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """Per-example draws (B, 4): rotation in [-1, 1], crop row and column offsets, flip; example i uses rngs[i]."""
    return np.array([(rng.uniform(-1.0, 1.0), rng.integers(0, 2 * self.crop_padding + 1),
                      rng.integers(0, 2 * self.crop_padding + 1), rng.integers(0, 2))
                     for rng in rngs], dtype=np.float64).reshape(len(rngs), 4)

  def apply(self, images: np.ndarray, draws: np.ndarray, *, order: str = "bilinear",
            fill: float = 0.0) -> np.ndarray:
    """Applies `draws` to a batch (B, H, W, ...): images bilinear with zeros, masks nearest with their background."""
    if self.rotation_degrees:
      images = rotate_batch(images, draws[:, 0] * self.rotation_degrees, order=order, fill=fill)
    if self.crop_padding:
      images = crop_batch(images, self.crop_padding, draws[:, 1:3].astype(np.int64), fill=fill)
    if self.flip:
      images = flip_batch(images, draws[:, 3].astype(bool))
    return images

  def __call__(self, images: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """Augments a float batch (B, H, W, C); example i draws from rngs[i] only."""
    return self.apply(images, self.draw(rngs))


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Turns decoded uint8 images into normalized float32 model inputs."""

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

  def _to_float_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
    shapes = {image.shape for image in images}
    if len(shapes) > 1:  # Variable-size datasets (ImageNet): resize each on its own.
      images = [resize_shorter_and_center_crop(image, self.image_size) for image in images]
    batch = np.stack(images).astype(np.float32)
    return resize_batch(batch, self.image_size) if self.image_size else batch

  def _normalize(self, batch: np.ndarray) -> np.ndarray:
    mean = np.asarray(self.mean, np.float32) * PIXEL_MAX
    std = np.asarray(self.std, np.float32) * PIXEL_MAX
    return ((batch - mean) / std).astype(np.float32)

  def train(self, images: Sequence[np.ndarray], positions: np.ndarray) -> np.ndarray:
    """A training batch; `positions` are the examples' positions in the training stream."""
    rngs = [np.random.default_rng((self.seed, int(position))) for position in positions]
    if self.random_resized_crop:
      images = [random_resized_crop(image, self.image_size, rng) for image, rng in zip(images, rngs)]
    batch = self._to_float_batch(images)
    if self.augment.enabled:
      batch = self.augment(batch, rngs)
    return self._normalize(batch)

  def eval(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """An evaluation batch: resized and normalized, never augmented."""
    return self._normalize(self._to_float_batch(images))

  def train_batch(self, records: Sequence[dict], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and labels of a training batch; `positions` seed each example's augmentation."""
    if self.task == "segmentation":
      return self._segmentation(records, positions)
    if self.task == "text":
      return _tokens(records), _labels(records)
    return self.train([record["image"] for record in records], positions), _labels(records)

  def eval_batch(self, records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and labels of an evaluation batch, never augmented."""
    if self.task == "segmentation":
      return self._segmentation(records, None)
    if self.task == "text":
      return _tokens(records), _labels(records)
    return self.eval([record["image"] for record in records]), _labels(records)

  def _segmentation(self, records: Sequence[dict], positions: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    images, masks = [record["image"] for record in records], [record["mask"] for record in records]
    if self.image_size:
      images = [resize_shorter_and_center_crop(image, self.image_size) for image in images]
      masks = [resize_shorter_and_center_crop(mask[..., None], self.image_size, nearest=True)[..., 0]
               for mask in masks]
    batch, labels = np.stack(images).astype(np.float32), np.stack(masks).astype(np.int32)
    if positions is not None and self.augment.enabled:
      draws = self.augment.draw([np.random.default_rng((self.seed, int(p))) for p in positions])
      batch = self.augment.apply(batch, draws)
      labels = self.augment.apply(labels, draws, order="nearest", fill=self.mask_fill)
    return self._normalize(batch), labels


def _labels(records: Sequence[dict]) -> np.ndarray:
  return np.asarray([record["label"] for record in records], np.int32)


def _tokens(records: Sequence[dict]) -> np.ndarray:
  return np.stack([record["tokens"] for record in records]).astype(np.int32)
