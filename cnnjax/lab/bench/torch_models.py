"""The benchmark's PyTorch reference: the same architectures as cnnjax's, and their train step.

Written here (not taken from torchvision) so that both sides compute the same
thing: ResNet-20 with option-A shortcuts and LeNet-5 (tanh, average pooling),
each with cnnjax's normalization placement, trained with the same step
(forward, softmax cross-entropy, backward, SGD with momentum). The ImageNet
ResNets, VGG (with and without BatchNorm), AlexNet and GoogLeNet follow
torchvision's layouts down to the module names, so their `state_dict()` has
the keys and shapes of torchvision's weight files: the tests of
`cnnjax.models.torchvision_import` build such files from them, since
torchvision itself is not needed. PyTorch is an optional extra (`pip install
'.[torch]'`); importing this module without it raises ImportError.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_STAGE_FEATURES = (16, 32, 64)
IMAGENET_STAGE_FEATURES = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
RESNET_STAGES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3),
                 "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
BOTTLENECK_RESNETS = ("resnet50", "resnet101", "resnet152")
VGG_STAGES = {"vgg11": (1, 1, 2, 2, 2), "vgg13": (2, 2, 2, 2, 2), "vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
VGG_STAGE_FEATURES = (64, 128, 256, 512, 512)
VGG_GRID, VGG_CLASSIFIER_FEATURES = 7, 4096
ALEXNET_GRID, ALEXNET_CLASSIFIER_FEATURES = 6, 4096
GOOGLENET_BN_EPSILON = 1e-3
# (name, (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection)) of torchvision's Inception modules.
GOOGLENET_MODULES = (
    ("3a", (64, 96, 128, 16, 32, 32)), ("3b", (128, 128, 192, 32, 96, 64)),
    ("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)),
    ("4c", (128, 128, 256, 24, 64, 64)), ("4d", (112, 144, 288, 32, 64, 64)),
    ("4e", (256, 160, 320, 32, 128, 128)),
    ("5a", (256, 160, 320, 32, 128, 128)), ("5b", (384, 192, 384, 48, 128, 128)),
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
    self.bn1 = nn.BatchNorm2d(features)
    self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(features)
    self.downsample = _projection(in_features, features, stride)

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = BOTTLENECK_EXPANSION

  def __init__(self, in_features: int, features: int, stride: int):
    super().__init__()
    out_features = features * self.expansion
    self.conv1 = nn.Conv2d(in_features, features, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(features)
    self.conv2 = nn.Conv2d(features, features, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(features)
    self.conv3 = nn.Conv2d(features, out_features, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_features)
    self.downsample = _projection(in_features, out_features, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    return F.relu(self.bn3(self.conv3(y)) + (x if self.downsample is None else self.downsample(x)))


def _projection(in_features: int, out_features: int, stride: int) -> nn.Module | None:
  if in_features == out_features and stride == 1:
    return None
  return nn.Sequential(nn.Conv2d(in_features, out_features, 1, stride, bias=False), nn.BatchNorm2d(out_features))


class ResNet(nn.Module):
  """torchvision's ResNet, module names included (conv1, bn1, layer1..layer4, fc)."""

  def __init__(self, block: type, stage_sizes: tuple[int, ...], num_classes: int):
    super().__init__()
    self.conv1 = nn.Conv2d(3, IMAGENET_STAGE_FEATURES[0], 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(IMAGENET_STAGE_FEATURES[0])
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    in_features = IMAGENET_STAGE_FEATURES[0]
    for stage, (count, features) in enumerate(zip(stage_sizes, IMAGENET_STAGE_FEATURES)):
      blocks = []
      for index in range(count):
        blocks.append(block(in_features, features, 2 if stage > 0 and index == 0 else 1))
        in_features = features * block.expansion
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.fc = nn.Linear(in_features, num_classes)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    for stage in range(1, self.num_stages + 1):
      x = getattr(self, f"layer{stage}")(x)
    return self.fc(x.mean((2, 3)))


class VGG(nn.Module):
  """torchvision's VGG: `features` (conv, [BatchNorm,] ReLU per layer, max pool per stage), `classifier`."""

  def __init__(self, stage_sizes: tuple[int, ...], num_classes: int, batch_norm: bool,
               classifier_features: int = VGG_CLASSIFIER_FEATURES):
    super().__init__()
    layers, in_features = [], 3
    for convs, features in zip(stage_sizes, VGG_STAGE_FEATURES):
      for _ in range(convs):
        layers.append(nn.Conv2d(in_features, features, 3, padding=1))
        layers.extend([nn.BatchNorm2d(features)] if batch_norm else [])
        layers.append(nn.ReLU(inplace=True))
        in_features = features
      layers.append(nn.MaxPool2d(2, 2))
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d(VGG_GRID)
    self.classifier = nn.Sequential(
        nn.Linear(in_features * VGG_GRID * VGG_GRID, classifier_features), nn.ReLU(True), nn.Dropout(),
        nn.Linear(classifier_features, classifier_features), nn.ReLU(True), nn.Dropout(),
        nn.Linear(classifier_features, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class AlexNet(nn.Module):
  """torchvision's AlexNet: `features` (five convolutions, three max pools), `classifier`."""

  def __init__(self, num_classes: int, classifier_features: int = ALEXNET_CLASSIFIER_FEATURES):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2))
    self.avgpool = nn.AdaptiveAvgPool2d(ALEXNET_GRID)
    self.classifier = nn.Sequential(
        nn.Dropout(), nn.Linear(256 * ALEXNET_GRID * ALEXNET_GRID, classifier_features), nn.ReLU(True),
        nn.Dropout(), nn.Linear(classifier_features, classifier_features), nn.ReLU(True),
        nn.Linear(classifier_features, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicConv2d(nn.Module):
  """GoogLeNet's conv (no bias) -> BatchNorm (epsilon 1e-3) -> ReLU."""

  def __init__(self, in_features: int, features: int, kernel: int, stride: int = 1):
    super().__init__()
    self.conv = nn.Conv2d(in_features, features, kernel, stride, kernel // 2, bias=False)
    self.bn = nn.BatchNorm2d(features, eps=GOOGLENET_BN_EPSILON)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
  def __init__(self, in_features: int, widths: tuple[int, ...]):
    super().__init__()
    ones, reduce3, threes, reduce5, fives, projection = widths
    self.branch1 = BasicConv2d(in_features, ones, 1)
    self.branch2 = nn.Sequential(BasicConv2d(in_features, reduce3, 1), BasicConv2d(reduce3, threes, 3))
    # torchvision's "5x5" branch has a 3x3 kernel, as cnnjax's googlenet does by default.
    self.branch3 = nn.Sequential(BasicConv2d(in_features, reduce5, 1), BasicConv2d(reduce5, fives, 3))
    self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(in_features, projection, 1))

  def forward(self, x):
    return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
  """An auxiliary head: its weights are in torchvision's GoogLeNet files; cnnjax has no such head."""

  def __init__(self, in_features: int, num_classes: int):
    super().__init__()
    self.conv = BasicConv2d(in_features, 128, 1)
    self.fc1 = nn.Linear(2048, 1024)
    self.fc2 = nn.Linear(1024, num_classes)


class GoogLeNet(nn.Module):
  """torchvision's GoogLeNet with its module names; the auxiliary heads exist for their weights only."""

  def __init__(self, num_classes: int, transform_input: bool = False, aux_logits: bool = False):
    super().__init__()
    self.transform_input = transform_input
    self.conv1 = BasicConv2d(3, 64, 7, 2)
    self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.conv2 = BasicConv2d(64, 64, 1)
    self.conv3 = BasicConv2d(64, 192, 3)
    self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
    in_features = 192
    for name, widths in GOOGLENET_MODULES:
      setattr(self, f"inception{name}", Inception(in_features, widths))
      in_features = widths[0] + widths[2] + widths[4] + widths[5]
    self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
    if aux_logits:
      self.aux1 = InceptionAux(512, num_classes)
      self.aux2 = InceptionAux(528, num_classes)
    self.dropout = nn.Dropout(0.2)
    self.fc = nn.Linear(in_features, num_classes)

  def forward(self, x):
    if self.transform_input:
      mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
      std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
      x = (x * std + mean - 0.5) / 0.5
    x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
    for name, _ in GOOGLENET_MODULES:
      x = getattr(self, f"inception{name}")(x)
      if name == "3b":
        x = self.maxpool3(x)
      elif name == "4e":
        x = self.maxpool4(x)
    return self.fc(self.dropout(x.mean((2, 3))))


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


def build(name: str, num_classes: int, **options: Any) -> nn.Module:
  """The PyTorch twin of a cnnjax registry name; `options` go to the twin's constructor."""
  builders = {
      "resnet20": lambda: CifarResNet(3, num_classes),
      "lenet5": lambda: LeNet5(num_classes),
      "alexnet": lambda: AlexNet(num_classes, **options),
      "googlenet": lambda: GoogLeNet(num_classes, **options),
      **{name: functools.partial(ResNet, Bottleneck if name in BOTTLENECK_RESNETS else BasicBlock, stages,
                                 num_classes) for name, stages in RESNET_STAGES.items()},
      **{name: functools.partial(VGG, stages, num_classes, False, **options) for name, stages in VGG_STAGES.items()},
      **{f"{name}_bn": functools.partial(VGG, stages, num_classes, True, **options)
         for name, stages in VGG_STAGES.items()},
  }
  if name not in builders:
    raise KeyError(f"no PyTorch reference for {name!r}; references exist for {', '.join(builders)}")
  return builders[name]()


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def time_train_step(name: str, *, batch: int, input_shape: tuple[int, int, int], num_classes: int,
                    channels_last: bool, threads: int, warmup_steps: int, timed_steps: int,
                    learning_rate: float = 0.1, momentum: float = 0.9, seed: int = 0,
                    autocast_dtype: str | None = None, compiled: bool = False) -> dict[str, Any]:
  """Median train-step time of the PyTorch twin, eager, optionally in channels_last memory format.

  Runs on the first CUDA GPU when PyTorch sees one (synchronizing before each
  clock read), else on the CPU with `threads` threads. `autocast_dtype`
  ('bfloat16', 'float16') runs the forward pass and the loss under
  `torch.autocast` (mixed precision with float32 weights: PyTorch's AMP);
  `compiled` trains `torch.compile(model)`. The first warm-up step's time is
  returned as `first_step_seconds` (compilation included), and CUDA's peak
  allocated memory over all steps as `peak_device_memory_mb` (None on the CPU).
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
  forward = torch.compile(model) if compiled else model

  def step():
    optimizer.zero_grad(set_to_none=True)
    with (torch.autocast(device.type, dtype=getattr(torch, autocast_dtype)) if autocast_dtype
          else contextlib.nullcontext()):
      loss = F.cross_entropy(forward(inputs), labels)
    loss.backward()
    optimizer.step()

  def synchronize():
    if device.type == "cuda":
      torch.cuda.synchronize(device)

  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  warmup_durations = []
  for _ in range(warmup_steps):
    start = time.perf_counter()
    step()
    synchronize()
    warmup_durations.append(time.perf_counter() - start)
  durations = []
  for _ in range(timed_steps):
    start = time.perf_counter()
    step()
    synchronize()
    durations.append(time.perf_counter() - start)
  median = statistics.median(durations)
  peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
  return {"median_step_seconds": median, "images_per_second": batch / median, "params": count_params(model),
          "threads": threads, "device": str(device), "torch_version": torch.__version__,
          "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
          "first_step_seconds": warmup_durations[0] if warmup_durations else None,
          "peak_device_memory_mb": peak, "autocast_dtype": autocast_dtype, "compiled": compiled,
          "channels_last": channels_last}
