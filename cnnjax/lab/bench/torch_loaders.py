"""The PyTorch peer of a cnnjax run: the twin model trained through a standard `DataLoader` on the same data.

What a PyTorch user would write: a `Dataset` whose `__getitem__` reads and
augments one example with NumPy and PIL in the loader's worker processes
(random crop after 4-pixel zero padding and a flip for CIFAR-shaped arrays;
JPEG decode, Inception-style random resized crop and a flip for the synthetic
JPEG ImageNet, read from the same TFDS ArrayRecord files cnnjax reads), batches
pinned in memory, copied to the GPU and normalized there, bf16 autocast and
channels_last as in the GPU check's step peer. Throughput counts the images
of the timed steps over their wall time (the device synchronized at the end),
after untimed warm-up steps that start the workers.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cnnjax.data.preprocess import CROP_DRAWS, random_resized_crop
from cnnjax.lab.bench import torch_models

CIFAR_PADDING = 4
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
PIXEL_MAX = 255.0


class CifarArrays(torch.utils.data.Dataset):
  """uint8 (N, 32, 32, 3) images and labels from an npz, with the CIFAR recipe's crop and flip."""

  def __init__(self, path: str):
    with np.load(path) as arrays:
      self.images, self.labels = arrays["image"], arrays["label"].astype(np.int64)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng()
    padded = np.pad(self.images[index], ((CIFAR_PADDING,) * 2, (CIFAR_PADDING,) * 2, (0, 0)))
    top, left = rng.integers(0, 2 * CIFAR_PADDING + 1, 2)
    crop = padded[top:top + self.images.shape[1], left:left + self.images.shape[2]]
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    return np.ascontiguousarray(crop), int(self.labels[index])


class EncodedImages(torch.utils.data.Dataset):
  """JPEGs of a prepared TFDS image dataset, decoded and cropped to `size` with a flip in each worker."""

  def __init__(self, name: str, data_dir: str, size: int):
    self.name, self.data_dir, self.size = name, data_dir, size
    self._source: Any = None
    self._length = len(self._open())
    self._source = None  # opened again in each worker process

  def _open(self) -> Any:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    return tfds.data_source(self.name, split="train", data_dir=self.data_dir, download=False,
                            decoders={"image": tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    if self._source is None:
      self._source = self._open()
    record = self._source[index]
    image = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"))
    crop = random_resized_crop(image, self.size, np.random.default_rng().random(CROP_DRAWS))
    if np.random.default_rng().random() < 0.5:
      crop = crop[:, ::-1]
    return np.ascontiguousarray(crop), int(record["label"])


def time_loader_training(model_name: str, dataset: torch.utils.data.Dataset, *, num_classes: int, batch: int,
                         steps: int, warmup_steps: int, workers: int, mean: tuple[float, ...],
                         std: tuple[float, ...], autocast_dtype: str | None = None, channels_last: bool = True,
                         learning_rate: float = 0.1, momentum: float = 0.9, seed: int = 0) -> dict[str, Any]:
  """Images per second of the twin trained through a DataLoader over `dataset` (uint8 HWC examples)."""
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(seed)
  model = torch_models.build(model_name, num_classes).to(device)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
  model.train()
  loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0)
  shift = torch.tensor(mean, device=device).view(1, -1, 1, 1) * PIXEL_MAX
  scale = torch.tensor(std, device=device).view(1, -1, 1, 1) * PIXEL_MAX

  def batches():
    while True:
      yield from loader

  def synchronize():
    if device.type == "cuda":
      torch.cuda.synchronize(device)

  stream = batches()
  start = time.perf_counter()
  for index in range(warmup_steps + steps):
    if index == warmup_steps:
      synchronize()
      start = time.perf_counter()
    images, labels = next(stream)
    inputs = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    inputs = (inputs - shift) / scale
    if channels_last:
      inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    with (torch.autocast(device.type, dtype=getattr(torch, autocast_dtype)) if autocast_dtype
          else torch.autocast(device.type, enabled=False)):
      loss = F.cross_entropy(model(inputs), labels.to(device, non_blocking=True))
    loss.backward()
    optimizer.step()
  synchronize()
  seconds = time.perf_counter() - start
  return {"images_per_second": steps * batch / seconds, "steps": steps, "workers": workers,
          "device": str(device), "torch_version": torch.__version__, "autocast_dtype": autocast_dtype,
          "channels_last": channels_last}
