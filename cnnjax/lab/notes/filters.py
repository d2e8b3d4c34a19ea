"""The notes' fixed kernels applied to a real photo, side by side, with a sharpness number per result.

The photo is scikit-learn's bundled `china.jpg` (427x640 RGB, no download),
filtered channel by channel by `cnnjax.nn.FilterBank` with mirrored borders.
Sharpness is the mean absolute response of the 4-neighbour Laplacian (the
notes' first edge kernel) over the image, relative to the photo's own: blurs
lower it, sharpening raises it, the identity keeps 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from cnnjax.nn import CLASSIC_KERNELS, FilterBank

PIXEL_MAX = 255.0
EDGE_KERNELS = ("edge_4", "edge_8")  # zero-sum kernels: shown as response magnitude
DISPLAY_PERCENTILE = 99.0  # edge maps are scaled so that this percentile is white


def sample_photo(name: str = "china.jpg") -> np.ndarray:
  """A scikit-learn sample photo as float32 (H, W, 3) in [0, 1]."""
  import sklearn.datasets  # pylint: disable=import-outside-toplevel  (slow import)
  return sklearn.datasets.load_sample_image(name).astype(np.float32) / PIXEL_MAX


def apply_bank(image: np.ndarray, names: Sequence[str] = tuple(CLASSIC_KERNELS),
               boundary: str = "reflect") -> dict[str, np.ndarray]:
  """Each named kernel applied to every channel of `image` (H, W, C): name -> (H, W, C)."""
  bank = FilterBank(tuple(names), boundary=boundary)
  out = np.asarray(bank.apply({}, jnp.asarray(image)[None]))[0]
  channels = image.shape[-1]
  maps = out.reshape(out.shape[:2] + (channels, len(names)))
  return {name: maps[..., index] for index, name in enumerate(names)}


def sharpness(image: np.ndarray) -> float:
  """Mean absolute 4-neighbour Laplacian response (mirrored borders)."""
  return float(np.mean(np.abs(apply_bank(image, ("edge_4",))["edge_4"])))


def filter_report(image: np.ndarray, filtered: dict[str, np.ndarray]) -> dict[str, float]:
  """Sharpness of each result relative to the photo's."""
  reference = sharpness(image)
  return {name: sharpness(result) / reference for name, result in filtered.items()}


def plot_bank(image: np.ndarray, filtered: dict[str, np.ndarray], report: dict[str, float], path: str) -> None:
  """The photo and every filtered version in a grid, saved as a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  panels: list[tuple[str, Any, Any]] = [("photo", image, None)]
  for name, result in filtered.items():
    title = f"{name} (sharpness x{report[name]:.2f})"
    if name in EDGE_KERNELS:
      magnitude = np.abs(result).mean(-1)
      panels.append((title, np.clip(magnitude / np.percentile(magnitude, DISPLAY_PERCENTILE), 0, 1), "gray"))
    else:
      panels.append((title, np.clip(result, 0, 1), None))
  columns = (len(panels) + 1) // 2
  figure, axes = plt.subplots(2, columns, figsize=(4.2 * columns, 6.8))
  for axis, (title, picture, cmap) in zip(axes.ravel(), panels):
    axis.imshow(picture, cmap=cmap)
    axis.set_title(title, fontsize=9)
  for axis in axes.ravel():
    axis.axis("off")
  figure.suptitle("The notes' classic kernels as a fixed filter bank (cnnjax.nn.FilterBank)")
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
