"""Models kvla runs: the VLA-shaped model (patch ViT, projector, transformers decoder, action
tokens) with its presets, and the reference VLA kvla trains on simulator demonstrations."""

from kvla.model.inputs import InputError
from kvla.model.vla import ACTION_BINS, BOS_TOKEN_ID, PRESETS, ImageError, VLAConfig, VLAModel, preset_config

__all__ = ["ACTION_BINS", "BOS_TOKEN_ID", "PRESETS", "ImageError", "InputError", "VLAConfig", "VLAModel", "preset_config"]
