"""The benchmark's PyTorch reference: the same architectures as cnnjax's, and their train step.

Written here (not taken from torchvision) so that both sides compute the same
thing: ResNet-20 with option-A shortcuts, the torchvision-layout ResNet-18/50
and LeNet-5 (tanh, average pooling), each with cnnjax's normalization placement,
trained with the same step (forward, softmax cross-entropy, backward, SGD with
momentum). PyTorch is an optional extra (`pip install '.[torch]'`); importing
this module without it raises ImportError.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_STAGE_FEATURES = (16, 32, 64)
IMAGENET_STAGE_FEATURES = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4


class CifarBlock(nn.Module):
  """BasicBlock with an option-A shortcut (subsample, zero-pad channels)."""

  def __init__(self, in_features: int, features: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_features, features, 3, stride, 1, bias=False)
    self.norm1 = nn.BatchNorm2d(features)
    self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(features)
    self.stride, self.missing = stride, features - in_features

  def forward(self, x):
    y = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
    shortcut = x
    if self.stride != 1 or self.missing:
      shortcut = F.pad(x[:, :, ::self.stride, ::self.stride],
                       (0, 0, 0, 0, self.missing // 2, self.missing - self.missing // 2))
    return F.relu(y + shortcut)


class CifarResNet(nn.Module):
  def __init__(self, blocks_per_stage: int, num_classes: int):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, CIFAR_STAGE_FEATURES[0], 3, 1, 1, bias=False),
                              nn.BatchNorm2d(CIFAR_STAGE_FEATURES[0]), nn.ReLU())
    blocks, in_features = [], CIFAR_STAGE_FEATURES[0]
    for stage, features in enumerate(CIFAR_STAGE_FEATURES):
      for index in range(blocks_per_stage):
        blocks.append(CifarBlock(in_features, features, 2 if stage > 0 and index == 0 else 1))
        in_features = features
    self.blocks = nn.Sequential(*blocks)
    self.classifier = nn.Linear(in_features, num_classes)

  def forward(self, x):
    return self.classifier(self.blocks(self.stem(x)).mean((2, 3)))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_features: int, features: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_features, features, 3, stride, 1, bias=False)
    self.norm1 = nn.BatchNorm2d(features)
    self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(features)
    self.shortcut = _projection(in_features, features, stride)

  def forward(self, x):
    y = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
    return F.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
  expansion = BOTTLENECK_EXPANSION

  def __init__(self, in_features: int, features: int, stride: int):
    super().__init__()
    out_features = features * self.expansion
    self.conv1 = nn.Conv2d(in_features, features, 1, bias=False)
    self.norm1 = nn.BatchNorm2d(features)
    self.conv2 = nn.Conv2d(features, features, 3, stride, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(features)
    self.conv3 = nn.Conv2d(features, out_features, 1, bias=False)
    self.norm3 = nn.BatchNorm2d(out_features)
    self.shortcut = _projection(in_features, out_features, stride)

  def forward(self, x):
    y = F.relu(self.norm1(self.conv1(x)))
    y = F.relu(self.norm2(self.conv2(y)))
    return F.relu(self.norm3(self.conv3(y)) + self.shortcut(x))


def _projection(in_features: int, out_features: int, stride: int) -> nn.Module:
  if in_features == out_features and stride == 1:
    return nn.Identity()
  return nn.Sequential(nn.Conv2d(in_features, out_features, 1, stride, bias=False), nn.BatchNorm2d(out_features))


class ResNet(nn.Module):
  def __init__(self, block: type, stage_sizes: tuple[int, ...], num_classes: int):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, IMAGENET_STAGE_FEATURES[0], 7, 2, 3, bias=False),
                              nn.BatchNorm2d(IMAGENET_STAGE_FEATURES[0]), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    blocks, in_features = [], IMAGENET_STAGE_FEATURES[0]
    for stage, (count, features) in enumerate(zip(stage_sizes, IMAGENET_STAGE_FEATURES)):
      for index in range(count):
        blocks.append(block(in_features, features, 2 if stage > 0 and index == 0 else 1))
        in_features = features * block.expansion
    self.blocks = nn.Sequential(*blocks)
    self.classifier = nn.Linear(in_features, num_classes)

  def forward(self, x):
    return self.classifier(self.blocks(self.stem(x)).mean((2, 3)))


class LeNet5(nn.Module):
  def __init__(self, num_classes: int):
    super().__init__()
    self.c1, self.c3, self.c5 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5), nn.Conv2d(16, 120, 5)
    self.f6, self.classifier = nn.Linear(120, 84), nn.Linear(84, num_classes)

  def forward(self, x):
    x = F.avg_pool2d(torch.tanh(self.c1(x)), 2)
    x = F.avg_pool2d(torch.tanh(self.c3(x)), 2)
    x = torch.tanh(self.c5(x)).flatten(1)
    return self.classifier(torch.tanh(self.f6(x)))


def build(name: str, num_classes: int) -> nn.Module:
  """The PyTorch twin of a cnnjax registry name (the benchmarked subset)."""
  builders = {
      "resnet20": lambda: CifarResNet(3, num_classes),
      "resnet18": lambda: ResNet(BasicBlock, (2, 2, 2, 2), num_classes),
      "resnet50": lambda: ResNet(Bottleneck, (3, 4, 6, 3), num_classes),
      "lenet5": lambda: LeNet5(num_classes),
  }
  if name not in builders:
    raise KeyError(f"no PyTorch reference for {name!r}; references exist for {', '.join(builders)}")
  return builders[name]()


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def time_train_step(name: str, *, batch: int, input_shape: tuple[int, int, int], num_classes: int,
                    channels_last: bool, threads: int, warmup_steps: int, timed_steps: int,
                    learning_rate: float = 0.1, momentum: float = 0.9, seed: int = 0) -> dict[str, Any]:
  """Median train-step time of the PyTorch twin, eager, optionally in channels_last memory format.

  Runs on the first CUDA GPU when PyTorch sees one (synchronizing before each
  clock read), else on the CPU with `threads` threads.
  """
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = build(name, num_classes).to(device)
  height, width, channels = input_shape
  inputs = torch.randn(batch, channels, height, width, device=device)
  labels = torch.randint(0, num_classes, (batch,), device=device)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    inputs = inputs.contiguous(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
  model.train()

  def step():
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs), labels).backward()
    optimizer.step()

  def synchronize():
    if device.type == "cuda":
      torch.cuda.synchronize(device)

  for _ in range(warmup_steps):
    step()
  synchronize()
  durations = []
  for _ in range(timed_steps):
    start = time.perf_counter()
    step()
    synchronize()
    durations.append(time.perf_counter() - start)
  median = statistics.median(durations)
  return {"median_step_seconds": median, "images_per_second": batch / median, "params": count_params(model),
          "threads": threads, "device": str(device), "torch_version": torch.__version__}
