"""Errors a user can fix.

Every bad input raises a `CnnjaxError` whose message is one line that names the
problem and the fix. `cnnjax.main` prints it as `error: <message>` and exits with
status 2 before anything is written to the workdir; tracebacks are reserved for
bugs.
"""


class CnnjaxError(Exception):
  """Base class: a bad input or state that the user can fix."""


class ConfigError(CnnjaxError):
  """A config value that is unknown, of the wrong type or impossible."""


class DataError(CnnjaxError):
  """A dataset that is missing, not prepared, or malformed."""


class CheckpointError(CnnjaxError):
  """A checkpoint that cannot be used for this run."""


class NonFiniteError(CnnjaxError):
  """The loss or the gradients stopped being finite during training."""


class DistributedError(CnnjaxError):
  """A multi-process run that cannot start or lost a peer."""
