"""Layers: convolution options, normalization, activations, maxout, pooling, the augmentation layer and
the fixed classic kernels. `bn_sync` defines once which examples a BatchNorm layer normalizes together
(`model.bn_sync`, carried from the config to the layer as one `BatchNormGrouping`), and `lowering` chooses
per backend how convolution and max/min pooling are computed."""

from cnnjax.nn.activations import ACTIVATIONS, get_activation
from cnnjax.nn.augment import RandomAugment, augment_images
from cnnjax.nn.bn_sync import BN_SYNC_MODES, BatchNormGrouping
from cnnjax.nn.conv import PADDING_MODES, Conv, conv, conv_padding, depthwise_conv, effective_kernel_size
from cnnjax.nn.kernels import CLASSIC_KERNELS, FilterBank
from cnnjax.nn.lowering import LOWERINGS, conv_general_dilated
from cnnjax.nn.maxout import Maxout
from cnnjax.nn.norm import (BATCH_NORM_KINDS, NORM_KINDS, RUNNING_VARIANCE_CONVENTIONS, BatchNorm, GroupNorm, Identity,
                            Norm, RenormClipping)
from cnnjax.nn.pooling import POOL_KINDS, AdaptiveAvgPool, AvgPool, GlobalPool, MaxPool, MinPool, Pool, pool

__all__ = ["ACTIVATIONS", "AdaptiveAvgPool", "AvgPool", "BATCH_NORM_KINDS", "BN_SYNC_MODES", "BatchNorm",
           "BatchNormGrouping", "CLASSIC_KERNELS", "Conv", "FilterBank", "GlobalPool", "GroupNorm", "Identity",
           "LOWERINGS", "MaxPool", "Maxout", "MinPool", "NORM_KINDS", "Norm", "PADDING_MODES", "POOL_KINDS", "Pool",
           "RUNNING_VARIANCE_CONVENTIONS", "RandomAugment", "RenormClipping", "augment_images", "conv",
           "conv_general_dilated", "conv_padding", "depthwise_conv", "effective_kernel_size", "get_activation", "pool"]
