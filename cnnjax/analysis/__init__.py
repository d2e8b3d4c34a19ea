"""CNN arithmetic and measurements: output sizes, parameters, multiply-accumulates, receptive fields,
per-layer profiles of any model, and the studies of the notes' claims (equivariance, MLP vs CNN,
plain vs residual depth, the fixed filter bank, deep image prior)."""

from cnnjax.analysis.arithmetic import (conv_macs, conv_output_size, conv_params, dense_params, pool_output_size,
                                        same_padding)
from cnnjax.analysis.profile import Layer, Profile, profile_model, profile_registered
from cnnjax.analysis.receptive_field import ReceptiveField, trace_receptive_fields

__all__ = ["Layer", "Profile", "ReceptiveField", "conv_macs", "conv_output_size", "conv_params", "dense_params",
           "pool_output_size", "profile_model", "profile_registered", "same_padding", "trace_receptive_fields"]
