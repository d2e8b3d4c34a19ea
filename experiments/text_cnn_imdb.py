"""The notes' text CNN (Embedding -> Conv -> MaxPool -> Conv -> MaxPool -> ReLU -> Linear) on IMDB reviews
(TFDS `imdb_reviews`): positive or negative, 25,000 training and 25,000 test reviews.

The vocabulary is the 20,000 most frequent words of the training split (ids 0
and 1 for padding and unknown words); each review is cut or padded to 256 tokens.

Data (needs network once): python -m cnnjax.prepare imdb_reviews
Command:
  python -m cnnjax.main --config=experiments/text_cnn_imdb.py --workdir=/tmp/cnnjax/text_cnn_imdb
Expected: for scale, Keras's imdb_cnn example, a one-convolution network of the same family,
reports about 89% test accuracy.
Size: 1,954 steps at batch 64 (5 epochs).
Result: not run here (the dataset cannot be downloaded on this machine); the offline end-to-end test
runs it on mock data.
"""

from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = "text_cnn"
  config.model.embed_dim = 128
  config.model.features = (128, 128)
  config.model.kernel_size = 5
  config.model.pool_size = 4
  config.model.dropout_rate = 0.5
  config.data.name = "imdb_reviews"
  config.data.vocab_size = 20_000
  config.data.max_length = 256
  config.batch_size = 64
  config.num_epochs = 5
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 100
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
