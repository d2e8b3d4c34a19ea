"""The notes' text CNN for sentence classification: Embedding -> Conv -> MaxPool -> Conv -> MaxPool -> ReLU -> Linear.

Input: token ids (B, L) (any dtype; cast to int32), 0 being padding. The
embedding turns each one-hot token into a dense vector, giving a 1D "image"
(B, L, E) whose channels are embedding dimensions. The first max pool has a
window and stride; the second pools over the whole sequence (max over time),
so that any length gives one vector per sentence. The notes put the
nonlinearity only after the second pooling; the first max pool, itself
nonlinear, sits between the two convolutions, so they do not collapse into
one linear map. Dropout before the classifier, as Kim (2014).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn import GlobalPool, MaxPool, Norm, conv


class TextCNN(nn.Module):
  """Embedding, two 1D convolutions with max pooling, ReLU, dropout, linear classifier."""

  num_classes: int
  vocab_size: int = 20_000  # the data pipeline sets it to its vocabulary's size
  embed_dim: int = 128
  features: Sequence[int] = (128, 128)
  kernel_size: int = 5
  pool_size: int = 4
  dropout_rate: float = 0.5
  norm: Norm = Norm(kind="none")
  act: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = jnp.float32
  lowering: str = "auto"  # how convolutions and max pooling are computed: cnnjax.nn.lowering

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    if tokens.ndim != 2:
      raise ValueError(f"text_cnn takes token ids of shape (batch, length), got {tokens.shape}")
    norm = self.norm(train)
    x = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name="embedding")(tokens.astype(jnp.int32))
    first, second = self.features
    x = conv(first, self.kernel_size, padding="same", ndim=1, dtype=self.dtype, lowering=self.lowering,
             name="conv1")(x)
    x = MaxPool(self.pool_size, lowering=self.lowering, name="pool1")(norm(name="norm1")(x))
    x = conv(second, self.kernel_size, padding="same", ndim=1, dtype=self.dtype, lowering=self.lowering,
             name="conv2")(x)
    x = GlobalPool("max", name="pool2")(norm(name="norm2")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(self.act(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return x.astype(jnp.float32)
