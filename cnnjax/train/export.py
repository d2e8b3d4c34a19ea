"""A trained run's model out of cnnjax: torchvision's state dict (safetensors) or a StableHLO program.

What `python -m cnnjax.export` does. The run is read back as `python -m
cnnjax.evaluate` reads it (`cnnjax.train.restore`): its own `config.json`, one
of its checkpoints (the newest, `step`, or the best kept), read only and
checked against the run's config fingerprint; here on one device with plain
lowering, keys that leave the fingerprint alone. Then:

* `torchvision`: the params and BatchNorm statistics in torchvision's
  `state_dict` layout (`cnnjax.models.torchvision_import.to_state_dict`), as a
  `.safetensors` file whose metadata names the model, the step and the run's
  `model.bn_running_variance`. Only a model that computes what torchvision's
  model of its name computes is exported: the architecture's own
  normalization, torchvision's BatchNorm epsilon and ReLU.
* `stablehlo`: the eval-mode forward pass (BatchNorm from its running
  statistics, dropout off) with the weights inside, serialized by
  `jax.export` for any batch size; `jax.export.deserialize(bytes).call(x)`
  runs it in plain JAX. Its input is what the model takes: images
  normalized as the run normalized them (`Exported.describe` prints the mean
  and standard deviation), or token ids for text.

Nothing is written into the run's directory, and a refused export writes
nothing at all: every check (the format, the output path, the run, the step,
the model) comes before the output file, which is written to a temporary file
beside it and renamed into place. An existing output is refused unless
`overwrite`, and then replaced in one rename.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from safetensors.numpy import save as safetensors_bytes

from cnnjax.errors import ConfigError
from cnnjax.models import torchvision_import as tvi
from cnnjax.nn import lowering as lowering_lib
from cnnjax.train import restore
from cnnjax.train.rundir import check_workdir

TORCHVISION, STABLEHLO = "torchvision", "stablehlo"
FORMATS = (TORCHVISION, STABLEHLO)
SUFFIXES = {TORCHVISION: ".safetensors", STABLEHLO: ".stablehlo"}
# The platforms jax.export lowers for, and those a StableHLO export is lowered for by default: it runs on
# any of them.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
# torchvision's BatchNorm2d epsilon per architecture (GoogLeNet's BasicConv2d sets its own).
TORCHVISION_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class Exported:
  """What an export wrote."""

  path: str
  to: str
  model: str
  step: int
  input_shape: tuple[int, ...]
  input_dtype: str
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def describe(self) -> str:
    inputs = f"{self.input_dtype}[batch,{','.join(str(n) for n in self.input_shape)}]"
    normalized = (f", pixels x / 255 normalized with mean {_numbers(self.mean)} and std {_numbers(self.std)}"
                  if self.input_dtype == "float32" else "")
    return f"wrote {self.path}: {self.model} at step {self.step} as {self.to}; model inputs {inputs}{normalized}"


def _numbers(values: tuple[float, ...]) -> str:
  return "(" + ", ".join(f"{value:.4g}" for value in values) + ")"


# ---------------------------------------------------------------------------------------------------
# Checks made before anything is read or written.


def check_output(path: str, to: str, *, workdir: str, overwrite: bool) -> str:
  """The absolute output path; ConfigError unless it can be written as asked (its directory exists and
  is writable, it is not a directory, it exists only with `overwrite` and is none of the run's own files
  in `workdir`, it ends as the format's files do)."""
  if not path or not path.strip():
    raise ConfigError(f"--output is empty; give the file to write, e.g. --output=model{SUFFIXES[to]}")
  absolute = os.path.abspath(os.path.expanduser(path))
  directory = os.path.dirname(absolute)
  if os.path.isdir(absolute):
    raise ConfigError(f"--output={path} is a directory; give a file path inside it")
  if to == TORCHVISION and not absolute.endswith(SUFFIXES[TORCHVISION]):
    raise ConfigError(f"--output={path}: the torchvision export is a safetensors file; give a path ending in "
                      f"{SUFFIXES[TORCHVISION]}")
  if not os.path.isdir(directory):
    raise ConfigError(f"--output={path}: its directory {directory} does not exist; create it first or give "
                      "another path")
  if os.path.lexists(absolute) and not overwrite:
    raise ConfigError(f"--output={path} exists; pass --overwrite to replace it (in one rename) or give another "
                      "path")
  run = os.path.realpath(workdir) + os.sep if workdir else None
  if run and os.path.lexists(absolute) and os.path.realpath(absolute).startswith(run):
    raise ConfigError(f"--output={path} is a file of the run in {workdir}, which an export never replaces; give "
                      "another path")
  check_workdir(directory, "--output's directory")  # writable, tried for real
  return absolute


def check_torchvision_model(name: str, model: nn.Module) -> None:
  """ConfigError unless `model` computes what torchvision's model of its name computes in eval mode: the
  architecture's own normalization with torchvision's epsilon, and ReLU."""
  own_kind = "batch" if name in tvi.RESNETS + ("googlenet",) or name.endswith("_bn") else "none"
  norm = model.norm
  if norm.kind != own_kind:
    raise ConfigError(f"the run's {name} uses model.norm={norm.kind}, where torchvision's has "
                      f"{'BatchNorm' if own_kind == 'batch' else 'no normalization'}; only a model built as "
                      "torchvision builds it can be exported to torchvision (--to=stablehlo takes any)")
  epsilon = tvi.TORCHVISION_BN_EPSILON if name == "googlenet" else TORCHVISION_EPSILON
  if own_kind == "batch" and norm.epsilon != epsilon:
    raise ConfigError(f"the run's {name} uses BatchNorm epsilon {norm.epsilon:g}, torchvision's {epsilon:g}; "
                      "PyTorch would compute other outputs, so it is not exported to torchvision "
                      "(--to=stablehlo takes any)")
  if model.act is not nn.relu:
    raise ConfigError(f"the run's {name} uses another activation than torchvision's ReLU; it is not exported "
                      "to torchvision (--to=stablehlo takes any)")


# ---------------------------------------------------------------------------------------------------
# Reading the run and writing the file.


def export_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` on one device with plain lowering: keys that leave the run's fingerprint alone, so any
  machine exports any run, and the StableHLO holds no CPU-specific rewrite."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.parallel.strategy, config.parallel.num_devices = "none", 0
  config.model.lowering = lowering_lib.PLAIN
  return config


def variables_of(run: restore.RestoredRun) -> dict[str, Any]:
  """The model variables (params, BatchNorm statistics) of a restored run."""
  return {"params": run.state.params, "batch_stats": run.state.batch_stats}


def inference_function(model: nn.Module, variables: dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
  """inputs -> logits in eval mode (BatchNorm's running statistics, no dropout), `variables` bound."""
  return lambda inputs: model.apply(variables, inputs, train=False)


def input_spec(run: restore.RestoredRun, batch: Any) -> jax.ShapeDtypeStruct:
  """The model's input for `batch` examples (an int or a symbolic dimension)."""
  dtype = jnp.int32 if run.exp.preprocess.task == "text" else jnp.float32
  return jax.ShapeDtypeStruct((batch,) + tuple(run.exp.input_shape), dtype)


def stablehlo_bytes(run: restore.RestoredRun, platforms: tuple[str, ...] = DEFAULT_PLATFORMS) -> bytes:
  """The eval-mode forward pass, weights included, serialized by `jax.export` for any batch size."""
  (batch,) = jax.export.symbolic_shape("batch")
  function = jax.jit(inference_function(run.exp.model, variables_of(run)))
  return bytes(jax.export.export(function, platforms=platforms)(input_spec(run, batch)).serialize())


def torchvision_bytes(run: restore.RestoredRun) -> bytes:
  """The run's variables as a safetensors file in torchvision's state-dict layout."""
  name = run.exp.config.model.name
  check_torchvision_model(name, run.exp.model)
  state_dict = tvi.to_state_dict(name, variables_of(run), batches_tracked=run.step)
  metadata = {"format": "pt", "cnnjax_model": name, "cnnjax_step": str(run.step),
              "bn_running_variance": run.exp.config.model.bn_running_variance}
  return safetensors_bytes(state_dict, metadata=metadata)


def write_atomically(path: str, payload: bytes) -> None:
  """Writes `payload` to a temporary file beside `path` and renames it into place: `path` is either as
  it was or complete."""
  handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
  try:
    with os.fdopen(handle, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def export(workdir: str, to: str, output: str, *, config: ml_collections.ConfigDict | None = None,
           step: int | None = None, checkpoint: str = restore.LATEST, overwrite: bool = False,
           platforms: tuple[str, ...] = DEFAULT_PLATFORMS) -> Exported:
  """Writes checkpoint `step` (default: the newest, or the best kept with `checkpoint=BEST`) of the run in
  `workdir` to `output` as `to` (one of FORMATS). `config`: the run's config with overrides that leave
  its model alone (where its data lives); None: the run's own. Every problem is a CnnjaxError, one line,
  raised before anything is written."""
  if to not in FORMATS:
    raise ConfigError(f"--to={to!r} is unknown; choose one of {', '.join(FORMATS)}")
  unknown = [platform for platform in platforms if platform not in PLATFORMS]
  if to == STABLEHLO and (unknown or not platforms):
    raise ConfigError(f"--platforms={','.join(platforms)}: {'unknown ' + unknown[0] if unknown else 'none given'}; "
                      f"choose among {', '.join(PLATFORMS)}")
  path = check_output(output, to, workdir=workdir, overwrite=overwrite)
  run_config = restore.load_config(workdir)
  if to == TORCHVISION:
    tvi.check_architecture(run_config.model.name, "has no torchvision counterpart to export to")
  run = restore.restore(workdir, export_config(config or run_config), run_config=run_config, step=step,
                        checkpoint=checkpoint)
  payload = torchvision_bytes(run) if to == TORCHVISION else stablehlo_bytes(run, platforms)
  write_atomically(path, payload)
  preprocess = run.exp.preprocess
  return Exported(path, to, run_config.model.name, run.step, tuple(run.exp.input_shape),
                  input_spec(run, 1).dtype.name, tuple(np.ravel(preprocess.mean).tolist()),
                  tuple(np.ravel(preprocess.std).tolist()))
