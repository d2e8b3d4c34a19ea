"""Test set-up: 8 simulated CPU devices, a private TFDS data directory, and shared helpers.

XLA_FLAGS must be set before JAX is imported anywhere, so it is set here at
import time; subprocesses started by tests inherit it. Tests never touch the
network: TFDS datasets other than the embedded digits are mocked with
`tfds.testing.mock_data`.
"""

import os
import signal
import sys
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# As the entry points do (cnnjax.parallel.host_devices): on a GPU, the deterministic kernels that exact
# resume relies on.
if "xla_gpu_deterministic_ops" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_gpu_deterministic_ops=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests check numbers and wiring, not speed: most of their time is XLA compiling tiny steps, which
# its optimization passes multiply. Runs compared with each other always share this setting.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# Tests send SIGINT to the runs they start, and cnnjax keeps a SIGINT ignored at start ignored (not aimed at
# it). A shell's background job starts with SIGINT ignored; a handler here instead means the runs started
# from this process begin with the default disposition, however pytest itself was launched.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)
# A private TFDS directory: the digits are written there once per test session.
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="cnnjax-tfds-")

import pytest  # pylint: disable=wrong-import-position

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))


@pytest.fixture(scope="session")
def tfds_data_dir() -> str:
  """The session's TFDS directory with the digits prepared."""
  from cnnjax.data import digits  # pylint: disable=import-outside-toplevel
  data_dir = os.environ["TFDS_DATA_DIR"]
  digits.prepare(data_dir)
  return data_dir
