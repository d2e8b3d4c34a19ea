"""Deep image prior (Ulyanov, Vedaldi and Lempitsky 2018): denoising with an untrained U-Net.

A randomly initialized U-Net maps a fixed random input z to an image and is
fitted to one noisy photo by gradient descent on the squared error. Nothing is
learned from other images: the only prior is the convolutional architecture,
which reproduces natural structure much sooner than noise. PSNR against the
clean photo (which the fit never sees) therefore rises above that of the noisy
photo, peaks, and falls as the network starts to reproduce the noise too; the
peak is an oracle number (choosing when to stop needs the clean photo), the
curve is the point.

The photo is scikit-learn's bundled sample `flower.jpg` (no download), a
centred square crop resized to `size` pixels, with Gaussian noise of standard
deviation 25/255 added once from a seed. The scale is small for two CPU cores
(128x128 pixels, a four-level U-Net of 8-64 channels), where the paper used
512x512 images and a far wider network.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from cnnjax.models import build_model

PIXEL_MAX = 255.0
NOISE_STD = 25.0 / PIXEL_MAX  # the paper's denoising setting (sigma = 25)
INPUT_CHANNELS = 32  # depth of the random input z
INPUT_SCALE = 0.1  # z is uniform in [0, 0.1), as in the paper
DEFAULT_FEATURES = (8, 16, 32, 64)
DEFAULT_PHOTO = "flower.jpg"
DEFAULT_LEARNING_RATE = 2e-3


def sample_photo(size: int, name: str = DEFAULT_PHOTO) -> np.ndarray:
  """A scikit-learn sample photo: centred square crop resized to (size, size, 3), float32 in [0, 1]."""
  import sklearn.datasets  # pylint: disable=import-outside-toplevel  (slow import)
  photo = sklearn.datasets.load_sample_image(name)
  height, width = photo.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  square = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.LANCZOS)
  return np.asarray(square, np.float32) / PIXEL_MAX


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
  """Peak signal-to-noise ratio in dB for images in [0, 1]."""
  mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
  return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


@dataclasses.dataclass
class PriorFit:
  """The curve of a fit and the images worth showing."""

  clean: np.ndarray
  noisy: np.ndarray
  iterations: list[int]
  psnr_clean: list[float]  # the output of iteration i (the one its step fits) against the clean photo
  psnr_noisy: list[float]  # the output against the noisy target it is fitted to
  best_iteration: int
  best_output: np.ndarray
  final_output: np.ndarray

  @property
  def noisy_psnr(self) -> float:
    return psnr(self.noisy, self.clean)

  def summary(self) -> dict[str, Any]:
    return {"noisy_psnr": self.noisy_psnr, "best_psnr": max(self.psnr_clean), "best_iteration": self.best_iteration,
            "final_psnr": self.psnr_clean[-1], "final_psnr_to_noisy": self.psnr_noisy[-1],
            "iterations": self.iterations, "psnr_clean": self.psnr_clean, "psnr_noisy": self.psnr_noisy}


def fit(clean: np.ndarray, *, steps: int, features: Sequence[int] = DEFAULT_FEATURES,
        learning_rate: float = DEFAULT_LEARNING_RATE,
        log_every: int = 25, seed: int = 0) -> PriorFit:
  """Fits a random U-Net to a noisy copy of `clean` (H, W, 3) for `steps` Adam steps, tracking PSNR."""
  rng = np.random.default_rng(seed)
  noisy = np.clip(clean + rng.normal(0.0, NOISE_STD, clean.shape), 0.0, 1.0).astype(np.float32)
  height, width = clean.shape[:2]
  z = jnp.asarray(rng.uniform(0.0, INPUT_SCALE, (1, height, width, INPUT_CHANNELS)), jnp.float32)
  model = build_model("unet", num_classes=clean.shape[-1], features=tuple(features), norm_kind="batch")
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), z)
  tx = optax.adam(learning_rate)
  target = jnp.asarray(noisy)[None]

  def output(params, stats):
    # Train-mode BatchNorm over the one image's pixels, in the fit and when reading the output alike.
    logits, _ = model.apply({"params": params, "batch_stats": stats}, z, train=True, mutable=["batch_stats"])
    return jax.nn.sigmoid(logits)[0]

  @jax.jit
  def step(params, opt_state, stats):
    # Returns the output this step fits (before its update), so that reading it costs no second program.
    def loss_fn(p):
      image = output(p, stats)
      return jnp.mean((image[None] - target) ** 2), image

    (_, image), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, image

  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  iterations, to_clean, to_noisy = [], [], []
  best = (-math.inf, 0, None)
  for iteration in range(1, steps + 1):
    params, opt_state, fitted = step(params, opt_state, stats)
    if iteration % log_every == 0 or iteration == steps:
      image = np.asarray(fitted)
      iterations.append(iteration)
      to_clean.append(psnr(image, clean))
      to_noisy.append(psnr(image, noisy))
      if to_clean[-1] > best[0]:
        best = (to_clean[-1], iteration, image)
  return PriorFit(clean, noisy, iterations, to_clean, to_noisy, best[1], best[2], image)


def plot_fit(result: PriorFit, path: str) -> None:
  """Clean, noisy, best and final outputs, and the PSNR curves, in one PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  figure = plt.figure(figsize=(15, 3.6))
  panels = [("clean photo", result.clean), (f"noisy: {result.noisy_psnr:.2f} dB", result.noisy),
            (f"output at iteration {result.best_iteration}: {max(result.psnr_clean):.2f} dB", result.best_output),
            (f"output at iteration {result.iterations[-1]}: {result.psnr_clean[-1]:.2f} dB", result.final_output)]
  for index, (title, image) in enumerate(panels, start=1):
    axis = figure.add_subplot(1, 5, index)
    axis.imshow(np.clip(image, 0, 1))
    axis.set_title(title, fontsize=9)
    axis.axis("off")
  axis = figure.add_subplot(1, 5, 5)
  axis.plot(result.iterations, result.psnr_clean, label="output vs clean")
  axis.plot(result.iterations, result.psnr_noisy, label="output vs noisy target")
  axis.axhline(result.noisy_psnr, color="gray", linestyle=":", label="noisy vs clean")
  axis.set_xlabel("iteration")
  axis.set_ylabel("PSNR (dB)")
  axis.legend(fontsize=8)
  axis.grid(alpha=0.3)
  figure.suptitle("Deep image prior: a random U-Net fitted to one noisy photo")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)
