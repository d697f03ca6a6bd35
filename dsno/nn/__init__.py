"""Networks: the UNet backbone, the temporal Fourier layer and the DSNO operator."""

from dsno.nn.config import CONFIG_FORMAT_VERSION, ConfigError, SamplerConfig
from dsno.nn.dsno import (
    DSNO,
    DiffusersUNet,
    DiscreteTime,
    WithTemporal,
    build_backbone,
    build_dsno,
    default_is_unit,
    diffusers_backbone_spec,
    insert_temporal_layers,
    load_backbone_weights,
    student_from_teacher,
    validate_config,
)
from dsno.nn.temporal import TemporalConv, TemporalMatmul, set_temporal_impl
from dsno.nn.unet import AttnBlock, Downsample, ResAttnBlock, ResBlock, UNet, Upsample, timestep_embedding

__all__ = [
    "CONFIG_FORMAT_VERSION", "ConfigError", "DSNO", "SamplerConfig", "AttnBlock", "DiffusersUNet", "DiscreteTime",
    "Downsample", "ResAttnBlock",
    "ResBlock", "TemporalConv", "TemporalMatmul", "UNet", "Upsample", "WithTemporal", "build_backbone",
    "build_dsno", "default_is_unit", "diffusers_backbone_spec", "insert_temporal_layers", "load_backbone_weights",
    "set_temporal_impl", "student_from_teacher", "timestep_embedding", "validate_config",
]
