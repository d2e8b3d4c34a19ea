"""torchvision's layout both ways for ResNet-18/34/50/101/152, VGG with and without BatchNorm, AlexNet
and GoogLeNet: torchvision's pretrained weights as cnnjax variables (`convert_state_dict`, `init_from`),
and cnnjax variables as a torchvision state dict (`to_state_dict`, what `python -m cnnjax.export` writes).

One mapping serves both directions: `torchvision_key` names the state-dict key
of every cnnjax variable, and `change_layout` turns an array into either
framework's layout, each direction undoing the other.

The weights file is one the user downloaded: torchvision's own `.pth` (the URL
is in torchvision's docs of each model's weights enum, for example
https://download.pytorch.org/models/resnet18-f37072fd.pth; torchvision caches
the files it downloads in ~/.cache/torch/hub/checkpoints/), or a `.safetensors`
file of the same state dict. Reading one never runs code from it:

* `.safetensors` holds a JSON header and raw arrays, and is read as data.
* `.pth` is a pickle, and a pickle can call any function. With PyTorch
  installed it is read by `torch.load(..., weights_only=True)`, PyTorch's
  restricted unpickler; without PyTorch by this module's own restricted
  unpickler, which admits only what a state dict holds (an ordered dict of
  tensors in float, integer or bool storages) and builds NumPy arrays itself.
  Anything else (a global such as `os.system`, a code object, an object other
  than a tensor) is refused with a `CheckpointError`. Sizes are checked before
  anything is allocated: zip members and legacy storages against the file's
  size, and no tensor may view more elements than its storage holds (stride 0).

Every tensor read is checked (`check_tensors`): numbers only, finite, and
BatchNorm running variances >= 0, the error naming the file and the tensor, so
that a damaged file is not trained to NaN. Any failure to parse a file is one
`CheckpointError` line.

What the conversion does:

* convolution kernels O x I x kH x kW become kH x kW x I x O (cnnjax's HWIO);
* linear weights out x in are transposed; the first linear layer of VGG and
  AlexNet also has its inputs permuted, since torchvision flattens the pooled
  grid as (channels, height, width) and cnnjax as (height, width, channels);
* BatchNorm weight, bias, running_mean, running_var become scale, bias and the
  `batch_stats` mean and var. torchvision stores the unbiased running variance
  (PyTorch's convention), and it is copied as it is: eval mode normalizes with
  the stored variance in both frameworks, so imported networks give
  torchvision's eval-mode outputs. To keep PyTorch's convention while
  fine-tuning, set `model.bn_running_variance=unbiased`; with the default
  (`biased`) new batch variances enter the running average without the
  m / (m - 1) factor (see `cnnjax.nn.norm`);
* `num_batches_tracked` counters and GoogLeNet's auxiliary heads (`aux1`,
  `aux2`: cnnjax's GoogLeNet has none) are dropped.

The export does the inverse of each step, the running variance included: it
is written as it is stored, whatever `model.bn_running_variance` the run
trained with, so that PyTorch's eval mode normalizes with the variance
cnnjax's eval mode used and the logits agree. Each BatchNorm also gets a
`num_batches_tracked` (the steps trained), so the keys are exactly those of
torchvision's `state_dict()` (GoogLeNet's built with `aux_logits=False`).

Every parameter of the cnnjax model must be found with the same shape, and
every other weight in the file must have a place in the model, else a
`CheckpointError` names the first one that does not fit. The one exception is
the classifier, for fine-tuning on another number of classes:
`replace_classifier=True` keeps the template's freshly initialized classifier
when its shape differs from the file's.

torchvision's GoogLeNet weights also need the model built as torchvision
builds it for them: BatchNorm epsilon 1e-3 (`model.bn_epsilon=0.001`) and
`model.transform_input=True`; `init_from` checks both.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from flax import linen as nn
from safetensors.numpy import load_file as load_safetensors

from cnnjax.data import readers
from cnnjax.errors import CheckpointError, ConfigError
from cnnjax.models.googlenet import TORCHVISION_BN_EPSILON

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VGGS = tuple(f"vgg{depth}{suffix}" for depth in (11, 13, 16, 19) for suffix in ("", "_bn"))
ARCHITECTURES = RESNETS + VGGS + ("alexnet", "googlenet")
# The cnnjax module that produces the logits, per family.
CLASSIFIERS = {**{name: "classifier" for name in RESNETS + ("googlenet",)},
               **{name: "fc8" for name in VGGS + ("alexnet",)}}
# The pooled grid that torchvision flattens before the first linear layer, per family.
FLATTENED_GRIDS = {**{name: 7 for name in VGGS}, "alexnet": 6}
# Positions of AlexNet's convolutions and linear layers in torchvision's `features` and `classifier`.
ALEXNET_FEATURES = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}
ALEXNET_CLASSIFIER = {"fc6": 1, "fc7": 4, "fc8": 6}
VGG_CLASSIFIER = {"fc6": 0, "fc7": 3, "fc8": 6}
# State-dict entries with no counterpart in cnnjax: BatchNorm's step counters, GoogLeNet's auxiliary heads.
IGNORED_KEYS = re.compile(r"(^|\.)num_batches_tracked$|^aux[12]\.")
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
CONFIG_KEY = "init_from"
REPLACE_CLASSIFIER_KEY = "init_from_replace_classifier"

# Storage classes a state dict's pickle names, and the arrays they hold.
STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                  "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
                  "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                  "BoolStorage": np.bool_}
# PyTorch's legacy (pre-1.6, non-zip) format opens with this number, then its protocol and system info.
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_SIZE_BYTES = 8  # each legacy storage starts with its element count as an int64
BFLOAT16_SHIFT = 16  # a bfloat16 is the high half of a float32
# Float types of fewer bits than float16 that safetensors files may hold (ml_dtypes' names).
LOW_PRECISION_FLOATS = ("bfloat16", "float8", "float6", "float4")
# BatchNorm's running variance: never negative in a file that is intact.
RUNNING_VARIANCE_SUFFIX = ".running_var"
REDOWNLOAD = "download torchvision's file again"


# ---------------------------------------------------------------------------------------------------
# Reading a weights file.


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: array} of a torchvision state dict in a `.safetensors` or `.pth` file; never runs its code."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"no weights file at {path}; download torchvision's .pth for the model "
                          "(its URL is in torchvision's weights docs) and pass its path")
  if path.endswith(SAFETENSORS_SUFFIX):
    state_dict = _read_safetensors(path)
  elif path.endswith(PICKLE_SUFFIXES):
    state_dict = _read_pickle(path)
  else:
    raise CheckpointError(f"{path}: unknown weights format; expected a {SAFETENSORS_SUFFIX} file or a "
                          f"PyTorch state dict ({', '.join(PICKLE_SUFFIXES)})")
  if not state_dict or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state_dict.items()):
    raise CheckpointError(f"{path} is not a state dict of named tensors; save the model's state_dict() itself")
  check_tensors(path, state_dict)
  return state_dict


def check_tensors(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
  """CheckpointError naming the file and the tensor unless every tensor holds numbers, every float is
  finite and every BatchNorm running variance is >= 0: a damaged file must not train to NaN or be taken
  for a learning-rate problem."""
  for key, array in state_dict.items():
    if array.dtype.kind not in readers.NUMERIC_KINDS:
      raise CheckpointError(f"{path}: tensor {key} has dtype {array.dtype}, not numbers; {REDOWNLOAD}")
    if array.dtype.kind == "f":
      bad = array.size - int(np.count_nonzero(np.isfinite(array)))
      if bad:
        raise CheckpointError(f"{path}: tensor {key} holds {bad} non-finite value(s) (NaN or infinity) of "
                              f"{array.size}; the file is damaged: {REDOWNLOAD}")
    if key.endswith(RUNNING_VARIANCE_SUFFIX) and array.size and array.min() < 0:
      raise CheckpointError(f"{path}: tensor {key} holds a negative BatchNorm running variance "
                            f"({float(array.min()):g}), which no trained network has; the file is damaged: "
                            f"{REDOWNLOAD}")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  # The safetensors library checks the header's offsets against the file's size before mapping it.
  with readers.refusing(path, CheckpointError, "download or convert it again", "safetensors file"):
    arrays = dict(load_safetensors(path))
  # bfloat16 and the float8 kinds arrive as ml_dtypes types, which NumPy does not count as numbers; float32
  # holds each of them exactly, as the .pth readers give bfloat16.
  return {key: value.astype(np.float32) if value.dtype.name.startswith(LOW_PRECISION_FLOATS) else value
          for key, value in arrays.items()}


def _read_pickle(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return read_pickle_without_torch(path)
  try:
    with warnings.catch_warnings():
      # A damaged file makes torch warn (an odd pickle protocol) before it fails or reads; the failure is
      # reported in one line, and a file that reads is checked tensor by tensor below.
      warnings.simplefilter("ignore", UserWarning)
      loaded = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(f"{path} holds more than tensors and was refused unread "
                          f"(torch.load with weights_only=True: {_first_line(e)}); it may have been "
                          "tampered with: download torchvision's file again") from None
  except Exception as e:  # pylint: disable=broad-except  (any failure to parse the file means a bad file)
    raise CheckpointError(f"{path} is not a readable PyTorch file ({_first_line(e)}); download it again") from None
  if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
    raise CheckpointError(f"{path} is not a state dict of named tensors; save the model's state_dict() itself")
  return {key: _torch_to_numpy(path, key, value, torch) for key, value in loaded.items()}


def _torch_to_numpy(path: str, key: str, tensor: Any, torch: Any) -> np.ndarray:
  tensor = tensor.detach().cpu()
  # A view may claim more elements than its storage holds (stride 0); copying it would allocate them all.
  if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
    raise CheckpointError(f"{path}: tensor {key} views {tensor.numel()} elements of a storage of "
                          f"{tensor.untyped_storage().nbytes()} bytes (overlapping strides), which no saved "
                          f"parameter does; {REDOWNLOAD}")
  if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
    tensor = tensor.float()
  return tensor.numpy()


def _first_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


class _Sealed:
  """The objects this module's unpickler builds: a pickle may not set their state afterwards."""

  def __setstate__(self, state: Any) -> None:
    raise pickle.UnpicklingError("it sets the state of an object, which a state dict never does")


@dataclasses.dataclass(frozen=True)
class _StorageRef(_Sealed):
  """A storage that the pickle names: its key in the file and its element type."""

  key: str
  dtype: Any


@dataclasses.dataclass(frozen=True)
class _TensorRef(_Sealed):
  """A tensor the pickle describes: a strided view of a storage, built once the storages are read."""

  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _TensorRef:
  """Stands in for torch._utils._rebuild_tensor(_v2); the extra arguments (requires_grad, hooks) are unused."""
  if not isinstance(storage, _StorageRef):
    raise pickle.UnpicklingError("a tensor that is not backed by a storage")
  return _TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(n) for n in stride))


def _rebuild_parameter(data, *unused) -> _TensorRef:
  """Stands in for torch._utils._rebuild_parameter: a parameter is its data."""
  if not isinstance(data, _TensorRef):
    raise pickle.UnpicklingError("a parameter that is not a tensor")
  return data


@dataclasses.dataclass(frozen=True)
class _StorageType(_Sealed):
  """Stands in for torch.FloatStorage and the like: only names an element type."""

  dtype: Any


# The only globals a state dict's pickle may name, and what each one becomes.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a state dict and nothing else: any other global, and any object, is refused."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(f"it names {module}.{name}, which a state dict never holds")
    return _ALLOWED_GLOBALS[(module, name)]

  def persistent_load(self, pid: Any) -> _StorageRef:
    # ('storage', storage type, key, location, numel[, view metadata]) in both of PyTorch's formats.
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)):
      raise pickle.UnpicklingError("a persistent object other than a tensor storage")
    return _StorageRef(pid[2], pid[1].dtype)


def read_pickle_without_torch(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict (zip or legacy format) read without PyTorch, admitting only tensors."""
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        return _read_zip_state_dict(archive)
    with open(path, "rb") as f:
      return _read_legacy_state_dict(f)
  except pickle.UnpicklingError as e:
    raise CheckpointError(f"{path} was refused unread: {_first_line(e)}; it may have been tampered with: "
                          "download torchvision's file again") from None
  except Exception as e:  # pylint: disable=broad-except  (any failure to parse the file means a bad file)
    raise CheckpointError(f"{path} is not a readable PyTorch state dict ({_first_line(e)}); "
                          "download it again") from None


def _read_member(archive: zipfile.ZipFile, name: str) -> bytes:
  """A member of the archive, its declared size checked against what the archive can hold first."""
  try:
    readers.check_member_size(archive, name)
  except readers.BadFile as e:
    raise ValueError(str(e)) from None
  return archive.read(name)


def _read_zip_state_dict(archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
  pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
  if len(pickles) != 1:
    raise ValueError("no data.pkl at the top of the archive")
  prefix = pickles[0][:-len("data.pkl")]
  # Files from PyTorch before 1.9 have no byte-order record; they were written little-endian.
  has_byteorder = prefix + "byteorder" in archive.namelist()
  byteorder = _read_member(archive, prefix + "byteorder").decode().strip() if has_byteorder else "little"
  if byteorder not in ("little", "big"):
    raise ValueError(f"unknown byte order {byteorder!r}")
  loaded = _load_checked(io.BytesIO(_read_member(archive, pickles[0])))
  storages = {}
  for ref in _storage_refs(loaded):
    if ref.key not in storages:
      storages[ref.key] = _storage_array(_read_member(archive, f"{prefix}data/{ref.key}"), ref.dtype, byteorder)
  return _materialize(loaded, storages)


def _load_checked(f) -> Any:
  """One pickle from `f` (seekable) by `_StateDictUnpickler`, its opcodes checked first: see
  `readers.check_pickle_memo`."""
  start = f.tell()
  # A file on disk is read through a BoundedReader, in memory as it is (neither allocates a claimed length).
  reader = f if isinstance(f, io.BytesIO) else readers.BoundedReader(f)
  try:
    readers.check_pickle_memo(reader)
  except readers.BadFile as e:
    raise ValueError(str(e)) from None
  f.seek(start)
  return _StateDictUnpickler(reader).load()


def _read_legacy_state_dict(f) -> dict[str, np.ndarray]:
  if _load_checked(f) != LEGACY_MAGIC:
    raise ValueError("neither a zip archive nor PyTorch's legacy format")
  _load_checked(f)  # protocol version
  system = _load_checked(f)
  little_endian = bool(system.get("little_endian", True)) if isinstance(system, dict) else True
  loaded = _load_checked(f)
  keys = _load_checked(f)
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise ValueError("malformed storage list")
  dtypes = {ref.key: ref.dtype for ref in _storage_refs(loaded)}
  order = "<" if little_endian else ">"
  file_size = os.fstat(f.fileno()).st_size
  storages = {}
  for key in keys:
    if key not in dtypes:
      raise ValueError(f"storage {key} is not used by any tensor")
    (numel,) = struct.unpack(order + "q", f.read(LEGACY_SIZE_BYTES))
    itemsize = 2 if dtypes[key] == "bfloat16" else np.dtype(dtypes[key]).itemsize
    if numel < 0 or numel * itemsize > file_size - f.tell():
      raise ValueError(f"storage {key} claims more data than the file holds")
    storages[key] = _storage_array(f.read(numel * itemsize), dtypes[key], "little" if little_endian else "big")
  return _materialize(loaded, storages)


def _storage_refs(loaded: Any) -> list[_StorageRef]:
  if not isinstance(loaded, Mapping) or not all(isinstance(v, _TensorRef) for v in loaded.values()):
    raise pickle.UnpicklingError("it holds objects other than named tensors")
  return [tensor.storage for tensor in loaded.values()]


def _storage_array(data: bytes, dtype: Any, byteorder: str) -> np.ndarray:
  order = "<" if byteorder == "little" else ">"
  if dtype == "bfloat16":
    bits = np.frombuffer(data, np.dtype(order + "u2")).astype(np.uint32) << BFLOAT16_SHIFT
    return bits.view(np.float32)
  return np.frombuffer(data, np.dtype(dtype).newbyteorder(order))


def _materialize(loaded: Mapping[str, _TensorRef], storages: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  arrays = {}
  for name, tensor in loaded.items():
    storage = storages[tensor.storage.key]
    if len(tensor.size) != len(tensor.stride) or tensor.offset < 0 or min(tensor.stride, default=0) < 0:
      raise ValueError(f"tensor {name} has an invalid layout")
    # The last element the view reads (none for an empty tensor) must lie inside the storage, and the
    # view may not hold more elements than the storage does from its offset (overlapping strides, such as
    # stride 0, would make a few bytes of file a copy of any size).
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if all(tensor.size) and last >= storage.size:
      raise ValueError(f"tensor {name} reaches past its storage")
    if math.prod(tensor.size) > max(0, storage.size - tensor.offset):
      raise ValueError(f"tensor {name} views {math.prod(tensor.size)} elements of a storage of {storage.size} "
                       "(overlapping strides), which no saved parameter does")
    view = np.lib.stride_tricks.as_strided(storage[tensor.offset:], tensor.size,
                                           [s * storage.itemsize for s in tensor.stride], writeable=False)
    arrays[name] = np.array(view, dtype=storage.dtype.newbyteorder("="))
  return arrays


# ---------------------------------------------------------------------------------------------------
# Mapping torchvision's names and layouts onto cnnjax's.


def _resnet_module(path: tuple[str, ...]) -> str:
  names = {"stem_conv": "conv1", "stem_norm": "bn1", "classifier": "fc"}
  if len(path) == 1 and path[0] in names:
    return names[path[0]]
  block = re.fullmatch(r"stage(\d+)_block(\d+)", path[0]) if len(path) == 2 else None
  if block is None:
    raise KeyError("/".join(path))
  layer = f"layer{block.group(1)}.{int(block.group(2)) - 1}"
  inner = {"shortcut_conv": "downsample.0", "shortcut_norm": "downsample.1"}.get(path[1])
  if inner is None:
    inner = re.sub(r"^norm(\d)$", r"bn\1", path[1])
  return f"{layer}.{inner}"


def _vgg_module(path: tuple[str, ...], params: Mapping[tuple[str, ...], Any]) -> str:
  if len(path) == 1 and path[0] in VGG_CLASSIFIER:
    return f"classifier.{VGG_CLASSIFIER[path[0]]}"
  indices = _vgg_feature_indices(params)
  if len(path) != 1 or path[0] not in indices:
    raise KeyError("/".join(path))
  return f"features.{indices[path[0]]}"


def _vgg_feature_indices(params: Mapping[tuple[str, ...], Any]) -> dict[str, int]:
  """Positions in torchvision's `features`: conv, [BatchNorm,] ReLU for each layer, a max pool per stage."""
  def stage_and_index(module: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", module))

  convs = sorted({path[0] for path in params if re.fullmatch(r"conv\d+_\d+", path[0])}, key=stage_and_index)
  batch_norm = any(re.fullmatch(r"norm\d+_\d+", path[0]) for path in params)
  indices, position, stage = {}, 0, None
  for module in convs:
    module_stage, index = stage_and_index(module)
    if stage is not None and module_stage != stage:
      position += 1  # the max pool closing the previous stage
    stage = module_stage
    indices[module] = position
    if batch_norm:
      indices[f"norm{module_stage}_{index}"] = position + 1
    position += 3 if batch_norm else 2
  return indices


def _alexnet_module(path: tuple[str, ...]) -> str:
  if len(path) == 1 and path[0] in ALEXNET_FEATURES:
    return f"features.{ALEXNET_FEATURES[path[0]]}"
  if len(path) == 1 and path[0] in ALEXNET_CLASSIFIER:
    return f"classifier.{ALEXNET_CLASSIFIER[path[0]]}"
  raise KeyError("/".join(path))


def _googlenet_module(path: tuple[str, ...]) -> str:
  if path == ("classifier",):
    return "fc"
  if len(path) != 2 or path[1] not in ("conv", "norm"):
    raise KeyError("/".join(path))
  inner = "conv" if path[1] == "conv" else "bn"
  stem = re.fullmatch(r"stem_conv(\d)", path[0])
  if stem:
    return f"conv{stem.group(1)}.{inner}"
  raise KeyError("/".join(path))


def _googlenet_inception_module(path: tuple[str, ...]) -> str:
  branches = {"branch1": "branch1", "branch2_reduce": "branch2.0", "branch2_conv": "branch2.1",
              "branch3_reduce": "branch3.0", "branch3_conv": "branch3.1", "branch4_proj": "branch4.1"}
  if len(path) != 3 or path[1] not in branches or path[2] not in ("conv", "norm"):
    raise KeyError("/".join(path))
  return f"{path[0]}.{branches[path[1]]}.{'conv' if path[2] == 'conv' else 'bn'}"


def torch_module_name(name: str, module_path: tuple[str, ...], params: Mapping[tuple[str, ...], Any]) -> str:
  """torchvision's module name for a cnnjax module path (e.g. ('stage1_block1', 'norm1') -> 'layer1.0.bn1')."""
  if name in RESNETS:
    return _resnet_module(module_path)
  if name in VGGS:
    return _vgg_module(module_path, params)
  if name == "alexnet":
    return _alexnet_module(module_path)
  if module_path[0].startswith("inception"):
    return _googlenet_inception_module(module_path)
  return _googlenet_module(module_path)


# cnnjax leaf -> torchvision tensor name, per collection.
PARAM_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight"}
STAT_LEAVES = {"mean": "running_mean", "var": "running_var"}
LEAVES = {"params": PARAM_LEAVES, "batch_stats": STAT_LEAVES}
# torchvision's BatchNorm counter of the batches its running statistics saw, which cnnjax does not keep.
BATCHES_TRACKED = "num_batches_tracked"
# The linear layer whose inputs are the flattened pooled grid (FLATTENED_GRIDS).
FIRST_LINEAR = ("fc6",)


def check_architecture(name: str, problem: str) -> None:
  """ConfigError, `problem` and the models that have torchvision's layout, unless `name` is one of them."""
  if name not in ARCHITECTURES:
    raise ConfigError(f"model {name!r} {problem}; the models with torchvision's layout: {', '.join(ARCHITECTURES)}")


def torchvision_key(name: str, collection: str, path: tuple[str, ...], params: Mapping[tuple[str, ...], Any]) -> str:
  """torchvision's state-dict key of the cnnjax variable at `path` of `collection` ('params' or
  'batch_stats'), e.g. ('stage1_block1', 'norm1', 'var') -> 'layer1.0.bn1.running_var'; KeyError where
  torchvision's layout has no such variable. `params`: the model's flattened params (VGG's positions)."""
  return f"{torch_module_name(name, path[:-1], params)}.{LEAVES[collection][path[-1]]}"


def flat_variables(variables: Mapping[str, Any]) -> dict[str, dict[tuple[str, ...], Any]]:
  """{collection: {path: leaf}} of a model's variables."""
  return {collection: traverse_util.flatten_dict(nn.unbox(dict(leaves))) for collection, leaves in variables.items()}


def keyed_leaves(name: str, flat: Mapping[str, Mapping[tuple[str, ...], Any]], error: type[Exception]
                 ) -> Iterator[tuple[str, tuple[str, ...], Any, str]]:
  """(collection, path, leaf, torchvision key) of every params and batch_stats leaf of `flat`; `error`,
  one line, for a variable that torchvision's layout has no place for."""
  params = flat.get("params", {})
  for collection, leaves in flat.items():
    if collection not in LEAVES:
      continue
    for path, value in leaves.items():
      try:
        key = torchvision_key(name, collection, path, params)
      except KeyError:
        raise error(f"{name}: cnnjax variable {collection}/{'/'.join(path)} has no place in torchvision's layout "
                    "(a model option that torchvision lacks, such as another normalization); build the model "
                    "as torchvision builds it") from None
      yield collection, path, value, key


def torchvision_shape(leaf: str, cnnjax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape torchvision stores for a cnnjax leaf of `cnnjax_shape`: kernels HWIO -> OIHW, linear
  in x out -> out x in; everything else as it is."""
  if leaf == "kernel" and len(cnnjax_shape) == 4:
    height, width, inputs, outputs = cnnjax_shape
    return (outputs, inputs, height, width)
  if leaf == "kernel" and len(cnnjax_shape) == 2:
    return tuple(reversed(cnnjax_shape))
  return cnnjax_shape


def _reorder_flattened_inputs(matrix: np.ndarray, grid: int, *, to_torchvision: bool) -> np.ndarray:
  """An out x in matrix whose inputs are a flattened grid x grid x channels map, reordered from cnnjax's
  (H, W, C) flatten order to torchvision's (C, H, W), or back."""
  outputs, channels = matrix.shape[0], matrix.shape[1] // (grid * grid)
  if to_torchvision:
    return matrix.reshape(outputs, grid, grid, channels).transpose(0, 3, 1, 2).reshape(outputs, -1)
  return matrix.reshape(outputs, channels, grid, grid).transpose(0, 2, 3, 1).reshape(outputs, -1)


# Convolution kernels: torchvision's O x I x kH x kW from cnnjax's kH x kW x I x O, and back.
TO_TORCHVISION_AXES, TO_CNNJAX_AXES = (3, 2, 0, 1), (2, 3, 1, 0)


def change_layout(array: np.ndarray, leaf: str, module_path: tuple[str, ...], name: str, *, to_torchvision: bool,
                  expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
  """A variable in the other framework's layout: convolution kernels OIHW <-> HWIO, linear weights
  transposed (out x in <-> in x out), and the inputs of VGG's and AlexNet's first linear layer reordered
  between the flatten orders; everything else as it is. Each direction undoes the other.
  `expected_shape` (importing): cnnjax's shape, so that a tensor of another shape is left to the shape
  check, which names it."""
  if leaf != "kernel" or array.ndim not in (2, 4):
    return array
  if array.ndim == 4:
    return array.transpose(TO_TORCHVISION_AXES if to_torchvision else TO_CNNJAX_AXES)
  matrix = array.T if to_torchvision else array  # out x in
  if (name in FLATTENED_GRIDS and module_path == FIRST_LINEAR
      and (expected_shape is None or matrix.shape[1] == expected_shape[0])):
    matrix = _reorder_flattened_inputs(matrix, FLATTENED_GRIDS[name], to_torchvision=to_torchvision)
  return matrix if to_torchvision else matrix.T


def convert_state_dict(name: str, state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any], *,
                       replace_classifier: bool = False) -> dict[str, Any]:
  """cnnjax variables with `template`'s structure, filled from a torchvision state dict.

  Args:
    name: registry name of the model (one of ARCHITECTURES).
    state_dict: {torchvision key: array}, as `read_state_dict` returns.
    template: the model's variables from `model.init` (params, batch_stats).
    replace_classifier: keep the template's classifier where its shape differs
      from the file's (another number of classes); otherwise that is an error.
  """
  check_architecture(name, "has no torchvision weights to import")
  flat = flat_variables(template)
  result = {collection: {} if collection in LEAVES else leaves for collection, leaves in flat.items()}
  used = set()
  for collection, path, value, key in keyed_leaves(name, flat, CheckpointError):
    module_path, leaf = path[:-1], path[-1]
    if key not in state_dict:
      raise CheckpointError(f"the weights file has no {key} for {name}'s {'/'.join(path)}; "
                            f"is it another architecture's file?")
    used.add(key)
    array = change_layout(np.asarray(state_dict[key]), leaf, module_path, name, to_torchvision=False,
                          expected_shape=tuple(value.shape))
    if array.shape != tuple(value.shape):
      if replace_classifier and module_path == (CLASSIFIERS[name],):
        result[collection][path] = value
        continue
      hint = (" (another number of classes: start a new classifier with replace_classifier=True, "
              f"config key {REPLACE_CLASSIFIER_KEY})" if module_path == (CLASSIFIERS[name],) else "")
      raise CheckpointError(f"{key} has shape {tuple(state_dict[key].shape)} where {name}'s {'/'.join(path)} "
                            f"needs {torchvision_shape(leaf, tuple(value.shape))} in torchvision's layout "
                            f"({tuple(value.shape)} in cnnjax's){hint}")
    result[collection][path] = jnp.asarray(array, dtype=value.dtype)
  unused = sorted(key for key in state_dict if key not in used and not IGNORED_KEYS.search(key))
  if unused:
    raise CheckpointError(f"the weights file holds {len(unused)} tensors that {name} has no place for "
                          f"(first: {unused[0]}); is it another architecture's file?")
  return {collection: traverse_util.unflatten_dict(leaves) for collection, leaves in result.items()}


def to_state_dict(name: str, variables: Mapping[str, Any], *, batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """torchvision's state dict of a cnnjax model's `params` and `batch_stats`: the inverse of
  `convert_state_dict`, so that `convert_state_dict(name, to_state_dict(name, v), v)` gives back `v`.

  Every array keeps its dtype (float32 for cnnjax's parameters and statistics), in torchvision's axis
  order; each BatchNorm also gets `num_batches_tracked` = `batches_tracked` (int64), as torchvision's
  state dicts hold it. Raises ConfigError, one line, for a model without torchvision's layout or a
  variable that has no place in it (another normalization, Batch Renorm's step counter).
  """
  check_architecture(name, "has no torchvision counterpart to export to")
  state_dict = {}
  for collection, path, value, key in keyed_leaves(name, flat_variables(variables), ConfigError):
    state_dict[key] = np.ascontiguousarray(change_layout(np.asarray(value), path[-1], path[:-1], name,
                                                         to_torchvision=True))
    if collection == "batch_stats":
      state_dict[f"{key.rsplit('.', 1)[0]}.{BATCHES_TRACKED}"] = np.asarray(batches_tracked, np.int64)
  return state_dict


def load_torchvision_weights(name: str, template: Mapping[str, Any], path: str, *,
                             replace_classifier: bool = False) -> dict[str, Any]:
  """Variables for model `name` from a torchvision weights file; see `convert_state_dict`."""
  return convert_state_dict(name, read_state_dict(path), template, replace_classifier=replace_classifier)


def init_from(config: ml_collections.ConfigDict, model: nn.Module, variables: Mapping[str, Any]) -> dict[str, Any]:
  """The run's initial variables: `variables` itself, or torchvision's weights from `config.init_from`.

  Reads `config.init_from` (a weights file; '' keeps `variables`) and
  `config.init_from_replace_classifier` (start a new classifier where the
  number of classes differs). Raises ConfigError or CheckpointError, one line.
  """
  path = config[CONFIG_KEY]
  if not path:
    return dict(variables)
  name = config.model.name
  if name == "googlenet":
    _check_googlenet(model)
  return load_torchvision_weights(name, variables, path, replace_classifier=bool(config[REPLACE_CLASSIFIER_KEY]))


def _check_googlenet(model: nn.Module) -> None:
  if getattr(model.norm, "epsilon", None) != TORCHVISION_BN_EPSILON or not getattr(model, "transform_input", False):
    raise ConfigError("torchvision's GoogLeNet weights need the layout they were made with: set "
                      f"model.bn_epsilon={TORCHVISION_BN_EPSILON} and model.transform_input=True")
