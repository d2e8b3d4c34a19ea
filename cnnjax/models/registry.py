"""The model registry: every name a config's `model.name` can take.

Each entry is a constructor taking `num_classes`, `norm`, `act`, `dtype` and the
family's own options. `tests/test_models.py` pins the trainable parameter count
of every name here and fails when a name has no pinned count.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from flax import linen as nn

from cnnjax.models import alexnet, googlenet, lenet, mlp, resnet, simple_cnn, text_cnn, unet, vgg
from cnnjax.nn import Norm, get_activation
from cnnjax.nn import lowering as lowering_lib

BATCH_NORM = Norm(kind="batch")

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp.MLP,
    "simple_cnn": simple_cnn.SimpleCNN,
    "lenet5": lenet.LeNet5,
    "resnet20": functools.partial(resnet.CifarResNet, blocks_per_stage=3),
    "resnet32": functools.partial(resnet.CifarResNet, blocks_per_stage=5),
    "resnet44": functools.partial(resnet.CifarResNet, blocks_per_stage=7),
    "resnet56": functools.partial(resnet.CifarResNet, blocks_per_stage=9),
    "resnet110": functools.partial(resnet.CifarResNet, blocks_per_stage=18),
    "resnet18": functools.partial(resnet.ResNet, stage_sizes=(2, 2, 2, 2)),
    "resnet34": functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3)),
    "resnet50": functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True),
    "resnet101": functools.partial(resnet.ResNet, stage_sizes=(3, 4, 23, 3), bottleneck=True),
    "resnet152": functools.partial(resnet.ResNet, stage_sizes=(3, 8, 36, 3), bottleneck=True),
    # The plain baselines of He et al. 2015 (Figure 6): ResNet-20/56 without their shortcuts.
    "plain20": functools.partial(resnet.CifarResNet, blocks_per_stage=3, residual=False),
    "plain56": functools.partial(resnet.CifarResNet, blocks_per_stage=9, residual=False),
    "alexnet": alexnet.AlexNet,
    **{name: functools.partial(vgg.VGG, stage_sizes=stages) for name, stages in vgg.VGG_STAGES.items()},
    **{f"{name}_bn": functools.partial(vgg.VGG, stage_sizes=stages, norm=BATCH_NORM)
       for name, stages in vgg.VGG_STAGES.items()},
    "googlenet": googlenet.GoogLeNet,
    "unet": unet.UNet,
    "unet3d": functools.partial(unet.UNet, ndim=3, features=(32, 64, 128, 256), norm=BATCH_NORM),
    "text_cnn": text_cnn.TextCNN,
}


def get_model_constructor(name: str) -> Callable[..., nn.Module]:
  """Returns the registered constructor, or raises naming the choices."""
  if name not in MODELS:
    raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
  return MODELS[name]


def build_model(name: str, *, num_classes: int, norm_kind: str = "", norm_options: dict[str, Any] | None = None,
                dtype: Any = None, lowering: str = lowering_lib.AUTO, **options: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: registry name.
    num_classes: size of the classifier.
    norm_kind: 'batch', 'group', 'layer', 'none', or '' for the architecture's own
      normalization (BatchNorm for ResNets, GoogLeNet, the `_bn` VGGs and unet3d; none
      for LeNet-5, the MLP, AlexNet, VGG, unet and text_cnn).
    norm_options: fields of `cnnjax.nn.Norm` other than `kind` (momentum, epsilon,
      BatchNorm statistic groups); those not given keep the architecture's own
      (GoogLeNet's epsilon is 1e-3).
    dtype: compute dtype; parameters and BatchNorm statistics stay float32.
    lowering: how convolutions and max/min pooling are computed: 'auto', 'plain'
      or 'cpu_tuned' (`cnnjax.nn.lowering`); models without either (the MLP)
      have nothing to lower and ignore it.
    **options: the family's own fields (e.g. `dropout_rate`), and `activation` by name.
  """
  constructor = get_model_constructor(name)
  if "activation" in options:
    options["act"] = get_activation(options.pop("activation"))
  if dtype is not None:
    options["dtype"] = dtype
  try:
    model = constructor(num_classes=num_classes, **options)
  except TypeError as e:
    raise TypeError(f"model {name!r} does not accept these options {sorted(options)}: {e}") from None
  norm = model.norm
  kind = norm_kind or norm.kind
  lowered = {"lowering": lowering_lib.check(lowering)} if hasattr(model, "lowering") else {}
  return model.clone(norm=dataclasses.replace(norm, kind=kind, dtype=model.dtype, **(norm_options or {})), **lowered)
