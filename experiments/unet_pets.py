"""U-Net on Oxford-IIIT Pet (TFDS `oxford_iiit_pet`): per-pixel pet / background / border from the trimaps.

Images and trimaps are resized together to 128x128 (bilinear for images,
nearest for masks) and flipped and shifted together for training; the 3,680
training and 3,669 test images of TFDS's split.

Data (needs network once): python -m cnnjax.prepare oxford_iiit_pet
Command:
  python -m cnnjax.main --config=experiments/unet_pets.py --workdir=/tmp/cnnjax/unet_pets
Per-class IoU afterwards:
  python scripts/segmentation_scores.py --config=experiments/unet_pets.py --workdir=/tmp/cnnjax/unet_pets
Expected: no number is claimed, as it is not run here; its synthetic counterpart is
experiments/unet_shapes.py.
Size: 2,300 steps at batch 32 on 128x128 images.
Result: not run here (the dataset cannot be downloaded on this machine); the offline end-to-end test
runs it on mock data.
"""

from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = "unet"
  config.model.features = (32, 64, 128, 256)  # four levels: 128 -> 64 -> 32 -> 16 pixels
  config.model.norm = "batch"
  config.data.name = "oxford_iiit_pet"
  config.data.image_size = 128
  config.data.flip = True
  config.data.crop_padding = 8
  config.batch_size = 32
  config.num_epochs = 20
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 100
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
