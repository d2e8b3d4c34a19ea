"""Procedurally generated segmentation sets (synthetic): coloured shapes on noise, in 2D and 3D.

Nothing is downloaded: the images are drawn from a seeded generator, the same
every time, so that U-Net and its 3D extension train and are tested offline.

* `shapes`: 32x32 RGB images with one to three shapes (circle, square,
  triangle) of random size, position and colour on a noisy dark background;
  the mask gives each pixel's class (0 background, 1 circle, 2 square,
  3 triangle; a later shape covers an earlier one). Colours are random, so the
  class can only be read from the shape. 1,000 training and 200 test images.
* `shapes3d`: 16x16x16 one-channel volumes with one or two solids (sphere,
  cube) on noise; classes 0 background, 1 sphere, 2 cube. 256 training and
  64 test volumes.

Train and test come from different seeds, so no example is shared.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SHAPE_CLASSES = ("background", "circle", "square", "triangle")
SOLID_CLASSES = ("background", "sphere", "cube")
IMAGE_SIZE, VOLUME_SIZE = 32, 16
SPLITS = {"shapes": {"train": 1000, "test": 200}, "shapes3d": {"train": 256, "test": 64}}
SPLIT_SEEDS = {"train": 0, "test": 1}
MAX_SHAPES, MAX_SOLIDS = 3, 2
# Sizes as fractions of the image side, colours and noise in 0..255 intensity units.
RADIUS_RANGE = (0.12, 0.25)
SOLID_RADIUS_RANGE = (0.18, 0.32)  # solids a little larger: a 16-voxel cube holds little
BACKGROUND_RANGE, SHAPE_COLOUR_RANGE, NOISE_STD = (0.0, 80.0), (110.0, 255.0), 12.0
SQUARE_HALF_SIDE = 0.85  # a square's half side relative to the radius, so circles and squares cover alike


def _shape_region(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float) -> np.ndarray:
  if SHAPE_CLASSES[kind] == "circle":
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
  if SHAPE_CLASSES[kind] == "square":
    half = radius * SQUARE_HALF_SIDE
    return (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
  # An upright isosceles triangle: apex at the top, base of width 2r at the bottom.
  depth = (yy - (cy - radius)) / (2 * radius)
  return (depth >= 0) & (depth <= 1) & (np.abs(xx - cx) <= depth * radius)


def generate_shapes(count: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """`count` images (N, size, size, 3) uint8 and masks (N, size, size) uint8 from `seed`."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  images = np.empty((count, size, size, 3), np.uint8)
  masks = np.zeros((count, size, size), np.uint8)
  for index in range(count):
    image = np.broadcast_to(rng.uniform(*BACKGROUND_RANGE, 3), (size, size, 3)).copy()
    for _ in range(rng.integers(1, MAX_SHAPES + 1)):
      kind = int(rng.integers(1, len(SHAPE_CLASSES)))
      radius = rng.uniform(*RADIUS_RANGE) * size
      cy, cx = rng.uniform(radius, size - radius, 2)
      region = _shape_region(kind, yy, xx, cy, cx, radius)
      image[region] = rng.uniform(*SHAPE_COLOUR_RANGE, 3)
      masks[index][region] = kind
    image += rng.normal(0.0, NOISE_STD, image.shape)
    images[index] = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return images, masks


def generate_solids(count: int, seed: int, size: int = VOLUME_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """`count` volumes (N, size, size, size, 1) uint8 and masks (N, size, size, size) uint8 from `seed`."""
  rng = np.random.default_rng(seed)
  zz, yy, xx = np.mgrid[0:size, 0:size, 0:size].astype(np.float32)
  volumes = np.empty((count, size, size, size, 1), np.uint8)
  masks = np.zeros((count, size, size, size), np.uint8)
  for index in range(count):
    volume = np.full((size, size, size), rng.uniform(*BACKGROUND_RANGE))
    for _ in range(rng.integers(1, MAX_SOLIDS + 1)):
      kind = int(rng.integers(1, len(SOLID_CLASSES)))
      radius = rng.uniform(*SOLID_RADIUS_RANGE) * size
      cz, cy, cx = rng.uniform(radius, size - radius, 3)
      if SOLID_CLASSES[kind] == "sphere":
        region = (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
      else:
        half = radius * SQUARE_HALF_SIDE
        region = (np.abs(zz - cz) <= half) & (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
      volume[region] = rng.uniform(*SHAPE_COLOUR_RANGE)
      masks[index][region] = kind
    volume += rng.normal(0.0, NOISE_STD, volume.shape)
    volumes[index, ..., 0] = np.clip(np.round(volume), 0, 255).astype(np.uint8)
  return volumes, masks


class SegmentationArraySource:
  """In-memory images and per-pixel class masks with the record interface of a data source."""

  def __init__(self, images: np.ndarray, masks: np.ndarray):
    self.images, self.masks = images, masks

  def __len__(self) -> int:
    return len(self.masks)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "mask": self.masks[index]}

  @property
  def columns(self) -> dict[str, np.ndarray]:
    """Every field as one array, for batched reads without a Python loop."""
    return {"image": self.images, "mask": self.masks}


def open_split(name: str, split: str) -> SegmentationArraySource:
  """The `split` ('train' or 'test') of `name` ('shapes' or 'shapes3d')."""
  count, seed = SPLITS[name][split], SPLIT_SEEDS[split]
  generate = generate_shapes if name == "shapes" else generate_solids
  return SegmentationArraySource(*generate(count, seed))


def class_names(name: str) -> tuple[str, ...]:
  return SHAPE_CLASSES if name == "shapes" else SOLID_CLASSES


def num_classes(name: str) -> int:
  return len(class_names(name))
