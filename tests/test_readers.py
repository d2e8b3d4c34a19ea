"""Outside files read by `cnnjax.data.readers` and the preparation built on it: hostile pickles, labels out
of range, empty batches, lying headers, every PIL image mode, truncated images, broken links, re-preparing
from another source, and a fuzz test of every reader (seeded mutations of valid files: each must be read
or refused with one line, never crash, trace back or hang)."""

import gzip
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from cnnjax.data import open_dataset, readers
from cnnjax.data import prepare as prepare_lib
from cnnjax.data.prepare import prepare
from cnnjax.errors import CheckpointError, CnnjaxError, DataError
from cnnjax.models import torchvision_import as tvi
from helpers import REPO_ROOT, run_cli
from test_prepare import cifar_python_batch, write_cifar, write_image_folder, write_pickle

CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
# The fuzz test: mutations per reader, and the most seconds any one may take.
MUTATIONS_PER_READER = 60
SECONDS_PER_CASE = 5.0


def write_cifar_python(directory, count=2, labels=None, protocol=3, test_labels=None):
  """A CIFAR-10 python version in `directory/cifar-10-batches-py`; {batch: (labels, images)}."""
  source = directory / "cifar-10-batches-py"
  source.mkdir(parents=True)
  rng = np.random.default_rng(5)
  written = {}
  for name in CIFAR10_BATCHES:
    images = rng.integers(0, 256, (count, 32, 32, 3)).astype(np.uint8)
    batch_labels = (test_labels if name == "test_batch" and test_labels is not None else
                    labels if labels is not None else rng.integers(0, 10, count).tolist())
    batch = cifar_python_batch({b"labels": batch_labels}, images) if count else {
        b"data": np.zeros((0, 3072), np.uint8), b"labels": batch_labels}
    with open(source / name, "wb") as f:
      pickle.dump(batch, f, protocol=protocol)
    written[name] = (batch_labels, images)
  return written


def one_line_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def nothing_prepared(data_dir, name) -> bool:
  return not list((data_dir / name).rglob("*.array_record*")) if (data_dir / name).exists() else True


# ---------------------------------------------------------------------------------------------------
# Pickles.


def hostile_object_dtype_pickle() -> bytes:
  """A pickled array of a structured dtype whose one field is turned into a Python object: NumPy's own
  reconstruction would read a pointer from the file's 8 bytes (the SIGSEGV of issue 26)."""
  array = np.frombuffer(b"\x41" * 8, dtype=[("a", "<i8")])
  data = pickle.dumps({b"data": array, b"labels": [0]}, protocol=3)
  field = b"X\x02\x00\x00\x00i8"
  assert field in data
  return data.replace(field, b"X\x02\x00\x00\x00O8").replace(b"X\x01\x00\x00\x00<", b"X\x01\x00\x00\x00|")


def test_a_pickle_that_builds_an_object_dtype_is_refused_without_crashing(tmp_path):
  write_cifar_python(tmp_path / "src")
  (tmp_path / "src" / "cifar-10-batches-py" / "data_batch_2").write_bytes(hostile_object_dtype_pickle())
  result = run_cli("cnnjax.prepare", "cifar10", f"--source_dir={tmp_path / 'src'}",
                   f"--data_dir={tmp_path / 'tfds'}", timeout=120)
  one_line_error(result, "data_batch_2 is not a CIFAR python batch", "not a plain numeric one",
                 "refused without running it")
  assert nothing_prepared(tmp_path / "tfds", "cifar10")


@pytest.mark.parametrize("code", ["V8", "O8", "<U1", "M8", "S1", "c8"])
def test_pickled_arrays_of_any_but_numeric_dtypes_are_refused(tmp_path, code):
  data = pickle.dumps({b"data": np.zeros(2, np.uint8)}, protocol=3).replace(b"X\x02\x00\x00\x00u1",
                                                                            f"X{chr(len(code))}\x00\x00\x00{code}".encode())
  path = tmp_path / "batch"
  path.write_bytes(data)
  with pytest.raises(readers.BadFile, match="not a plain numeric one"):
    readers.load_pickle(str(path))


def test_flags_and_layout_are_never_taken_from_a_pickled_dtype(tmp_path):
  array = np.arange(6, dtype=np.uint8).reshape(2, 3)
  data = pickle.dumps({b"data": array}, protocol=3)
  # The dtype's state ends in (..., item size -1, alignment -1, flags 0): claim other ones.
  state = b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
  assert data.count(state) == 1
  path = tmp_path / "batch"
  path.write_bytes(data.replace(state, b"J\x00\x01\x00\x00J\x10\x00\x00\x00K\x3ft"))
  np.testing.assert_array_equal(readers.load_pickle(str(path))[b"data"], array)


MEMO_BOMB = b"\x80\x02Nr\xff\xff\xff\x0f."  # None, stored at memo index 2^28 - 1: 4 GB and 9 s unchecked


@pytest.mark.parametrize("reader", ["cifar", "pth_zip", "pth_legacy"])
def test_a_pickle_that_claims_a_huge_memo_is_refused_at_once(tmp_path, reader):
  path = tmp_path / ("batch" if reader == "cifar" else "weights.pth")
  if reader == "pth_zip":
    with zipfile.ZipFile(path, "w") as archive:
      archive.writestr("weights/data.pkl", MEMO_BOMB)
  else:
    path.write_bytes(MEMO_BOMB)
  start = time.monotonic()
  if reader == "cifar":
    with pytest.raises(DataError, match="stores at memo index 268435455 but makes only 1 entries"):
      prepare_lib.read_cifar_pickle(str(path))
  else:
    with pytest.raises(CheckpointError, match="stores at memo index 268435455 but makes only 1 entries"):
      tvi.read_pickle_without_torch(str(path))
  assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_resaved_by_python3_in_any_protocol_prepare(tmp_path, protocol):
  written = write_cifar_python(tmp_path / "src", protocol=protocol)
  data_dir = str(tmp_path / "tfds")
  prepare("cifar10", data_dir=data_dir, source_dir=str(tmp_path / "src"))
  dataset = open_dataset("cifar10", tfds_data_dir=data_dir)
  labels, images = written["test_batch"]
  for record in (dataset.eval[i] for i in range(len(dataset.eval))):
    original = int(record["id"].decode().split("_")[1])
    np.testing.assert_array_equal(record["image"], images[original])
    assert int(record["label"]) == labels[original]


# ---------------------------------------------------------------------------------------------------
# Labels, empty batches, lying headers.


def write_mnist(directory, count=3, labels=None, claimed=None, magic=2051):
  rng = np.random.default_rng(6)
  for split in ("train", "t10k"):
    images = rng.integers(0, 256, (count, 28, 28)).astype(np.uint8)
    split_labels = np.asarray(labels if labels is not None else rng.integers(0, 10, count), np.uint8)
    header = np.array([magic, claimed or count, 28, 28], ">u4").tobytes()
    (directory / f"{split}-images-idx3-ubyte").write_bytes(header + images.tobytes())
    (directory / f"{split}-labels-idx1-ubyte").write_bytes(np.array([2049, count], ">u4").tobytes()
                                                           + split_labels.tobytes())


@pytest.mark.parametrize("fmt", ["cifar_python", "cifar_binary", "mnist"])
def test_labels_out_of_range_in_any_split_are_refused_naming_the_file(tmp_path, fmt):
  source = tmp_path / "src"
  source.mkdir()
  if fmt == "cifar_python":
    write_cifar_python(source, test_labels=[0, -1])
    name, bad = "cifar10", "test_batch"
  elif fmt == "cifar_binary":
    (source / "cifar-10-batches-bin").mkdir()
    write_cifar(source / "cifar-10-batches-bin", 1, [2] * 6,
                [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"])
    test_file = source / "cifar-10-batches-bin" / "test_batch.bin"
    data = bytearray(test_file.read_bytes())
    data[0] = 255  # the first record's label byte: the -1 of a signed byte
    test_file.write_bytes(bytes(data))
    name, bad = "cifar10", "test_batch.bin"
  else:
    write_mnist(source, labels=[1, 2, 10])
    name, bad = "mnist", "labels-idx1-ubyte"
  with pytest.raises(DataError, match=r"label\(s\) outside \[0, 10\)") as caught:
    prepare(name, data_dir=str(tmp_path / "tfds"), source_dir=str(source))
  assert bad in str(caught.value) and "\n" not in str(caught.value)
  assert nothing_prepared(tmp_path / "tfds", name)


def test_batches_without_examples_are_refused(tmp_path):
  write_cifar_python(tmp_path / "src", count=0, labels=[])
  with pytest.raises(DataError, match="train split of cifar10 .* holds no examples"):
    prepare("cifar10", data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "src"))


@pytest.mark.parametrize("case,message", [
    ("claims_more", "ends after 2352 of the 2352000 bytes its header claims for 3000 images"),
    ("claims_fewer", "holds more bytes than its header describes"),
    ("wrong_magic", "magic number 2049, expected 2051"),
])
def test_an_idx_header_that_lies_is_a_one_line_error(tmp_path, case, message):
  claimed = {"claims_more": 3000, "claims_fewer": 2}.get(case)
  write_mnist(tmp_path, claimed=claimed, magic=2049 if case == "wrong_magic" else 2051)
  if case == "claims_fewer":  # then the label file holds more labels than that: align it first
    for split in ("train", "t10k"):
      path = tmp_path / f"{split}-labels-idx1-ubyte"
      path.write_bytes(np.array([2049, 2], ">u4").tobytes() + path.read_bytes()[8:10])
  result = run_cli("cnnjax.prepare", "mnist", f"--source_dir={tmp_path}", f"--data_dir={tmp_path / 'tfds'}",
                   timeout=120)
  one_line_error(result, "train-images-idx3-ubyte", message)
  assert nothing_prepared(tmp_path / "tfds", "mnist")


# ---------------------------------------------------------------------------------------------------
# Image folders.


def save_mode_images(folder) -> dict[str, np.ndarray]:
  """One small image per PIL mode family, in a format that keeps the mode; {file: what cnnjax must store}."""
  rng = np.random.default_rng(7)
  folder.mkdir(parents=True)
  rgb = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
  sixteen = rng.integers(0, 65536, (4, 5)).astype(np.uint16)
  floats = rng.random((4, 5)).astype(np.float32)
  images = {"one_bit.png": Image.fromarray(rgb).convert("1"), "gray.png": Image.fromarray(rgb).convert("L"),
            "gray_alpha.png": Image.fromarray(rgb).convert("LA"), "palette.png": Image.fromarray(rgb).convert("P"),
            "rgba.png": Image.fromarray(rgb).convert("RGBA"), "cmyk.tiff": Image.fromarray(rgb).convert("CMYK"),
            "sixteen.png": Image.fromarray(sixteen), "int32.tiff": Image.fromarray(sixteen.astype(np.int32)),
            "float.tiff": Image.fromarray(floats)}
  expected = {}
  for name, image in images.items():
    image.save(folder / name)
    with Image.open(folder / name) as reread:
      expected[name] = readers.image_array(reread, 3)
  expected["sixteen.png"] = np.repeat(np.round(sixteen / 257.0).astype(np.uint8)[..., None], 3, -1)
  expected["float.tiff"] = np.repeat(np.round(floats * 255.0).astype(np.uint8)[..., None], 3, -1)
  return expected


def test_images_of_every_mode_are_stored_with_their_contrast(tmp_path):
  source = tmp_path / "modes"
  expected = save_mode_images(source / "train" / "a")
  data_dir = str(tmp_path / "tfds")
  prepare("modes", data_dir=data_dir, source_dir=str(source))
  dataset = open_dataset("modes", tfds_data_dir=data_dir, eval_split="train")
  stored = sorted(dataset.train[i]["image"].tobytes() for i in range(len(dataset.train)))
  assert stored == sorted(array.tobytes() for array in expected.values())
  # 16-bit images keep their spread: not solid white, as clipping made them.
  assert expected["sixteen.png"].std() > 30 and dataset.std[0] > 0.1


def test_sixteen_bit_grayscale_folders_are_scaled_not_clipped(tmp_path):
  source = tmp_path / "scans"
  rng = np.random.default_rng(8)
  arrays = []
  for split in ("train", "test"):
    (source / split / "a").mkdir(parents=True)
    array = rng.integers(0, 65536, (6, 6)).astype(np.uint16)
    Image.fromarray(array).save(source / split / "a" / "0.png")
    arrays.append(array)
  data_dir = str(tmp_path / "tfds")
  prepare("scans", data_dir=data_dir, source_dir=str(source))
  dataset = open_dataset("scans", tfds_data_dir=data_dir)
  np.testing.assert_array_equal(dataset.train[0]["image"][..., 0], np.round(arrays[0] / 257.0))
  assert dataset.image_shape == (6, 6, 1) and 0.2 < dataset.mean[0] < 0.8 and dataset.std[0] > 0.1


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_truncated_image_is_a_one_line_error_and_nothing_is_stored(tmp_path, kind):
  source = tmp_path / "images"
  write_image_folder(source, ["cat", "dog"])
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(9).integers(0, 256, (12, 10, 3)).astype(np.uint8)).save(buffer, kind)
  (source / "train" / "dog" / f"cut.{kind}").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  result = run_cli("cnnjax.prepare", "my_images", f"--source_dir={source}", f"--data_dir={tmp_path / 'tfds'}",
                   timeout=120)
  one_line_error(result, f"cut.{kind} is not a readable image", "remove or replace it")
  assert nothing_prepared(tmp_path / "tfds", "my_images")


def test_a_broken_symbolic_link_is_named_not_skipped(tmp_path):
  source = tmp_path / "images"
  write_image_folder(source, ["cat", "dog"])
  os.symlink(tmp_path / "gone.png", source / "train" / "cat" / "7.png")
  with pytest.raises(DataError, match="7.png is not a readable file .a broken symbolic link"):
    prepare("my_images", data_dir=str(tmp_path / "tfds"), source_dir=str(source))


def test_preparing_a_name_again_from_another_or_a_changed_source_is_refused_and_keeps_the_dataset(tmp_path):
  first, second = tmp_path / "first", tmp_path / "second"
  write_image_folder(first, ["cat", "dog"])
  write_image_folder(second, ["ant", "bee", "cow"])
  data_dir = str(tmp_path / "tfds")
  prepare("pets", data_dir=data_dir, source_dir=str(first))
  before = open_dataset("pets", tfds_data_dir=data_dir)
  prepare("pets", data_dir=data_dir, source_dir=str(first))  # the same files: nothing to do
  with pytest.raises(DataError, match=f"already prepared .* from {first} .*would replace it: move that directory"):
    prepare("pets", data_dir=data_dir, source_dir=str(second))
  Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(first / "train" / "cat" / "0.png")
  with pytest.raises(DataError, match=f"{first} has changed since"):
    prepare("pets", data_dir=data_dir, source_dir=str(first))
  after = open_dataset("pets", tfds_data_dir=data_dir)
  assert after.num_classes == before.num_classes == 2 and len(after.train) == len(before.train)
  prepare("mnist", data_dir=data_dir, source_dir=str(write_mnist_dir(tmp_path, "mnist_files")))
  with pytest.raises(DataError, match="mnist is already prepared .* would replace it"):
    prepare("mnist", data_dir=data_dir, source_dir=str(write_mnist_dir(tmp_path, "other_mnist_files")))


def write_mnist_dir(tmp_path, name):
  directory = tmp_path / name
  directory.mkdir()
  write_mnist(directory)
  return directory


def test_unusable_data_directories_and_a_digits_source_dir_are_one_line_errors(tmp_path, monkeypatch):
  (tmp_path / "a_file").write_text("not a directory")
  with pytest.raises(DataError, match="is \\(or lies under\\) the file"):
    prepare("my_images", data_dir=str(tmp_path / "a_file" / "tfds"), source_dir=str(tmp_path))
  with pytest.raises(DataError, match="the digits come with scikit-learn and read no files"):
    prepare("digits", data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path))
  read_only = tmp_path / "read_only"
  read_only.mkdir(mode=0o555)
  if os.geteuid() == 0:  # root may write anywhere: let the check see the directory as another user does
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(read_only)))
  with pytest.raises(DataError, match="cannot be written .* is read-only for this user"):
    prepare("my_images", data_dir=str(read_only / "tfds"), source_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# The fuzz test.

# Pickle opcodes a tampered file may carry: globals of code, a stack global, a reduce, a build, an
# extension, persistent ids, huge lengths, out-of-band buffers, frames, a mark and a stop.
INJECTED_OPCODES = (b"cos\nsystem\n", b"c__builtin__\neval\n", b"\x8c\x05posix\x8c\x06system\x93", b"R", b"b",
                    b"\x82\x01", b"P0\n", b"Q", b"B\xff\xff\xff\x7f", b"\x8e\xff\xff\xff\xff\xff\xff\xff\x7f",
                    b"\x96\xff\xff\xff\xff\x00\x00\x00\x00", b"\x97", b"\x95\xff\xff\xff\xff\xff\xff\x00\x00",
                    b"(", b".", b"0", b"I99999999999999999999999\n", b"\x81", b"\x92", b"}", b"s", b"t",
                    b"r\xff\xff\xff\x0f", b"p268435455\n")
CRAFTED_DTYPES = (b"V8", b"O8", b"U1", b"M8", b"S1", b"c8", b"f8", b"i8", b"b1", b"u2", b"O\x00", b"V1")


def mutations(data: bytes, rng: np.random.Generator, dtype_field: bytes | None) -> list[bytes]:
  """Seeded mutations of a valid file: truncations, flipped bytes, altered header bytes, injected pickle
  opcodes and, where the file names a dtype, crafted dtypes."""
  out = []
  for _ in range(MUTATIONS_PER_READER):
    kind = rng.integers(5 if dtype_field else 4)
    mutated = bytearray(data)
    if kind == 0:
      mutated = mutated[:rng.integers(len(data))]
    elif kind == 1:
      for position in rng.integers(0, len(data), rng.integers(1, 8)):
        mutated[position] ^= 1 << int(rng.integers(8))
    elif kind == 2:
      for position in rng.integers(0, min(len(data), 64), rng.integers(1, 4)):
        mutated[position] = int(rng.integers(256))
    elif kind == 3:
      position = int(rng.integers(len(data)))
      mutated[position:position] = INJECTED_OPCODES[rng.integers(len(INJECTED_OPCODES))]
    else:
      mutated = bytearray(data.replace(dtype_field, CRAFTED_DTYPES[rng.integers(len(CRAFTED_DTYPES))], 1))
    out.append(bytes(mutated))
  return out


def valid_files(tmp_path) -> dict[str, tuple[bytes, str, bytes | None]]:
  """{format: (a valid file's bytes, its name, the dtype code it names)} for every reader."""
  rng = np.random.default_rng(10)
  images = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  cifar = pickle.dumps(cifar_python_batch({b"labels": [1, 2]}, images), protocol=2)
  binary = np.concatenate([np.array([[3], [4]], np.uint8), images.reshape(2, -1)], 1).tobytes()
  idx = np.array([2051, 2, 28, 28], ">u4").tobytes() + rng.integers(0, 256, 2 * 28 * 28).astype(np.uint8).tobytes()
  png, jpeg = io.BytesIO(), io.BytesIO()
  Image.fromarray(images[0]).save(png, "png")
  Image.fromarray(images[0]).save(jpeg, "jpeg")
  tensors = {"conv1.weight": torch.linspace(-1, 1, 24).reshape(2, 3, 2, 2), "bn1.running_var": torch.ones(2),
             "fc.weight": torch.arange(6, dtype=torch.float16).reshape(3, 2).t()}
  for name, kwargs in (("zip.pth", {}), ("legacy.pth", {"_use_new_zipfile_serialization": False})):
    torch.save(tensors, tmp_path / name, **kwargs)
  save_file({k: v.contiguous().numpy() for k, v in tensors.items()}, str(tmp_path / "w.safetensors"))
  np.savez(tmp_path / "arrays.npz", image=images[:, :4, :4], label=np.array([1, 2]))
  return {"cifar_python": (cifar, "data_batch_1", b"u1"), "cifar_binary": (binary, "data_batch_1.bin", None),
          "mnist_idx": (idx, "train-images-idx3-ubyte", None), "png": (png.getvalue(), "0.png", None),
          "jpeg": (jpeg.getvalue(), "0.jpg", None),
          "pth_zip": ((tmp_path / "zip.pth").read_bytes(), "weights.pth", None),
          "pth_legacy": ((tmp_path / "legacy.pth").read_bytes(), "legacy.pth", b"FloatStorage"),
          "pth_with_torch": ((tmp_path / "legacy.pth").read_bytes(), "legacy.pth", b"FloatStorage"),
          "safetensors": ((tmp_path / "w.safetensors").read_bytes(), "w.safetensors", b"F32"),
          "npz": ((tmp_path / "arrays.npz").read_bytes(), "arrays.npz", b"|u1")}


def read_as(fmt: str, path: str) -> None:
  """Reads `path` with the reader of `fmt`, as preparation or `init_from` would (`.pth` files with torch's
  restricted `torch.load` for pth_with_torch and safetensors' own reader, by `read_state_dict`)."""
  if fmt == "cifar_python":
    prepare_lib._cifar_python_batch(path, {"label": (b"labels", 10)})  # pylint: disable=protected-access
  elif fmt == "cifar_binary":
    prepare_lib.read_cifar_binary(path, [10])
  elif fmt == "mnist_idx":
    labels = os.path.join(os.path.dirname(path), "labels")
    with open(labels, "wb") as f:
      f.write(np.array([2049, 2], ">u4").tobytes() + bytes([1, 2]))
    prepare_lib.read_idx(path, labels)
  elif fmt in ("png", "jpeg"):
    layout = prepare_lib.ImageFolderLayout(os.path.dirname(os.path.dirname(os.path.dirname(path))))
    for files in layout.splits.values():
      for image_path, _ in files:
        layout.read(image_path)
  elif fmt == "npz":
    open_dataset("npz", train_path=path, eval_path=path)
  elif fmt in ("pth_zip", "pth_legacy"):
    tvi.check_tensors(path, tvi.read_pickle_without_torch(path))
  else:
    tvi.read_state_dict(path)


@pytest.mark.parametrize("fmt", ["cifar_python", "cifar_binary", "mnist_idx", "png", "jpeg", "pth_zip", "pth_legacy",
                                 "pth_with_torch", "safetensors", "npz"])
def test_fuzzed_files_are_read_or_refused_in_one_line(tmp_path, fmt):
  data, name, dtype_field = valid_files(tmp_path)[fmt]
  rng = np.random.default_rng(sum(fmt.encode()))
  outcomes = {"read": 0, "refused": 0}
  for index, mutated in enumerate(mutations(data, rng, dtype_field)):
    folder = tmp_path / f"case{index}" / "train" / "a"
    folder.mkdir(parents=True)
    path = str(folder / name)
    with open(path, "wb") as f:
      f.write(mutated)
    start = time.monotonic()
    try:
      read_as(fmt, path)
      outcomes["read"] += 1
    except (CnnjaxError, DataError, CheckpointError) as e:
      message = str(e)
      assert "\n" not in message and path in message, (fmt, index, message)
      outcomes["refused"] += 1
    assert time.monotonic() - start < SECONDS_PER_CASE, (fmt, index)
  assert outcomes["refused"] > 0, outcomes


# ---------------------------------------------------------------------------------------------------
# npz files and the statistics cache.


def test_an_npz_whose_header_claims_more_than_it_holds_is_refused_before_allocating(tmp_path):
  header = io.BytesIO()
  # 30 GB of images claimed, 12 bytes given.
  np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                "shape": (1_000_000, 100, 100, 3)})
  path = tmp_path / "lies.npz"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("image.npy", header.getvalue() + bytes(12))
    label = io.BytesIO()
    np.save(label, np.zeros(1, np.int64))
    archive.writestr("label.npy", label.getvalue())
  with pytest.raises(DataError, match=r"lies.npz is damaged .*claims shape \(1000000, 100, 100, 3\)"):
    open_dataset("npz", train_path=str(path), eval_path=str(path))


@pytest.mark.parametrize("damage", [{"std": [0.0, 0.2, 0.2]}, {"mean": [float("nan"), 0.5, 0.5]},
                                    {"mean": [0.5], "std": [0.2]}, {"std": ["x", 0.2, 0.2]}])
def test_a_damaged_statistics_cache_is_computed_again(tmp_path, caplog, damage):
  from cnnjax.data import sources  # pylint: disable=import-outside-toplevel
  images = np.random.default_rng(11).integers(0, 256, (4, 3, 3, 3)).astype(np.uint8)
  source = sources.ArraySource(images, np.zeros(4, np.int64))
  entry = {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "examples": 4, **damage}
  (tmp_path / sources.STATS_FILE).write_text(json.dumps({"train": entry}))
  with caplog.at_level("WARNING", logger="cnnjax"):
    mean, std = sources.cached_stats(str(tmp_path), "train", source)
  np.testing.assert_allclose(std, (images / 255.0).reshape(-1, 3).std(0), rtol=1e-6)
  assert "are damaged" in caplog.text and len(mean) == 3


def test_an_interrupted_preparation_leaves_nothing_and_a_rerun_prepares(tmp_path, monkeypatch):
  source = tmp_path / "images"
  write_image_folder(source, ["cat", "dog"])
  data_dir = tmp_path / "tfds"
  read = prepare_lib.ImageFolderLayout.read
  calls = []

  def interrupted(self, path):
    calls.append(path)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return read(self, path)

  monkeypatch.setattr(prepare_lib.ImageFolderLayout, "read", interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare("my_images", data_dir=str(data_dir), source_dir=str(source))
  assert not [p for p in data_dir.rglob("*") if p.is_file()], list(data_dir.rglob("*"))
  monkeypatch.setattr(prepare_lib.ImageFolderLayout, "read", read)
  prepare("my_images", data_dir=str(data_dir), source_dir=str(source))
  assert len(open_dataset("my_images", tfds_data_dir=str(data_dir)).train) == 6


@pytest.mark.parametrize("damage,message", [
    ("pixel_256", r"pixels are not all integers in 0..255"), ("label_10", r"label\(s\) outside \[0, 10\)"),
    ("short_row", "is not a readable CSV file"), ("missing_rows", "not 20 rows of 784 pixels and a label"),
])
def test_a_damaged_mnist_sample_is_a_one_line_error_not_wrapped_values(tmp_path, monkeypatch, damage, message):
  from cnnjax.data import mnist_sample  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(mnist_sample, "NUM_EXAMPLES", 20)  # a short file reads in milliseconds
  rows = np.zeros((mnist_sample.NUM_EXAMPLES, mnist_sample.PIXELS + 1), np.int64)
  rows[:, -1] = np.arange(len(rows)) % 10
  lines = [",".join(map(str, row)) for row in rows]
  if damage == "pixel_256":
    lines[7] = "256" + lines[7][1:]
  elif damage == "label_10":
    lines[9] = lines[9][:-1] + "10"
  elif damage == "short_row":
    lines[3] = "0,1"
  else:
    lines = lines[:10]
  path = tmp_path / "mnist_5k.csv.gz"
  with gzip.open(path, "wt") as f:
    f.write("\n".join(lines) + "\n")
  monkeypatch.setattr(mnist_sample, "csv_path", lambda: str(path))
  mnist_sample.load_split.cache_clear()
  try:
    with pytest.raises(DataError, match=message) as caught:
      mnist_sample.load_split("train")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
  finally:
    mnist_sample.load_split.cache_clear()


def test_ctrl_c_while_preparing_is_one_line_that_speaks_of_preparing(tmp_path):
  source = tmp_path / "images"
  write_image_folder(source, ["cat", "dog"])
  result = run_cli("cnnjax.prepare", "my_images", f"--source_dir={source}", f"--data_dir={tmp_path / 'tfds'}",
                   wrapper=os.path.join(REPO_ROOT, "tests", "interrupted_prepare_main.py"), timeout=120)
  assert result.returncode == 128 + signal.SIGINT, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      "stopped by SIGINT while preparing my_images; nothing half-written is kept, rerun the same command to "
      "prepare it"], result.stderr[-2000:]
  assert nothing_prepared(tmp_path / "tfds", "my_images")


def test_writing_the_digits_leaves_no_progress_bar_debris_in_a_log(tmp_path):
  result = subprocess.run([sys.executable, "-c", "import sys; from cnnjax.data import digits; "
                           "digits.prepare(sys.argv[1])", str(tmp_path / "tfds")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "\r" not in result.stderr + result.stdout and "examples/s" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("name", ["a\nb", os.fsdecode(b"\xff\xfe")])
def test_class_folders_named_with_control_characters_or_undecodable_bytes_are_refused(tmp_path, name):
  source = tmp_path / "images"
  write_image_folder(source, [name, "c"])
  with pytest.raises(DataError, match="a class folder's name must be printable UTF-8 text") as caught:
    prepare("my_images", data_dir=str(tmp_path / "tfds"), source_dir=str(source))
  assert readers.printable(str(caught.value)) == str(caught.value)
