"""Text for the text CNN: a deterministic word tokenizer, a vocabulary built from the training split,
and a source that turns each review into a fixed-length row of token ids.

Tokenizing lower-cases the text, turns HTML line breaks (IMDB's `<br />`) into
spaces and keeps runs of letters and digits (with an apostrophe suffix such as
"don't"). The vocabulary keeps the `size - 2` most frequent training words,
ties broken alphabetically, so that the same split always gives the same ids;
id 0 is padding and id 1 stands for every other word. Each example is cut to
its first `max_length` tokens or padded with zeros to that length.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable

import numpy as np

from cnnjax.errors import DataError

DEFAULT_VOCAB_SIZE = 20_000
DEFAULT_MAX_LENGTH = 256  # tokens per example: most IMDB reviews fit
PAD, UNKNOWN = 0, 1
RESERVED = 2  # ids 0 and 1
TOKEN_PATTERN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
LINE_BREAK = re.compile(r"<br\s*/?>")


def tokenize(text: str | bytes) -> list[str]:
  """Lower-cased words of `text`, HTML line breaks removed."""
  if isinstance(text, bytes):
    text = text.decode("utf-8", errors="replace")
  return TOKEN_PATTERN.findall(LINE_BREAK.sub(" ", text.lower()))


class Vocabulary:
  """Word -> id for the most frequent words; 0 is padding, 1 unknown."""

  def __init__(self, words: Iterable[str]):
    self.words = tuple(words)
    self._ids = {word: index + RESERVED for index, word in enumerate(self.words)}

  def __len__(self) -> int:
    return len(self.words) + RESERVED

  @classmethod
  def build(cls, texts: Iterable[str | bytes], size: int) -> "Vocabulary":
    """The `size - 2` most frequent words of `texts` (ties alphabetical)."""
    if size <= RESERVED:
      raise DataError(f"a vocabulary of {size} ids leaves no room for words; set data.vocab_size > {RESERVED}")
    counts = collections.Counter()
    for text in texts:
      counts.update(tokenize(text))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return cls(word for word, _ in ranked[:size - RESERVED])

  def encode(self, text: str | bytes, max_length: int) -> np.ndarray:
    """Token ids (max_length,) int32: the first `max_length` words, zero-padded."""
    ids = [self._ids.get(word, UNKNOWN) for word in tokenize(text)[:max_length]]
    out = np.full(max_length, PAD, np.int32)
    out[:len(ids)] = ids
    return out


class TextSource:
  """A source of `{'text', 'label'}` records read as `{'tokens': int32 (max_length,), 'label'}`."""

  def __init__(self, source: Any, vocabulary: Vocabulary, max_length: int):
    self.source, self.vocabulary, self.max_length = source, vocabulary, max_length

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.source[index]
    return {"tokens": self.vocabulary.encode(record["text"], self.max_length), "label": int(record["label"])}
