"""The shared configuration schema and its validation.

Every experiment file starts from `base_config()` and sets what it needs. The
keys here are the ones other tools rely on (`model.name`, `data.name`,
`batch_size`, `num_epochs`, `num_train_steps`, `seed`,
`optimizer.learning_rate`, `parallel.strategy`, `model.bn_sync`, ...). Keys that
an experiment adds under `model` are options of its model family (for example
`model.dropout_rate`) and are passed to the model constructor.

`validate(config)` checks values that types cannot (a negative learning rate, an
unknown model name, a batch that does not divide over devices) and raises a
`ConfigError` with a one-line message before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import math

import ml_collections

from cnnjax.data import AUTO_WORKERS, DATASET_NAMES, is_dataset_name
from cnnjax.data.gpu_decode import DECODERS
from cnnjax.data.resident import PLACEMENTS
from cnnjax.errors import ConfigError
from cnnjax.models import MODELS
from cnnjax.nn import BN_SYNC_MODES, LOWERINGS, NORM_KINDS, RUNNING_VARIANCE_CONVENTIONS
from cnnjax.optim import OPTIMIZERS, SCHEDULES
from cnnjax.parallel import STRATEGIES

# Keys under `model` that the training code consumes; every other key is a model option.
MODEL_COMMON_KEYS = ("name", "norm", "bn_sync", "bn_group_size", "bn_momentum", "bn_epsilon",
                     "bn_running_variance", "renorm_rmax", "renorm_dmax", "renorm_warmup_steps",
                     "renorm_rmax_steps", "renorm_dmax_steps", "group_norm_groups", "dtype", "lowering")
DTYPES = ("float32", "bfloat16")


# The default budget for splits resident on each device: every dataset cnnjax names up to CIFAR-100
# (150 MB of uint8 images) with its eval split fits, and it is a small share of an accelerator's memory.
DEVICE_DATA_MEGABYTES = 1024


def base_config() -> ml_collections.ConfigDict:
  """Every shared key with its default; experiments override what they need."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 128  # global: over all devices and processes
  config.eval_batch_size = 0  # 0: the same as batch_size
  config.num_epochs = 10.0
  config.num_train_steps = 0  # > 0 overrides num_epochs
  config.label_smoothing = 0.0
  config.log_every_steps = 50
  config.eval_every_steps = 0  # 0: evaluate only at the end
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  # Also keep the checkpoint that scores best on this eval metric, beside the newest keep_checkpoints: one of
  # BEST_METRICS ('' : off). Every checkpoint is then scored, so checkpoint_every_steps must be a multiple
  # of eval_every_steps.
  config.keep_best_metric = ""
  config.progress_bar = True  # a tqdm bar on terminals; plain log lines otherwise or when False
  # A torchvision weights file (.pth or .safetensors) a fresh run starts from ('' : the model's own
  # initialization); see cnnjax.models.torchvision_import.
  config.init_from = ""
  config.init_from_replace_classifier = False  # a new classifier where the file's class count differs
  # (START, COUNT): a jax.profiler trace of the COUNT train steps after the first START, into the workdir
  # (cnnjax.train.profiling); COUNT 0: none. On the command line: --config.profile_steps=10,5
  config.profile_steps = (0, 0)

  config.model = ml_collections.ConfigDict()
  config.model.name = "lenet5"
  config.model.norm = ""  # '' keeps the architecture's own; or batch / group / layer / none
  config.model.bn_sync = "global"  # global / local / ghost: which examples BatchNorm normalizes over
  config.model.bn_group_size = 0  # examples per statistics group for bn_sync=ghost
  config.model.bn_momentum = 0.9
  config.model.bn_epsilon = 1e-5
  config.model.bn_running_variance = "biased"  # or unbiased (PyTorch's): the batch variance times m / (m - 1)
  # norm=renorm (Batch Renormalization, Ioffe 2017): r clipped to [1/rmax, rmax], d to [-dmax, dmax]; plain
  # BatchNorm (rmax 1, dmax 0) for the warmup steps, then each limit opens linearly until its step.
  config.model.renorm_rmax = 3.0
  config.model.renorm_dmax = 5.0
  config.model.renorm_warmup_steps = 0
  config.model.renorm_rmax_steps = 0
  config.model.renorm_dmax_steps = 0
  config.model.group_norm_groups = 32  # capped at gcd(groups, channels) per layer
  config.model.dtype = "float32"  # compute dtype; parameters and BatchNorm statistics stay float32
  # How convolutions and max/min pooling are computed (cnnjax.nn.lowering): auto (CPU rewrites on
  # CPU, plain lax elsewhere) / plain / cpu_tuned; the same function either way.
  config.model.lowering = "auto"

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.tfds_data_dir = ""  # '' : $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.train_split = "train"
  config.data.eval_split = ""  # '' : the dataset's test split
  config.data.train_path = ""  # npz only
  config.data.eval_path = ""  # npz only
  config.data.num_classes = 0  # npz only; 0 infers it from the labels
  config.data.image_size = 0  # resize to this square size; 0 keeps the source size
  config.data.random_resized_crop = False  # Inception-style crops (ImageNet); needs image_size
  config.data.crop_padding = 0  # random crop after zero padding by this many pixels; 0: off
  config.data.flip = False  # random horizontal flip
  config.data.rotation_degrees = 0.0  # random rotation in [-r, r] degrees; 0: off
  config.data.vocab_size = 20_000  # text only: vocabulary ids from the training split, padding and unknown included
  config.data.max_length = 256  # text only: tokens per example (longer ones cut, shorter ones padded)
  # Host threads preparing batches (in each worker process when there are some, except that the workers
  # num_workers=-1 starts have one thread each).
  config.data.num_threads = 4
  # Worker processes preparing batches, beside the threads (grain multiprocessing): 0 prepares them in this
  # process; AUTO_WORKERS (-1) chooses from the cores and whether the host decodes (`data.host_workers`).
  config.data.num_workers = AUTO_WORKERS
  config.data.cache_megabytes = 1024  # decode fixed-size image datasets into RAM once when they fit; 0: never
  config.data.prefetch_batches = 8
  # Where the splits live (cnnjax.data.resident): auto (on the devices when the preprocessing can run there
  # and the splits fit device_megabytes on every device, else on the host) / host / device.
  config.data.placement = "auto"
  config.data.device_megabytes = DEVICE_DATA_MEGABYTES
  # Who decodes images read encoded (cnnjax.data.gpu_decode): auto (the GPU, with nvImageCodec, on an NVIDIA
  # GPU where it is installed, else the host) / host / gpu.
  config.data.decoder = "auto"

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # sgd / adamw
  config.optimizer.learning_rate = 0.1  # peak learning rate
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 0.0  # never applied to norm scales or biases
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.schedule = "cosine"  # constant / cosine / piecewise
  config.optimizer.warmup_steps = 0
  config.optimizer.decay_boundaries = (0.5, 0.75)  # piecewise: fractions of training
  config.optimizer.decay_factor = 0.1  # piecewise: multiplier at each boundary

  config.parallel = ml_collections.ConfigDict()
  config.parallel.strategy = "auto"  # auto (none on one device, else jit on all) / none / pmap / shard_map / jit
  config.parallel.num_devices = 0  # 0: all devices
  # The most train steps one dispatch runs with a split on the devices (a loop on the devices); 0 chooses: 1
  # on CPUs, else cnnjax.train.loop.MAX_AUTO_STEPS_PER_DISPATCH. Host batches: always 1.
  config.parallel.steps_per_dispatch = 0
  return config


# The classic ImageNet recipe's fixed parts (Krizhevsky et al. 2012, He et al. 2016): 90 epochs of SGD
# with momentum on 224x224 Inception-style crops with flips, batch 256, the rate divided by 10 at each
# decay epoch.
IMAGENET_EPOCHS = 90
IMAGENET_BATCH = 256
IMAGENET_IMAGE_SIZE = 224
IMAGENET_INPUT_THREADS = 16
IMAGENET_MOMENTUM = 0.9
IMAGENET_WEIGHT_DECAY = 1e-4
IMAGENET_DECAY_FACTOR = 0.1
IMAGENET_LOG_EVERY = 100
IMAGENET_EVAL_EVERY = 5_000


def imagenet_config(model: str, *, learning_rate: float, decay_epochs: tuple[int, ...]) -> ml_collections.ConfigDict:
  """The base config set to the classic ImageNet recipe for `model`, with its peak learning rate and the
  epochs at which the rate drops tenfold; experiments add their model's own keys."""
  config = base_config()
  config.model.name = model
  config.data.name = "imagenet2012"
  config.data.image_size = IMAGENET_IMAGE_SIZE
  config.data.random_resized_crop = True
  config.data.flip = True
  config.data.num_threads = IMAGENET_INPUT_THREADS
  config.batch_size = IMAGENET_BATCH
  config.num_epochs = IMAGENET_EPOCHS
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = learning_rate
  config.optimizer.momentum = IMAGENET_MOMENTUM
  config.optimizer.weight_decay = IMAGENET_WEIGHT_DECAY
  config.optimizer.schedule = "piecewise"
  config.optimizer.decay_boundaries = tuple(epoch / IMAGENET_EPOCHS for epoch in decay_epochs)
  config.optimizer.decay_factor = IMAGENET_DECAY_FACTOR
  config.log_every_steps = IMAGENET_LOG_EVERY
  config.eval_every_steps = IMAGENET_EVAL_EVERY
  config.checkpoint_every_steps = IMAGENET_EVAL_EVERY
  return config


# The key groups, in one place. Keys that may change when a run resumes: they decide where, how often
# and how fast outputs are written, not what is computed. Any other change means a different run.
RESUME_SAFE_KEYS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                    "keep_best_metric", "progress_bar", "data.num_threads", "data.num_workers", "data.prefetch_batches",
                    "data.tfds_data_dir", "data.cache_megabytes", "data.placement", "data.device_megabytes",
                    "data.decoder",
                    "parallel.steps_per_dispatch",
                    "parallel.strategy", "parallel.num_devices", "model.lowering", "profile_steps")


# The metrics `keep_best_metric` may name, each with the direction that is better (orbax's best_mode).
BEST_METRICS = {"eval_accuracy": "max", "eval_loss": "min", "eval_mean_iou": "max"}


# Keys in which the members of one vectorized population may differ: values that need no recompilation
# (injected into the optimizer state, arguments of the step, or the seed).
VECTORIZABLE_KEYS = ("optimizer.learning_rate", "optimizer.weight_decay", "label_smoothing", "seed")
# Keys a population member ignores: the population places it and shows one bar for all.
MEMBER_IGNORED_KEYS = ("parallel.strategy", "parallel.num_devices", "progress_bar")


def lookup(config: ml_collections.ConfigDict, key: str) -> object:
  """The value of dotted `key` ('optimizer.learning_rate'); ConfigError naming the first unknown part and
  the keys beside it."""
  node = config
  parts = key.split(".")
  for depth, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      parent = ".".join(parts[:depth]) or "the config"
      known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "nothing (it is a value)"
      raise ConfigError(f"unknown config key {key!r}; {parent} has: {known}")
    node = node[part]
  return node


def set_value(config: ml_collections.ConfigDict, key: str, value: object) -> None:
  """Sets dotted `key`; ConfigError for an unknown key or a value the (locked) config does not take."""
  lookup(config, key)
  *parents, leaf = key.split(".")
  parent = lookup(config, ".".join(parents)) if parents else config
  try:
    parent[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{key}={value!r}, which does not fit the config ({str(e).splitlines()[0]}); give a value "
                      "of the key's type") from None


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict:
  """{dotted key: value} of a config or of its JSON form."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def as_json(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values: what `config.json` holds."""
  return json.loads(config.to_json_best_effort())


def _defaults() -> dict:
  return flatten(as_json(base_config()))


def resume_differences(saved: dict, config: ml_collections.ConfigDict) -> list[tuple[str, object, object]]:
  """(key, saved value, new value) for every key that differs and may not change on resume.

  A key the saved config lacks is no difference while it holds its default: a run started before
  cnnjax gained that key (with the behaviour its default keeps) resumes after the upgrade.
  """
  old, new, defaults = flatten(saved), flatten(as_json(config)), _defaults()
  return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
          if key not in RESUME_SAFE_KEYS and old.get(key) != new.get(key)
          and not (key not in old and key in defaults and new.get(key) == defaults[key])]


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """sha256 of the keys that define a run: every key but `RESUME_SAFE_KEYS`, the ones
  `resume_differences` compares, left out where it holds its default (so that a key added to the schema
  later, at its default, keeps the fingerprints of earlier checkpoints). Two configs that may resume
  each other share it."""
  defaults = _defaults()
  defining = {key: value for key, value in flatten(as_json(config)).items()
              if key not in RESUME_SAFE_KEYS and not (key in defaults and value == defaults[key])}
  return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()


def model_options(config: ml_collections.ConfigDict) -> dict:
  """The model-family options of a config: keys under `model` beyond the common ones."""
  return {k: v for k, v in config.model.items() if k not in MODEL_COMMON_KEYS}


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _choice(value: str, choices, key: str) -> None:
  _require(value in choices, f"{key}={value!r} is unknown; choose one of {', '.join(choices)}")


def _number(config: ml_collections.ConfigDict, key: str) -> float:
  """The value of dotted `key`, which must be a finite number."""
  value = config
  for part in key.split("."):
    value = value[part]
  _require(isinstance(value, (int, float)) and not isinstance(value, bool),
           f"{key}={value!r} must be a number")
  _require(math.isfinite(value), f"{key}={value} must be a finite number")
  return value


def _validate_schedule(config: ml_collections.ConfigDict) -> None:
  boundaries = config.optimizer.decay_boundaries
  _require(isinstance(boundaries, (tuple, list)) and all(
      isinstance(b, (int, float)) and not isinstance(b, bool) for b in boundaries),
           f"optimizer.decay_boundaries={boundaries!r} must be a tuple of fractions of training, e.g. "
           "--config.optimizer.decay_boundaries='(0.5, 0.75)'")
  _require(all(0 < b < 1 for b in boundaries),
           f"optimizer.decay_boundaries={tuple(boundaries)} must lie in (0, 1): fractions of training")
  _require(all(a < b for a, b in zip(boundaries, boundaries[1:])),
           f"optimizer.decay_boundaries={tuple(boundaries)} must be increasing")


# Seeds a run can use: grain's shuffles and the data order take 32-bit unsigned seeds.
MAX_SEED = 2 ** 32 - 1
FLOAT_KEYS = ("num_epochs", "label_smoothing", "optimizer.learning_rate", "optimizer.weight_decay",
              "optimizer.momentum", "optimizer.b1", "optimizer.b2", "optimizer.eps", "optimizer.decay_factor",
              "model.bn_momentum", "model.bn_epsilon", "model.renorm_rmax", "model.renorm_dmax",
              "data.rotation_degrees")


def _validate_profile_steps(config: ml_collections.ConfigDict) -> None:
  value = config.profile_steps
  _require(isinstance(value, (tuple, list)) and len(value) == 2 and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value),
           f"profile_steps={value!r} must be two integers START,COUNT >= 0 (trace the COUNT steps after the first "
           "START; COUNT 0: no trace), e.g. --config.profile_steps=10,5")


def _check_structure(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError unless `config` is a ConfigDict with every shared key."""
  _require(isinstance(config, ml_collections.ConfigDict),
           f"get_config() returned a {type(config).__name__}; return an ml_collections.ConfigDict built on "
           "cnnjax.config.base_config()")
  missing = sorted(set(flatten(base_config())) - set(flatten(config)))
  if missing:
    more = f" and {len(missing) - 1} more keys" if len(missing) > 1 else ""
    raise ConfigError(f"the config lacks {missing[0]}{more}; build get_config() on cnnjax.config.base_config()")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first impossible value and its fix."""
  _check_structure(config)
  for key in FLOAT_KEYS:
    _number(config, key)
  _require(isinstance(config.seed, int) and 0 <= config.seed <= MAX_SEED,
           f"seed={config.seed} is outside [0, {MAX_SEED}]; use a non-negative 32-bit integer")
  _choice(config.model.name, sorted(MODELS), "model.name")
  _require(isinstance(config.data.name, str) and is_dataset_name(config.data.name),
           f"data.name={config.data.name!r} is neither one of {', '.join(DATASET_NAMES)} nor a TFDS dataset name "
           "(lower case, e.g. svhn_cropped, or your image folder's name; see python -m cnnjax.prepare)")
  _choice(config.parallel.strategy, STRATEGIES, "parallel.strategy")
  _choice(config.model.bn_sync, BN_SYNC_MODES, "model.bn_sync")
  _choice(config.model.bn_running_variance, RUNNING_VARIANCE_CONVENTIONS, "model.bn_running_variance")
  _choice(config.model.norm, ("",) + NORM_KINDS, "model.norm")
  _choice(config.model.dtype, DTYPES, "model.dtype")
  _choice(config.model.lowering, LOWERINGS, "model.lowering")
  _choice(config.optimizer.name, OPTIMIZERS, "optimizer.name")
  _choice(config.optimizer.schedule, SCHEDULES, "optimizer.schedule")
  _require(config.batch_size > 0, f"batch_size={config.batch_size} must be positive")
  _require(config.eval_batch_size >= 0, f"eval_batch_size={config.eval_batch_size} must be >= 0 (0: batch_size)")
  _require(config.optimizer.learning_rate > 0,
           f"optimizer.learning_rate={config.optimizer.learning_rate} must be positive")
  _require(config.optimizer.weight_decay >= 0,
           f"optimizer.weight_decay={config.optimizer.weight_decay} must be >= 0")
  _require(0 <= config.optimizer.momentum < 1, f"optimizer.momentum={config.optimizer.momentum} must be in [0, 1)")
  for key in ("b1", "b2"):
    _require(0 <= config.optimizer[key] < 1, f"optimizer.{key}={config.optimizer[key]} must be in [0, 1)")
  _require(config.optimizer.eps > 0, f"optimizer.eps={config.optimizer.eps} must be positive")
  _require(config.optimizer.decay_factor > 0,
           f"optimizer.decay_factor={config.optimizer.decay_factor} must be positive")
  _validate_schedule(config)
  _validate_profile_steps(config)
  _require(config.optimizer.warmup_steps >= 0, f"optimizer.warmup_steps={config.optimizer.warmup_steps} must be >= 0")
  _require(0 <= config.label_smoothing < 1, f"label_smoothing={config.label_smoothing} must be in [0, 1)")
  _require(config.num_train_steps > 0 or config.num_epochs > 0,
           f"num_epochs={config.num_epochs} and num_train_steps={config.num_train_steps}: one must be positive")
  _require(config.num_train_steps >= 0, f"num_train_steps={config.num_train_steps} must be >= 0 (0: use num_epochs)")
  _require(0 <= config.model.bn_momentum < 1, f"model.bn_momentum={config.model.bn_momentum} must be in [0, 1)")
  _require(config.model.bn_epsilon > 0, f"model.bn_epsilon={config.model.bn_epsilon} must be positive")
  _require(config.model.bn_sync != "ghost" or config.model.bn_group_size > 0,
           "model.bn_sync=ghost needs model.bn_group_size > 0 (examples per statistics group)")
  _require(config.model.bn_group_size >= 0, f"model.bn_group_size={config.model.bn_group_size} must be >= 0")
  _require(config.model.renorm_rmax >= 1, f"model.renorm_rmax={config.model.renorm_rmax} must be >= 1")
  _require(config.model.renorm_dmax >= 0, f"model.renorm_dmax={config.model.renorm_dmax} must be >= 0")
  for key in ("renorm_warmup_steps", "renorm_rmax_steps", "renorm_dmax_steps"):
    _require(config.model[key] >= 0, f"model.{key}={config.model[key]} must be >= 0")
  _require(config.parallel.num_devices >= 0, f"parallel.num_devices={config.parallel.num_devices} must be >= 0")
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _require(config[key] > 0, f"{key}={config[key]} must be positive")
  _require(config.eval_every_steps >= 0, f"eval_every_steps={config.eval_every_steps} must be >= 0 (0: at the end)")
  _require(config.keep_best_metric in ("",) + tuple(BEST_METRICS),
           f"keep_best_metric={config.keep_best_metric!r} is unknown; choose one of {', '.join(BEST_METRICS)} "
           "(or '' to keep only the newest checkpoints)")
  _require(not config.keep_best_metric or (
      config.eval_every_steps > 0 and config.checkpoint_every_steps % config.eval_every_steps == 0),
           f"keep_best_metric={config.keep_best_metric} scores each checkpoint by the eval at its step: set "
           f"eval_every_steps > 0 with checkpoint_every_steps={config.checkpoint_every_steps} a multiple of it")
  _require(config.data.image_size >= 0, f"data.image_size={config.data.image_size} must be >= 0 (0: keep)")
  _require(not config.data.random_resized_crop or config.data.image_size > 0,
           "data.random_resized_crop needs data.image_size > 0 (the crop's output size)")
  _require(config.data.crop_padding >= 0, f"data.crop_padding={config.data.crop_padding} must be >= 0")
  _require(config.data.rotation_degrees >= 0, f"data.rotation_degrees={config.data.rotation_degrees} must be >= 0")
  _require(config.data.cache_megabytes >= 0, f"data.cache_megabytes={config.data.cache_megabytes} must be >= 0")
  _require(config.data.num_threads > 0, f"data.num_threads={config.data.num_threads} must be positive")
  _require(config.data.num_workers >= AUTO_WORKERS, f"data.num_workers={config.data.num_workers} must be "
           f">= {AUTO_WORKERS} ({AUTO_WORKERS}: chosen from the cores, 0: no worker processes, "
           "threads only)")
  _require(config.data.prefetch_batches > 0, f"data.prefetch_batches={config.data.prefetch_batches} must be positive")
  _choice(config.data.placement, PLACEMENTS, "data.placement")
  _choice(config.data.decoder, DECODERS, "data.decoder")
  _require(config.data.device_megabytes >= 0, f"data.device_megabytes={config.data.device_megabytes} must be >= 0")
  _require(config.parallel.steps_per_dispatch >= 0,
           f"parallel.steps_per_dispatch={config.parallel.steps_per_dispatch} must be >= 0 (0: chosen from the "
           "logging, eval and checkpoint intervals)")
  _require(config.data.num_classes >= 0, f"data.num_classes={config.data.num_classes} must be >= 0")
  _require(config.data.vocab_size > 2, f"data.vocab_size={config.data.vocab_size} must exceed 2 (padding and unknown)")
  _require(config.data.max_length > 0, f"data.max_length={config.data.max_length} must be positive")
