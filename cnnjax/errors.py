"""Errors a user can fix, and the stop that a preemption signal causes.

Every bad input raises a `CnnjaxError` whose message is one line that names the
problem and the fix. `cnnjax.main` prints it as `error: <message>` and exits with
status 2 before anything is written to the workdir; tracebacks are reserved for
bugs.
"""

import errno
import signal

EXIT_USER_ERROR = 2  # a bad input: one line on stderr, nothing written
EXIT_STATUS_BASE = 128  # a process stopped by signal N exits with 128 + N


class CnnjaxError(Exception):
  """Base class: a bad input or state that the user can fix."""


class ConfigError(CnnjaxError):
  """A config value that is unknown, of the wrong type or impossible."""


class WorkdirBusyError(ConfigError):
  """A workdir that another run or sweep holds the lock of."""


class DataError(CnnjaxError):
  """A dataset that is missing, not prepared, or malformed."""


class CheckpointError(CnnjaxError):
  """A checkpoint that cannot be used for this run."""


class UnreadableCheckpointError(CheckpointError):
  """A checkpoint that a reader (evaluate, predict) asked for and could not read: damaged or unreadable.
  Reported like a full disk, without Python's shutdown, where orbax's reader threads print tracebacks."""


class DiskFullError(CnnjaxError):
  """The disk (or quota) filled up while the run wrote; the last complete checkpoint is kept."""


class NonFiniteError(CnnjaxError):
  """The loss or the gradients stopped being finite during training."""


class DistributedError(CnnjaxError):
  """A multi-process run that cannot start or lost a peer."""


class Preempted(BaseException):
  """A run, sweep or study stopped by SIGTERM or SIGINT once the step in training was saved.

  A BaseException, like KeyboardInterrupt, so that handlers of ordinary errors
  (a sweep recording a failed trial) never swallow it. The entry points exit
  with `exit_status`, 128 + the signal number, as shells report a process
  stopped by a signal. See `cnnjax.train.preemption`.
  """

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by {signal.Signals(signum).name}" + (f" at step {step}" if step else ""))
    self.signum, self.step = signum, step

  @property
  def exit_status(self) -> int:
    return EXIT_STATUS_BASE + self.signum


def printable(text: str) -> str:
  """`text` with control characters (a terminal's escape codes in a file name) shown escaped, so that an
  error line stays one plain line."""
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line(message: object) -> str:
  """`message` as one plain line, as every `error:` line is printed: each run of whitespace (newlines
  included) becomes one space, and any other control character, such as a terminal escape code in a name
  the user gave, is shown escaped."""
  return " ".join(printable(word) for word in str(message).split())


# errno values that mean the disk (or the user's quota) is full.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


def is_disk_full(error: BaseException | None) -> bool:
  """Whether `error`, or an error it was raised from, says the disk or quota is full (libraries such as
  orbax and tensorstore wrap the OSError in their own errors)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
      return True
    if any(text in str(error) for text in DISK_FULL_TEXTS):
      return True
    error = error.__cause__ or error.__context__
  return False
