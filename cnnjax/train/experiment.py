"""From a config to an `Experiment`: everything a run is made of, built and checked before any file is written.

`build(config)` opens the dataset, resolves the parallel strategy
(`cnnjax.parallel`), turns `model.bn_sync` into the one `BatchNormGrouping` its
BatchNorm layers apply (`cnnjax.nn.bn_sync`), builds the model and optimizer,
and binds them into the pure train and eval steps (`cnnjax.train.step`). The
strategy compiles those steps; the loop (`cnnjax.train.loop`) runs them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from cnnjax import config as config_lib
from cnnjax import data as data_lib
from cnnjax.data import gpu_decode, resident
from cnnjax import optim, parallel
from cnnjax.errors import ConfigError
from cnnjax.models import build_model
from cnnjax.models.validation import InputTooSmallError, TooLargeError, check_input_shape, check_memory
from cnnjax.nn import BatchNormGrouping, RenormClipping, bn_sync
from cnnjax.parallel.host_devices import HostDevices
from cnnjax.nn.norm import BatchNorm
from cnnjax.train.state import TrainState, create_train_state
from cnnjax.train.step import eval_step, train_step


# The TrainState's step counter is an int32.
MAX_STEPS = 2 ** 31 - 1


@dataclasses.dataclass
class Experiment:
  """Everything a run is made of, built and checked from a config."""

  config: ml_collections.ConfigDict
  dataset: data_lib.Dataset
  preprocess: data_lib.Preprocess
  input_shape: tuple[int, ...]  # one example: (H, W, C), (D, H, W, C) or (L,)
  model: nn.Module
  tx: optax.GradientTransformation
  schedule_shape: Callable[[jax.Array], jax.Array]  # the learning-rate schedule's shape, step -> factor
  strategy: parallel.Strategy
  total_steps: int
  train_slice: data_lib.ProcessSlice
  eval_slice: data_lib.ProcessSlice
  placement: parallel.Resolved  # what `parallel.strategy` came to, and the devices present
  data_placement: resident.Placement  # where the train and eval splits live
  host: HostDevices  # the process's CPU devices (and whether cnnjax chose their count), GPU determinism
  bn_groups: str  # which examples BatchNorm normalizes over, in words
  # The pure steps of this run, (state, batch) -> ..., with the model, optimizer, loss settings and the
  # strategy's device axis bound: what the strategy compiles (`cnnjax.parallel.Run`).
  train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
  eval_step: Callable[..., dict[str, jax.Array]]
  # (batch, resident data or None) -> (model inputs, labels): the device stage of preprocessing.
  model_batch: Callable[..., tuple[jax.Array, jax.Array]]
  # Who decodes images read encoded, host or gpu (`data.decoder`), and why.
  decoder: tuple[str, str] = (gpu_decode.HOST, "as set")

  def describe(self) -> str:
    """One line of what runs where: backend, devices, processes, strategy, BatchNorm, batches, data, steps."""
    device = self.strategy.layout.devices[0]
    devices = self.strategy.layout.num_devices
    strategy = self.strategy.name + (f" ({parallel.AUTO})" if self.placement.automatic else "")
    host = self.host.describe(device.platform)
    return (f"{device.platform} ({device.device_kind}{'; ' + host if host else ''}): {devices} of "
            f"{self.placement.available} devices, {jax.process_count()} process(es) | strategy {strategy} | "
            f"bn_sync {self.config.model.bn_sync} ({self.bn_groups}) | batch {self.config.batch_size} global, "
            f"{self.strategy.layout.per_device_batch} per device | {len(self.dataset.train)} train / "
            f"{len(self.dataset.eval)} eval examples | {self.total_steps} steps | data on the "
            f"{self.data_placement.describe()}{self._describe_host_workers()}")

  def _describe_host_workers(self) -> str:
    if self.data_placement.train_on_device and self.data_placement.eval_on_device:
      return ""  # no host batches
    workers, threads, why = self.host_workers()
    decoder = (f" | images decoded on the {self.decoder[0]} ({self.decoder[1]})"
               if hasattr(self.dataset.train, "read_encoded") else "")
    return (f" | host batches in {workers} worker process(es) x {threads} thread(s)" if workers else
            f" | host batches in {threads} thread(s)") + f" ({why})" + decoder

  def init_state(self) -> TrainState:
    return create_train_state(self.config.seed, self.model, self.tx, self.input_shape)

  def train_step_fn(self) -> Callable[..., Any]:
    """The train step as the run's strategy compiles it, for stepping a run by hand on host batches
    (tests, benchmarks)."""
    return self.strategy.compile_train(self.train_step)

  def model_inputs(self, batch: dict[str, Any]) -> jax.Array:
    """The model inputs of a host batch (`train_batches`, `eval_batches`), finished as the steps do."""
    return jax.jit(self.model_batch)(parallel.device_part(batch), None)[0]

  def train_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """The host path's training batches (host stage done), from step 0; `set_state` moves them."""
    dataset = data_lib.train_dataset(self.dataset.train, self.preprocess, seed=self.config.seed,
                                     batch=self.train_slice, num_steps=self.total_steps, plan_only=self.gpu_decodes)
    return self._iterate(dataset, plans=self.gpu_decodes)

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """The host path's eval batches (host stage done)."""
    plans = self.gpu_decodes and hasattr(self.dataset.eval, "read_encoded")
    dataset = data_lib.eval_dataset(self.dataset.eval, self.preprocess, batch=self.eval_slice, plan_only=plans)
    return self._iterate(dataset, plans=plans)

  @property
  def gpu_decodes(self) -> bool:
    return self.decoder[0] == gpu_decode.GPU

  def host_workers(self) -> tuple[int, int, str]:
    """(worker processes, threads in each, why) preparing the host path's batches (`data.num_workers`)."""
    # Records are decoded per batch, on the host unless the GPU decodes them.
    decodes = data_lib.decodes_per_read(self.dataset.train) and not self.gpu_decodes
    example_bytes = math.prod(self.input_shape) * np.dtype(np.uint8).itemsize  # host batches are uint8
    return data_lib.host_workers(self.config.data.num_workers, self.config.data.num_threads, decodes=decodes,
                                 cores=data_lib.usable_cores(), shared_memory=data_lib.shared_memory_free(),
                                 batch_bytes=self.train_slice.local_batch * example_bytes)

  def _iterate(self, dataset: Any, *, plans: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's batches; `plans` (for the GPU decoder) are decoded on the devices as they are taken."""
    workers, threads, _ = self.host_workers()
    batches = data_lib.iterate(dataset, num_threads=threads, prefetch=self.config.data.prefetch_batches,
                               num_workers=workers)
    if not plans:
      return batches
    decoder = gpu_decode.DeviceDecoder(self.strategy.layout.local_devices, self.preprocess.image_size,
                                       self.dataset.image_shape[-1], gpu_decode.gpu_windows())
    return gpu_decode.DecodedBatches(batches, decoder)

  def train_feed(self) -> Any:
    """What the loop steps on: plans into the resident split (`block`), or the host path's batches."""
    if self.data_placement.train_on_device:
      return resident.TrainPlans(len(self.dataset.train), self.preprocess, seed=self.config.seed,
                                 batch=self.train_slice)
    return self.train_batches()

  def eval_feed(self) -> Iterable[dict[str, np.ndarray]]:
    """The eval batches the loop evaluates on: plans into the resident eval split, or host batches."""
    if self.data_placement.eval_on_device:
      return resident.eval_plans(len(self.dataset.eval), self.eval_slice)
    return self.eval_batches()

  def resident_data(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The (train, eval) arrays to place on the devices: empty for a split that stays on the host."""
    train = resident.split_arrays(self.dataset.train) if self.data_placement.train_on_device else {}
    evaluation = resident.split_arrays(self.dataset.eval) if self.data_placement.eval_on_device else {}
    return train, evaluation


def batchnorm_positions(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
  """{layer path: positions per example (the product of its spatial sizes; 1 after flattening)} of each of
  the model's BatchNorm layers, from an abstract trace (no compute)."""
  positions: dict[str, int] = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNorm) and context.method_name == "__call__" and args:
      positions["/".join(context.module.scope.path)] = math.prod(args[0].shape[1:-1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(input_shape)), train=False))
  return positions


def check_running_variance(config: ml_collections.ConfigDict, model: nn.Module, input_shape: Sequence[int],
                           grouping: bn_sync.BatchNormGrouping, step_batch: int, num_devices: int,
                           bn_groups: str) -> None:
  """ConfigError where `model.bn_running_variance=unbiased` meets a BatchNorm layer whose statistics group
  holds one value per channel (its m / (m - 1) divides by zero), so that the run is refused before anything
  is written rather than at its first step. A group holds its examples (`grouping`'s, else the batch the
  step sees, `step_batch`) on each device it spans, times the layer's positions, as `BatchNorm` counts."""
  if config.model.bn_running_variance != "unbiased":
    return
  examples = grouping.examples_per_group or step_batch
  if grouping.axis_name is not None and grouping.devices_per_group != 1:
    examples *= grouping.devices_per_group or num_devices
  for layer, positions in batchnorm_positions(model, input_shape).items():
    if examples * positions < 2:
      raise ConfigError(
          f"model.bn_running_variance=unbiased needs at least 2 values per channel in each BatchNorm group, but "
          f"BatchNorm layer {layer} normalizes {bn_groups}: {examples} example(s) of {positions} position(s); "
          "use model.bn_running_variance=biased, or larger groups (a larger batch_size, model.bn_sync=global, "
          "or a larger model.bn_group_size)")


def warn_past_the_run(config: ml_collections.ConfigDict, total_steps: int) -> None:
  """Warns, one line each, of settings that reach past the run's `total_steps` steps and so would do less
  than they say without a word: a learning-rate warmup that never ends, a profile window after the last
  step (nothing traced) or across it (traced only up to it)."""
  logger = logging.getLogger("cnnjax")
  warmup = config.optimizer.warmup_steps
  if warmup >= total_steps:
    logger.warning("optimizer.warmup_steps=%d is not shorter than the run's %d steps: the learning rate rises "
                   "for the whole run and never reaches optimizer.learning_rate=%g; lower optimizer.warmup_steps",
                   warmup, total_steps, config.optimizer.learning_rate)
  start, count = (int(value) for value in config.profile_steps)
  if count and start >= total_steps:
    logger.warning("profile_steps=%d,%d traces steps %d-%d, after the run's last step %d: no profile will be "
                   "written; choose a START below %d", start, count, start + 1, start + count, total_steps, total_steps)
  elif count and start + count > total_steps:
    logger.warning("profile_steps=%d,%d reaches past the run's last step %d: only steps %d-%d will be traced",
                   start, count, total_steps, start + 1, total_steps)


def _dtype(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def planned_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """The steps a run of `config` takes: `num_train_steps`, else `num_epochs` over the training split."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return max(1, math.ceil(config.num_epochs * num_train_examples / config.batch_size))


def total_steps(config: ml_collections.ConfigDict) -> int:
  """The steps a run of `config` takes, opening its dataset only when the epochs decide."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  dataset = data_lib.open_dataset(**dataset_options(config))
  return planned_steps(config, len(dataset.train))


def dataset_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The keyword arguments of `data.open_dataset` for `config`."""
  return dict(name=config.data.name, tfds_data_dir=config.data.tfds_data_dir,
              train_split=config.data.train_split, eval_split=config.data.eval_split,
              train_path=config.data.train_path, eval_path=config.data.eval_path,
              num_classes=config.data.num_classes, vocab_size=config.data.vocab_size,
              max_length=config.data.max_length, cache_megabytes=config.data.cache_megabytes)


def check_init_from(config: ml_collections.ConfigDict) -> None:
  """ConfigError unless `init_from` is '' or a file. Only a run that starts from scratch reads it, so only
  such a run checks it (before writing anything): a resumed run's checkpoints hold its weights, and a
  deleted weights file must not stop it, nor evaluating or exporting it."""
  if config.init_from and not os.path.isfile(os.path.expanduser(config.init_from)):
    raise ConfigError(f"init_from={config.init_from!r} is not a file; download the torchvision weights it names "
                      "(see the experiment's docstring), or pass --config.init_from= to start from scratch")


def make_preprocess(config: ml_collections.ConfigDict, dataset: data_lib.Dataset
                    ) -> tuple[data_lib.Preprocess, tuple[int, ...]]:
  """The run's preprocessing of `dataset`, and the per-example input shape the model is built for."""
  augment = data_lib.Augment(crop_padding=config.data.crop_padding, flip=config.data.flip,
                             rotation_degrees=config.data.rotation_degrees)
  # (H, W, C) images, (D, H, W, C) volumes or (L,) token ids, after resizing.
  input_shape = dataset.model_input_shape(config.data.image_size, augmented=augment.enabled,
                                          random_resized_crop=config.data.random_resized_crop)
  preprocess = data_lib.Preprocess(
      image_size=config.data.image_size, mean=dataset.mean, std=dataset.std, seed=config.seed,
      random_resized_crop=config.data.random_resized_crop, augment=augment, task=dataset.task,
      mask_fill=dataset.background_class)
  return preprocess, input_shape


def make_model(config: ml_collections.ConfigDict, dataset: data_lib.Dataset,
               grouping: BatchNormGrouping = BatchNormGrouping()) -> nn.Module:
  """The run's model for `dataset`'s classes (and vocabulary), its BatchNorm layers applying `grouping`
  (which only training uses)."""
  norm_options = dict(momentum=config.model.bn_momentum, epsilon=config.model.bn_epsilon,
                      running_variance=config.model.bn_running_variance,
                      group_norm_groups=config.model.group_norm_groups, grouping=grouping,
                      renorm=RenormClipping(
                          rmax=config.model.renorm_rmax, dmax=config.model.renorm_dmax,
                          warmup_steps=config.model.renorm_warmup_steps, rmax_steps=config.model.renorm_rmax_steps,
                          dmax_steps=config.model.renorm_dmax_steps))
  try:
    return build_model(config.model.name, num_classes=dataset.num_classes, norm_kind=config.model.norm,
                       norm_options=norm_options, dtype=_dtype(config.model.dtype), lowering=config.model.lowering,
                       **{**config_lib.model_options(config), **dataset.model_options})
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e).splitlines()[0]) from None


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """The run's optimizer for `num_steps` steps, and its learning-rate schedule's shape."""
  shape = optim.schedule_shape(config.optimizer.schedule, total_steps=num_steps,
                               warmup_steps=config.optimizer.warmup_steps,
                               decay_boundaries=tuple(config.optimizer.decay_boundaries),
                               decay_factor=config.optimizer.decay_factor)
  tx = optim.make_optimizer(config.optimizer.name, learning_rate=config.optimizer.learning_rate,
                            weight_decay=config.optimizer.weight_decay, shape=shape,
                            momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov,
                            b1=config.optimizer.b1, b2=config.optimizer.b2, eps=config.optimizer.eps)
  return tx, shape


def data_record(exp: Experiment) -> dict[str, Any]:
  """What a run records of its data when it starts (`dataset.json`), so that its model can be rebuilt and
  applied to new images without the dataset (`cnnjax.train.restore.recorded_dataset`): the class names,
  shapes, normalization and training split size."""
  dataset = exp.dataset
  return {"name": dataset.name, "num_classes": dataset.num_classes, "class_names": list(dataset.class_names) or None,
          "task": dataset.task, "image_shape": list(dataset.image_shape), "input_shape": list(exp.input_shape),
          "mean": list(dataset.mean), "std": list(dataset.std), "background_class": dataset.background_class,
          "vocab_size": dataset.vocab_size, "train_examples": len(dataset.train)}


def build(config: ml_collections.ConfigDict, *, devices: Sequence[Any] | None = None,
          host: HostDevices = HostDevices()) -> Experiment:
  """Validates `config` and builds the run; raises a CnnjaxError on any bad input. Writes nothing.

  `host` says how many CPU devices the process started with and whether cnnjax
  chose that number (see `cnnjax.parallel.host_devices`).
  """
  config_lib.validate(config)
  process_count = jax.process_count()
  try:
    eval_batch = config.eval_batch_size or config.batch_size
    placement = parallel.resolve(config.parallel.strategy, config.parallel.num_devices,
                                 (config.batch_size, eval_batch), devices)
    selected = placement.devices
    parallel.check_divisible(config.batch_size, len(selected), process_count, "batch_size")
    parallel.check_divisible(eval_batch, len(selected), process_count,
                             "eval_batch_size" if config.eval_batch_size else "batch_size (used for eval)")
    strategy = parallel.make(placement.strategy, parallel.Layout(selected, config.batch_size))
    grouping, bn_groups = bn_sync.grouping_for_run(
        config.model.bn_sync, config.model.bn_group_size, per_device_view=strategy.per_device_view,
        axis_name=strategy.axis_name, num_devices=len(selected), global_batch=config.batch_size,
        process_count=process_count, automatic_cpu_devices=host.automatic and selected[0].platform == "cpu")
  except ValueError as e:
    raise ConfigError(str(e)) from None

  dataset = data_lib.open_dataset(**dataset_options(config))
  if config.batch_size > len(dataset.train):
    raise ConfigError(f"batch_size={config.batch_size} exceeds the {len(dataset.train)} training examples of "
                      f"{config.data.name}; use a batch_size of at most {len(dataset.train)}")
  if config.keep_best_metric == "eval_mean_iou" and dataset.task != "segmentation":
    raise ConfigError(f"keep_best_metric=eval_mean_iou is for segmentation, and {config.data.name} is "
                      f"{dataset.task}; use eval_accuracy or eval_loss")
  if dataset.num_classes < 2:
    logging.getLogger("cnnjax").warning(
        "%s has %d class: every prediction is right, so its accuracy of 100%% says nothing; check the labels "
        "(or data.num_classes)", config.data.name, dataset.num_classes)
  preprocess, input_shape = make_preprocess(config, dataset)
  model = make_model(config, dataset, grouping)
  num_steps = planned_steps(config, len(dataset.train))
  if num_steps > MAX_STEPS:
    raise ConfigError(f"the run would take {num_steps} steps, more than the step counter holds ({MAX_STEPS}); "
                      "lower num_epochs or num_train_steps")
  tx, shape = make_optimizer(config, num_steps)
  try:
    # CPU devices of one process share its RAM: each holds its own copy of a resident split there.
    local_devices = strategy.layout.local_devices
    data_placement = resident.choose(
        config.data.placement, config.data.device_megabytes, dataset, preprocess,
        copies_per_memory=len(local_devices) if local_devices[0].platform == "cpu" else 1)
    check_input_shape(model, input_shape, config.model.name)
    check_running_variance(config, model, input_shape, grouping, strategy.layout.per_device_batch
                           if strategy.per_device_view else config.batch_size, len(selected), bn_groups)
    check_memory(model, tx, input_shape, strategy.layout.per_device_batch, selected)
    # Evaluation holds the activations of its own batch (no gradients): a larger one is checked too, naming
    # its own key.
    if eval_batch // len(selected) > strategy.layout.per_device_batch:
      check_memory(model, tx, input_shape, eval_batch // len(selected), selected, step="evaluation step",
                   batch_key="eval_batch_size")
  except (InputTooSmallError, TooLargeError) as e:
    raise ConfigError(str(e)) from None
  model_batch = functools.partial(resident.model_batch, preprocess)
  decoder = gpu_decode.choose(config.data.decoder, platform=selected[0].platform,
                              device_kind=selected[0].device_kind, decodes=hasattr(dataset.train, "read_encoded"))
  return Experiment(
      config=config, dataset=dataset, preprocess=preprocess, input_shape=input_shape,
      model=model, tx=tx, schedule_shape=shape, strategy=strategy,
      total_steps=num_steps, placement=placement, data_placement=data_placement, host=host, bn_groups=bn_groups,
      model_batch=model_batch, decoder=decoder,
      train_step=functools.partial(train_step, model_batch=model_batch, model=model, tx=tx, schedule_shape=shape,
                                   label_smoothing=config.label_smoothing, axis_name=strategy.axis_name),
      eval_step=functools.partial(eval_step, model_batch=model_batch, model=model, axis_name=strategy.axis_name),
      train_slice=data_lib.ProcessSlice(config.batch_size, jax.process_index(), process_count),
      eval_slice=data_lib.ProcessSlice(eval_batch, jax.process_index(), process_count))
