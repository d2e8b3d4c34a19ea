"""CNN arithmetic and measurements: output sizes, parameters, multiply-accumulates, receptive fields and
per-layer profiles of any model (the notes' studies that use them live in `cnnjax.lab.notes`)."""

from cnnjax.analysis.arithmetic import (conv_macs, conv_output_size, conv_params, dense_params, pool_output_size,
                                        same_padding)
from cnnjax.analysis.profile import Layer, Profile, profile_model, profile_registered
from cnnjax.analysis.receptive_field import ReceptiveField, trace_receptive_fields

__all__ = ["Layer", "Profile", "ReceptiveField", "conv_macs", "conv_output_size", "conv_params", "dense_params",
           "pool_output_size", "profile_model", "profile_registered", "same_padding", "trace_receptive_fields"]
