"""GoogLeNet / Inception v1 on ImageNet (ILSVRC 2012), torchvision's layout without auxiliary heads (config only).

Recipe: global batch 256, SGD momentum 0.9, learning rate 0.1 divided by 10
every 30 epochs, 90 epochs, weight decay 1e-4, 224x224 random resized crops and
horizontal flips, dropout 0.2 (torchvision's standard ResNet-style recipe; the
paper trained asynchronously with a different schedule). `--config.model.wide_kernel=5`
gives the paper's 5x5 branch instead of torchvision's 3x3.

Data: TFDS `imagenet2012` needs a manual download of the ILSVRC 2012 tar files; then, once:
  pip install 'cnnjax[prepare]' && python -m cnnjax.prepare imagenet2012 --manual_dir=DIR
Command:
  python -m cnnjax.main --config=experiments/googlenet_imagenet.py --workdir=/tmp/cnnjax/googlenet_imagenet \
      --config.parallel.strategy=jit
Expected: about 70% top-1 (torchvision's GoogLeNet weights score 69.78%; they were ported, not trained
with this recipe).
Size: 450k steps at batch 256; 6,624,904 parameters and 1.50 GMACs per 224x224 image
(python -m cnnjax.summary googlenet --input_shape=224,224,3 --num_classes=1000).
Result: not run here (no ImageNet on this machine).
"""

from cnnjax.config import imagenet_config
from cnnjax.models.googlenet import INCEPTION_MODULES, TORCHVISION_BN_EPSILON


def get_config():
  config = imagenet_config("googlenet", learning_rate=0.1, decay_epochs=(30, 60))
  config.model.inception_modules = INCEPTION_MODULES  # (name, branch widths) of 3a ... 5b, the paper's Table 1
  config.model.wide_kernel = 3
  config.model.dropout_rate = 0.2
  config.model.bn_epsilon = TORCHVISION_BN_EPSILON  # torchvision's 1e-3 (the base config's is 1e-5)
  config.model.transform_input = False  # True for torchvision's pretrained weights (see cnnjax.models.googlenet)
  return config
