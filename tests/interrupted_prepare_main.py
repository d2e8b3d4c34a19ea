"""`python -m cnnjax.prepare`, with Ctrl-C (KeyboardInterrupt) arriving as the first image is read.

Used by tests/test_readers.py to see the entry point's SIGINT line; the code under test is unchanged, the
hook patches `ImageFolderLayout.read` in this process only.
"""

from absl import app

from cnnjax import cli
from cnnjax import prepare as entry
from cnnjax.data import prepare as prepare_lib


def _interrupted(self, path):
  del self, path
  raise KeyboardInterrupt


if __name__ == "__main__":
  prepare_lib.ImageFolderLayout.read = _interrupted
  app.run(entry.main, flags_parser=cli.one_line_flags_parser)
