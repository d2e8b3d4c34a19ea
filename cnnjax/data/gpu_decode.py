"""JPEG crop windows decoded on the GPU (nvImageCodec), behind the host's data plan.

`data.decoder` (auto / host / gpu, `choose`) says who decodes the encoded
images of a dataset read encoded (ImageNet, image folders; see
`cnnjax.data.decode`). With the GPU decoder a batch is made in two parts kept
apart:

* the plan, on the host (grain's threads or workers, `plan_train` /
  `plan_eval`): the examples' encoded bytes, read by index as for the host path,
  and each example's window (top, left, height, width) in its image, computed
  from the header and the example's draws by `preprocess.example_window`, the
  function the host path crops with; labels and augmentation draws as for the
  host path. No pixel is decoded. Bytes travel packed in one uint8 array
  ('encoded', with 'encoded_end' the end offset of each example) so that worker
  processes pass them through shared memory like any batch;
* the work, in the training process (`DeviceDecoder`): each local device
  decodes its contiguous rows of the batch, only the integer region around each
  window (nvImageCodec's region decoding), into one uint8 canvas per device,
  and resamples every window to the model's size there (`resize_windows`: the
  bilinear, antialiased-when-shrinking map of the host decoder, a matrix per
  example and axis, so one compiled program serves every window of a canvas
  size). The batch leaves it as a uint8 jax.Array split over the local devices
  by rows, as `Strategy.put_batch` places host batches; the step then finishes
  it (`Preprocess.finish`: flip, crop, normalize, cast) exactly as a host batch.

The examples, their order, windows, labels and draws are those of the host
path for the same (seed, step) whatever the decoder (tests hold the plan to the
host path with a CPU decoder in its place). Pixel values differ between the
decoders: the host decodes at the coarsest DCT scale the window allows (PIL's
draft) and resamples within the whole image, the GPU decodes at full scale and
resamples within the decoded region; docs/data.md states the tolerance measured.
A run may therefore resume with another decoder (`data.decoder` is
resume-safe): the batches are the same examples cropped the same way.

An image that cannot be decoded is the host path's DataError
(`decode.undecodable`), raised in the training process.

nvImageCodec (NVIDIA, with nvJPEG: `pip install 'cnnjax[cuda]'`) was chosen
over DALI because it fits this design and travels: it decodes the regions the
host plans and hands the pixels over as device buffers, while DALI would take
the plan over as a pipeline of its own; its wheels are about 29 MB with nvJPEG
against DALI's 425 MB (docs/data.md).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import os
import sys
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data.decode import MODES, EncodedImage, decode_window, undecodable
from cnnjax.data.preprocess import Preprocess, example_window
from cnnjax.errors import ConfigError, DataError

DECODERS = ("auto", "host", "gpu")
AUTO, HOST, GPU = DECODERS
PACKAGE = "nvidia.nvimgcodec"
INSTALL = "pip install 'cnnjax[cuda]'"
# The plan's keys, which the work replaces by 'input' before the batch goes to the devices.
PLAN_KEYS = ("encoded", "encoded_end", "window", "image_size")
# Canvas sides are rounded up to the next of 2^k and 1.5 * 2^k (at least this): few compiled resizes, at
# most a third of a canvas side beyond the largest region unused.
MIN_CANVAS = 64
# nvJPEG decodes the Huffman stream of images under a size threshold on the host ("hybrid"), which for
# ImageNet-sized JPEGs is nearly all of them: 0 keeps that work on the GPU too (where the hardware decoder
# does not take the batch), since the point of decoding there is to free the host.
DECODER_OPTIONS = "nvjpeg_cuda_decoder:hybrid_huffman_threshold=0"


def package_available() -> bool:
  return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec(PACKAGE) is not None


def choose(decoder: str, *, platform: str, device_kind: str, decodes: bool) -> tuple[str, str]:
  """(host or gpu, why) for `data.decoder` on these devices; ConfigError when gpu cannot run.

  `decodes`: the dataset is read encoded (otherwise there is nothing to decode and the host path runs).
  """
  if decoder == HOST:
    return HOST, "as set"
  nvidia = platform == "gpu" and "nvidia" in _vendor(device_kind)
  if decoder == GPU:
    if not package_available():
      raise ConfigError(f"data.decoder=gpu needs nvImageCodec, which is not installed; run {INSTALL} "
                        "(or use data.decoder=host)")
    if not nvidia:
      raise ConfigError(f"data.decoder=gpu decodes on an NVIDIA GPU and this run's devices are {platform} "
                        f"({device_kind}); use data.decoder=auto or host")
    if not decodes:
      raise ConfigError("data.decoder=gpu decodes datasets read encoded (ImageNet, image folders) and this one "
                        "is held decoded; use data.decoder=auto or host")
    return GPU, "as set"
  if not decodes:
    return HOST, "auto: nothing to decode"
  if not nvidia:
    return HOST, "auto: no NVIDIA GPU"
  if not package_available():
    return HOST, f"auto: nvImageCodec not installed ({INSTALL})"
  return GPU, "auto: NVIDIA GPU and nvImageCodec"


def _vendor(device_kind: str) -> str:
  # JAX names CUDA devices by product ("NVIDIA H200", "Tesla V100-SXM2-16GB", "H100 80GB HBM3"); ROCm ones
  # say AMD. Anything on the gpu platform that is not AMD's runs on CUDA.
  kind = device_kind.lower()
  return "amd" if ("amd" in kind or "radeon" in kind or "instinct" in kind) else "nvidia"


# -- the plan: on the host, bytes and windows, no pixel ----------------------------------------------------

def _pack(images: Sequence[EncodedImage], windows: np.ndarray, labels: Any) -> dict[str, np.ndarray]:
  ends = np.cumsum([len(image.data) for image in images], dtype=np.int64)
  return {"encoded": np.frombuffer(b"".join(image.data for image in images), np.uint8), "encoded_end": ends,
          "window": np.asarray(windows, np.float64).reshape(len(images), 4),
          "image_size": np.asarray([image.size for image in images], np.int64).reshape(len(images), 2),
          "label": np.asarray(labels, np.int32)}


def plan_train(preprocess: Preprocess, columns: dict[str, Any], positions: np.ndarray) -> dict[str, np.ndarray]:
  """The plan of a training batch read encoded (`read_for_preprocessing`): its bytes, windows, labels and,
  when augmenting, draws: what `Preprocess.host_train` decides, without decoding."""
  images = columns["image"]
  crops = preprocess.crop_uniforms(positions) if preprocess.random_resized_crop else [None] * len(images)
  windows = [example_window(*image.size, preprocess.image_size, uniforms) for image, uniforms in zip(images, crops)]
  plan = _pack(images, windows, columns["label"])
  if preprocess.augment.enabled:
    plan["draws"] = preprocess.draws(positions)
  return plan


def plan_eval(preprocess: Preprocess, columns: dict[str, Any]) -> dict[str, np.ndarray]:
  """The plan of an eval batch read encoded: shorter side to the model's size, center crop."""
  images = columns["image"]
  return _pack(images, [example_window(*image.size, preprocess.image_size, None) for image in images],
               columns["label"])


def encoded_bytes(plan: dict[str, np.ndarray]) -> list[bytes]:
  """The examples' encoded bytes of a plan, in order."""
  ends = plan["encoded_end"]
  starts = np.concatenate([[0], ends[:-1]])
  data = np.asarray(plan["encoded"])
  return [data[start:end].tobytes() for start, end in zip(starts, ends)]


# -- the work: in the training process, on the devices -----------------------------------------------------

def regions(windows: np.ndarray, image_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(integer regions (b, 4) top, left, bottom, right to decode, the windows within them (b, 4)); a region
  ends within its image (b, 2: height, width) where rounding would take it a pixel past."""
  top, left = np.floor(windows[:, 0]), np.floor(windows[:, 1])
  bottom = np.minimum(np.ceil(windows[:, 0] + windows[:, 2]), image_sizes[:, 0])
  right = np.minimum(np.ceil(windows[:, 1] + windows[:, 3]), image_sizes[:, 1])
  within = np.stack([windows[:, 0] - top, windows[:, 1] - left, windows[:, 2], windows[:, 3]], axis=1)
  return np.stack([top, left, bottom, right], axis=1).astype(np.int64), within.astype(np.float32)


def canvas_side(extent: int) -> int:
  """The canvas side that holds `extent` pixels (see MIN_CANVAS)."""
  side = MIN_CANVAS
  while side < extent:
    side = side * 3 // 2 if side & (side - 1) == 0 else side // 3 * 4  # 2^k -> 1.5 * 2^k -> 2^(k+1)
  return side


def _resize_matrix(start: jax.Array, extent: jax.Array, valid: jax.Array, in_size: int, out_size: int) -> jax.Array:
  """(out_size, in_size): bilinear resampling of [start, start + extent) of a row of `valid` pixels, pixel
  centers aligned and the triangle widened by the scale when shrinking (`preprocess.resize_matrix`, PIL's
  BILINEAR with a box)."""
  scale = extent / out_size
  support = jnp.maximum(scale, 1.0)
  centers = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5
  pixels = jnp.arange(in_size, dtype=jnp.float32)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(centers[:, None] - pixels[None, :]) / support)
  weights = jnp.where(pixels[None, :] < valid, weights, 0.0)
  return weights / jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames="size")
def resize_windows(canvas: jax.Array, within: jax.Array, extents: jax.Array, *, size: int) -> jax.Array:
  """(b, size, size, C) uint8: each example's window `within` (top, left, height, width, in its region)
  of its region, which fills the top left `extents` (height, width) of its canvas (b, H, W, C) uint8."""
  _, height, width, _ = canvas.shape
  rows = jax.vmap(lambda w, e: _resize_matrix(w[0], w[2], e[0], height, size))(within, extents)
  cols = jax.vmap(lambda w, e: _resize_matrix(w[1], w[3], e[1], width, size))(within, extents)
  pixels = canvas.astype(jnp.float32)
  # Rows first, then columns: never a product of the two maps.
  resized = jnp.einsum("bsh,bhwc->bswc", rows, pixels, precision=jax.lax.Precision.HIGHEST)
  resized = jnp.einsum("bswc,btw->bstc", resized, cols, precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)


class WindowDecoder(Protocol):
  """Decodes the windows (b, 4) of some examples, in images of (b, 2) sizes, to (b, size, size, channels)
  uint8 on one device."""

  def __call__(self, encoded: Sequence[bytes], windows: np.ndarray, image_sizes: np.ndarray, size: int,
               channels: int, device: jax.Device) -> jax.Array: ...


def host_windows(encoded: Sequence[bytes], windows: np.ndarray, image_sizes: np.ndarray, size: int,
                 channels: int, device: jax.Device) -> jax.Array:
  """The host decoder (`decode.decode_window`) in the GPU decoder's place: the reference the plan is
  tested with (its batches are the host path's, bit for bit)."""
  del image_sizes  # read from each header again
  pixels = np.stack([decode_window(EncodedImage(data, channels), tuple(window), size, size)
                     for data, window in zip(encoded, windows)])
  return jax.device_put(pixels, device)


# Fills the canvas (b, H, W, C) with each example's region (top, left, bottom, right) at its top left.
RegionFiller = Callable[[Sequence[bytes], np.ndarray, tuple[int, ...], int, jax.Device], jax.Array]


def canvas_windows(fill: RegionFiller) -> WindowDecoder:
  """A WindowDecoder that decodes regions with `fill` into a canvas on the device, then `resize_windows`."""

  def decode(encoded: Sequence[bytes], windows: np.ndarray, image_sizes: np.ndarray, size: int, channels: int,
             device: jax.Device) -> jax.Array:
    boxes, within = regions(np.asarray(windows, np.float64), np.asarray(image_sizes))
    extents = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
    # A square canvas: one compiled resize per side (and batch), whatever the windows' aspect.
    side = canvas_side(int(extents.max()))
    shape = (len(encoded), side, side, channels)
    canvas = fill(encoded, boxes, shape, channels, device)
    return resize_windows(canvas, jax.device_put(within, device), jax.device_put(extents.astype(np.float32), device),
                          size=size)

  return decode


def pil_regions(encoded: Sequence[bytes], boxes: np.ndarray, shape: tuple[int, ...], channels: int,
                device: jax.Device) -> jax.Array:
  """Regions decoded whole by PIL on the host (the canvas path without nvImageCodec: tests)."""
  canvas = np.zeros(shape, np.uint8)
  for row, (data, (top, left, bottom, right)) in enumerate(zip(encoded, boxes)):
    image = EncodedImage(data, channels).take_opened()
    try:
      pixels = np.asarray(image.crop((left, top, right, bottom)).convert(MODES[channels]))
    except (OSError, ValueError) as e:
      raise undecodable(e) from None
    canvas[row, :bottom - top, :right - left] = pixels.reshape(bottom - top, right - left, channels)
  return jax.device_put(canvas, device)


class NvImageCodecRegions:
  """Regions decoded by nvImageCodec straight into the canvas: on the device's GPU, or (`cpu=True`, tests)
  with its CPU backend into a host canvas then placed."""

  def __init__(self, *, cpu: bool = False):
    from nvidia import nvimgcodec  # pylint: disable=import-outside-toplevel
    self._codec, self._cpu = nvimgcodec, cpu
    self._decoders: dict[Any, Any] = {}
    self._streams: dict[Any, int] = {}

  def _stream(self, device: jax.Device) -> int:
    """A non-blocking CUDA stream of the device's own for its decodes: not CUDA's legacy default stream,
    which would wait for the train step's work on other blocking streams (0 where the CUDA runtime library
    is not found)."""
    if device not in self._streams:
      runtime, stream = _cuda_runtime(), ctypes.c_void_p(0)
      if runtime is not None:
        runtime.cudaSetDevice(device.local_hardware_id)
        non_blocking = 1  # cudaStreamNonBlocking
        if runtime.cudaStreamCreateWithFlags(ctypes.byref(stream), non_blocking) != 0:
          stream = ctypes.c_void_p(0)
      self._streams[device] = stream.value or 0
    return self._streams[device]

  def _decoder(self, device: jax.Device) -> Any:
    codec = self._codec
    if device not in self._decoders:
      self._decoders[device] = (
          codec.Decoder(device_id=codec.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[codec.Backend(codec.BackendKind.CPU_ONLY)])
          if self._cpu else codec.Decoder(device_id=device.local_hardware_id, options=DECODER_OPTIONS))
    return self._decoders[device]

  def __call__(self, encoded: Sequence[bytes], boxes: np.ndarray, shape: tuple[int, ...], channels: int,
               device: jax.Device) -> jax.Array:
    codec = self._codec
    params = codec.DecodeParams(apply_exif_orientation=False,  # the host path's windows ignore EXIF too
                                color_spec=codec.ColorSpec.GRAY if channels == 1 else codec.ColorSpec.SRGB)
    streams = []
    for data, box in zip(encoded, boxes):
      top, left, bottom, right = (int(v) for v in box)
      try:
        streams.append(codec.CodeStream(data).get_sub_code_stream(region=codec.Region(top, left, bottom, right)))
      except Exception as e:  # nvImageCodec raises RuntimeError, ValueError or its own types on bad headers
        raise undecodable(e) from None
    if self._cpu:
      canvas = np.zeros(shape, np.uint8)
      views: list[Any] = [canvas[row, :bottom - top, :right - left] for row, (top, left, bottom, right)
                          in enumerate(boxes)]
    else:
      canvas = jnp.zeros(shape, jnp.uint8, device=device).block_until_ready()
      views = [_DeviceView(canvas, row, bottom - top, right - left) for row, (top, left, bottom, right)
               in enumerate(boxes)]
    stream = 0 if self._cpu else self._stream(device)
    images = [codec.as_image(view, stream) for view in views]
    decoder = self._decoder(device)
    try:
      decoded = decoder.decode(streams, images=images, params=params, cuda_stream=stream)
    except (RuntimeError, TypeError, ValueError):
      # A version that decodes only into buffers of its own: decode there, then copy (below).
      decoded = decoder.decode(streams, params=params, cuda_stream=stream)
    interface = "__array_interface__" if self._cpu else "__cuda_array_interface__"
    for row, (image, view) in enumerate(zip(decoded, views)):
      if image is None:
        raise undecodable(f"nvImageCodec could not decode example {row} of the batch")
      if getattr(image, interface)["data"][0] != getattr(view, interface)["data"][0]:
        # nvImageCodec decoded into a buffer of its own rather than the canvas: copy it there.
        _copy_into(view, image, cpu=self._cpu, stream=stream)
    if self._cpu:
      return jax.device_put(canvas, device)
    _synchronize(device, stream, decoded)
    return canvas


def _copy_into(view: Any, image: Any, *, cpu: bool, stream: int) -> None:
  if cpu:
    view[...] = np.asarray(image).reshape(view.shape)
    return
  runtime = _cuda_runtime()
  if runtime is None:
    raise RuntimeError("nvImageCodec decoded outside the canvas and the CUDA runtime library (libcudart) that "
                       "copies it there was not found")
  source, target = image.__cuda_array_interface__, view.__cuda_array_interface__
  height, width, channels = target["shape"]
  source_pitch = (source.get("strides") or (width * channels,))[0]
  device_to_device = 3  # cudaMemcpyDeviceToDevice
  status = runtime.cudaMemcpy2DAsync(
      ctypes.c_void_p(target["data"][0]), ctypes.c_size_t(target["strides"][0]), ctypes.c_void_p(source["data"][0]),
      ctypes.c_size_t(source_pitch), ctypes.c_size_t(width * channels), ctypes.c_size_t(height), device_to_device,
      ctypes.c_void_p(stream))
  if status != 0:
    raise RuntimeError(f"cudaMemcpy2DAsync into the decode canvas failed with CUDA error {status}")


class _DeviceView:
  """Rows of one example's region in a device canvas, as a CUDA array (what nvImageCodec decodes into).

  The canvas is a jax.Array that nothing has read yet; it is written here before any computation uses it
  and only read afterwards (`_synchronize` waits for the writes).
  """

  def __init__(self, canvas: jax.Array, row: int, height: int, width: int):
    _, canvas_h, canvas_w, channels = canvas.shape
    self._canvas = canvas  # kept alive as long as nvImageCodec holds the view
    pointer = canvas.unsafe_buffer_pointer() + row * canvas_h * canvas_w * channels
    self.__cuda_array_interface__ = {"shape": (height, width, channels), "typestr": "|u1", "version": 3,
                                     "data": (pointer, False), "strides": (canvas_w * channels, channels, 1),
                                     "stream": None}


def _synchronize(device: jax.Device, stream: int, decoded: Sequence[Any]) -> None:
  """Waits until the decodes (and copies) issued on `stream` of `device` are written."""
  runtime = _cuda_runtime()
  if runtime is not None:
    runtime.cudaSetDevice(device.local_hardware_id)
    if runtime.cudaStreamSynchronize(ctypes.c_void_p(stream)) == 0:
      return
  # Without the CUDA runtime library: copying the smallest image to the host waits for the same stream.
  min(decoded, key=lambda image: image.height * image.width).cpu()


_RUNTIME: list[Any] = []


def _cuda_runtime() -> Any:
  """libcudart of JAX's CUDA wheels (nvidia/cu*/lib), or of the system; None when not found."""
  if not _RUNTIME:
    candidates = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for path in sys.path:
      candidates += sorted(glob.glob(os.path.join(path, "nvidia", "cu*", "lib", "libcudart.so*")))
      candidates += sorted(glob.glob(os.path.join(path, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
    runtime = None
    for candidate in candidates:
      try:
        runtime = ctypes.CDLL(candidate)
        break
      except OSError:
        continue
    _RUNTIME.append(runtime)
  return _RUNTIME[0]


def gpu_windows() -> WindowDecoder:
  """nvImageCodec decoding on each example's device: the GPU decoder of `data.decoder=gpu`."""
  return canvas_windows(NvImageCodecRegions())


class DeviceDecoder:
  """Turns plans into batches: each local device decodes its contiguous rows (`decode`, a WindowDecoder),
  and the rows are one uint8 jax.Array split over the devices by rows."""

  def __init__(self, devices: Sequence[jax.Device], size: int, channels: int, decode: WindowDecoder):
    self.devices, self.size, self.channels, self.decode = list(devices), size, channels, decode
    self._sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(self.devices), ("rows",)),
                                                jax.sharding.PartitionSpec("rows"))

  def __call__(self, plan: dict[str, Any]) -> dict[str, Any]:
    """The batch of a plan: its other keys unchanged, PLAN_KEYS replaced by 'input'."""
    encoded, windows, sizes = encoded_bytes(plan), np.asarray(plan["window"]), np.asarray(plan["image_size"])
    per_device = len(encoded) // len(self.devices)
    rows = [slice(i * per_device, (i + 1) * per_device) for i in range(len(self.devices))]
    parts = [self.decode(encoded[part], windows[part], sizes[part], self.size, self.channels, device)
             for part, device in zip(rows, self.devices)]
    shape = (len(encoded), self.size, self.size, self.channels)
    inputs = parts[0] if len(parts) == 1 else jax.make_array_from_single_device_arrays(shape, self._sharding, parts)
    return {**{k: v for k, v in plan.items() if k not in PLAN_KEYS}, "input": inputs}


class DecodedBatches:
  """The batches of an iterator of plans (`pipeline.Batches`), decoded by a DeviceDecoder as they are taken:
  the iterator's state, `set_state` and `close` are the plans'."""

  def __init__(self, plans: Any, decoder: DeviceDecoder):
    self._plans, self._decoder = plans, decoder

  def __iter__(self) -> DecodedBatches:
    return self

  def __next__(self) -> dict[str, Any]:
    try:
      return self._decoder(next(self._plans))
    except DataError:
      self.close()  # as the host path's iterator does on a bad batch
      raise

  def get_state(self) -> dict[str, int]:
    return self._plans.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._plans.set_state(state)

  def close(self) -> None:
    self._plans.close()

  def __enter__(self) -> DecodedBatches:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()
